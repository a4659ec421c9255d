"""Requests whose path or query string carries a NUL character are refused before any view. PostgreSQL cannot
hold NUL in text: a filter such as `?license=%00` or a path segment with one reached the database and answered
500 (SQLite compared it and found nothing). Bodies are checked where they are parsed (DRF's CharField refuses NUL)."""
from django.http import HttpResponse, JsonResponse

from gatehouse.core.api import error_body
from gatehouse.core.unavailable import wants_json

MESSAGE = "The URL contains a NUL character (%00), which no name, key or filter can contain; remove it."


def _has_nul(request) -> bool:
    query = request.META.get("QUERY_STRING", "")
    if "\x00" in request.path or "\x00" in request.path_info:
        return True
    if "%00" not in query and "\x00" not in query:  # the common case: nothing to decode
        return False
    return any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists())


def nul_response(request) -> HttpResponse:
    """A 400 in the error shape of the caller's API family (OpenAI's under /v1, ours for JSON), else plain text."""
    if request.path.startswith("/v1/"):
        response = JsonResponse({"error": {"message": MESSAGE, "type": "invalid_request_error", "param": None,
                                           "code": "invalid_characters"}}, status=400)
    elif wants_json(request):
        response = JsonResponse(error_body(400, "invalid_characters", MESSAGE), status=400)
    else:
        response = HttpResponse(MESSAGE, status=400, content_type="text/plain; charset=utf-8")
    response["X-Error-Code"] = "InvalidCharacters"  # what Hub clients read when there is no body (HEAD)
    response["X-Error-Message"] = MESSAGE
    return response


class NulCharacterMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if _has_nul(request):
            return nul_response(request)
        return self.get_response(request)
