"""OpenAPI schema plumbing (drf-spectacular): list detection for our GenericAPIViews and the documented
error responses every operation can give, in the one error shape of gatehouse.core.api."""
import inspect

from drf_spectacular import openapi

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "code", "message"], "properties": {
            "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"},
            "fields": {"type": "object", "additionalProperties": True,
                       "description": "Per-field messages, when the error is about specific inputs"}}}},
}
_ERROR_DESCRIPTIONS = {
    400: "The request is invalid; the message says what to change", 401: "Authentication required or failed",
    403: "The caller may not do this (role or token scope)", 404: "No such object, or not one the caller may see",
    409: "Conflicts with the current state", 413: "The request body is too large",
    415: "Unsupported content type", 429: "Too many requests; retry after Retry-After seconds",
}


def document_error_responses(result, generator, request, public):
    """drf-spectacular postprocessing hook: every operation documents the error responses it can give, all in
    the one error shape (schema component `Error`)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            locations = {p.get("in") for p in operation.get("parameters", [])}
            has_body = "requestBody" in operation
            codes = [401, 403, 429]
            if has_body or "query" in locations:
                codes.append(400)
            if "path" in locations or "query" in locations:
                codes.append(404)  # path objects, and pagination's unknown ?page=
            if has_body or method in ("post", "put", "patch", "delete"):
                codes += [400, 404, 409, 413, 415]  # 404: an object the body names does not exist or is hidden
            for code in sorted(set(codes)):
                operation["responses"].setdefault(str(code), {
                    "description": _ERROR_DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    return result


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's AutoSchema, which also knows a GET answering `self.get_paginated_response(...)` lists
    (it otherwise documents such a GenericAPIView as returning one object)."""

    def _is_list_view(self, serializer=None) -> bool:
        if self.method == "GET":
            handler = inspect.unwrap(getattr(getattr(self.view, "get", None), "__func__", None) or (lambda: None))
            if "get_paginated_response" in getattr(getattr(handler, "__code__", None), "co_names", ()):
                return True
        return super()._is_list_view(serializer)
