"""Shared REST plumbing: one error shape, pagination."""
from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response

from gatehouse.core.errors import ApplicationError


def error_body(status_code: int, code: str, message: str, fields: dict | None = None) -> dict:
    body = {"error": {"status": status_code, "code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return body


def _flatten(detail) -> dict:
    if isinstance(detail, dict):
        return {key: [str(item) for item in value] if isinstance(value, list) else str(value)
                for key, value in detail.items()}
    return {"non_field_errors": [str(item) for item in detail]}


def exception_handler(exc, context):
    """Every API error, ours or DRF's, leaves as {"error": {status, code, message[, fields]}}."""
    if isinstance(exc, ApplicationError):
        response = Response(error_body(exc.status, exc.code, exc.message, exc.fields), status=exc.status)
        if exc.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="gatehouse"'
        if getattr(exc, "retry_after", None):
            response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, DjangoValidationError):  # a service that forgot clean_or_invalid: still a 400
        fields = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return Response(error_body(400, "invalid", "; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items()), fields),
                        status=400)
    if isinstance(exc, RequestDataTooBig):  # a JSON or form body over DATA_UPLOAD_MAX_MEMORY_SIZE
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(error_body(413, "request_too_large", f"The request body is larger than {limit} bytes, the "
                                   "most accepted outside file uploads; send less."), status=413)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None  # a bug: let Django log it and answer 500 through handler500
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        message = "The request is invalid: " + "; ".join(
            f"{key}: {' '.join(value) if isinstance(value, list) else value}" for key, value in fields.items()
        )
        return Response(error_body(400, "invalid", message, fields), status=400)
    code = exc.get_codes() if isinstance(exc.get_codes(), str) else exc.default_code
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        response = Response(error_body(401, code, str(exc.detail)), status=status.HTTP_401_UNAUTHORIZED)
        response["WWW-Authenticate"] = 'Bearer realm="gatehouse"'
        return response
    response = Response(error_body(exc.status_code, code, str(exc.detail)), status=exc.status_code)
    if getattr(exc, "wait", None):
        response["Retry-After"] = str(int(exc.wait))
    return response


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 100


def validated(serializer_class, request) -> dict:
    """The request body checked by an input serializer (a 400 in the one error shape when it is not valid)."""
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)
