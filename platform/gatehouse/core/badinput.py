"""A NUL character never reaches the database: PostgreSQL cannot hold one in text, so a filter such as
`?license=%00`, a path segment, a form field or a cookie carrying one answered 500 there (SQLite compared it and
found nothing). In the URL or a form body it is a 400 here, before any view; a cookie with one is dropped, as an
unknown session would be. JSON bodies are checked where they are parsed (gatehouse.core.parsers for the REST
API, the Hub's own parser; the gateway's only stored string is the model id). Multipart bodies under /api/ are left
to the API's parsers: reading them here would take the streaming of uploads away from its views."""
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse

from gatehouse.core.api import error_body
from gatehouse.core.unavailable import HUB_PATH, wants_json

MESSAGE = "The request contains a NUL character (%00 or \\u0000), which no name, key or text can hold; remove it."


# JSON may also escape half of a UTF-16 pair alone ("\ud800"): no database encodes that as UTF-8 (psycopg and sqlite3
# both raise: a 500), nor does an HTTP client forwarding it. Parsed JSON is refused for either.
JSON_MESSAGE = ("The request contains a NUL character (\\u0000) or an unpaired surrogate (such as \\ud800), which no "
                "name, key or text can hold; remove it.")


def _unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def contains_unstorable_text(value) -> bool:
    """Whether a parsed JSON value holds, in any string, key or value at any depth, a NUL or an unpaired surrogate:
    text nothing downstream can store or send."""
    if isinstance(value, str):
        return _unstorable(value)
    if isinstance(value, dict):
        return any(contains_unstorable_text(key) or contains_unstorable_text(item) for key, item in value.items())
    if isinstance(value, list):
        return any(contains_unstorable_text(item) for item in value)
    return False


def _in_fields(fields) -> bool:
    """Whether a QueryDict (a query string, a form) holds a NUL in a name or any of its values."""
    return any("\x00" in key or any("\x00" in value for value in values) for key, values in fields.lists())


def _in_url(request) -> bool:
    query = request.META.get("QUERY_STRING", "")
    if "\x00" in request.path or "\x00" in request.path_info:
        return True
    if "%00" not in query and "\x00" not in query:  # the common case: nothing to decode
        return False
    return _in_fields(request.GET)


def _in_form(request) -> bool:
    if request.method != "POST" or request.content_type not in ("application/x-www-form-urlencoded",
                                                                "multipart/form-data"):
        return False
    if request.content_type == "multipart/form-data" and request.path.startswith(("/api/", "/v1/")):
        return False  # uploads: parsed by the API's own parsers, streamed to storage
    try:
        return _in_fields(request.POST)
    except RequestDataTooBig:
        return False  # the view answers that in its own words


def nul_response(request) -> HttpResponse:
    """A 400 in the error shape of the caller's API family (OpenAI's under /v1, the Hub's, ours for JSON), else plain
    text."""
    if HUB_PATH.match(request.path):
        response = JsonResponse({"error": MESSAGE}, status=400)
    elif request.path.startswith("/v1/"):
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
        if any("\x00" in key or "\x00" in value for key, value in request.COOKIES.items()):
            request.COOKIES = {key: value for key, value in request.COOKIES.items()
                               if "\x00" not in key and "\x00" not in value}
        if _in_url(request) or _in_form(request):
            return nul_response(request)
        return self.get_response(request)
