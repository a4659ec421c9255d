"""A dependency that is down is a 503, never a 500: the database (restarting, unreachable, connection dropped),
the task broker (Redis down while a request queues work) or weight storage (an upload's bytes could not be
written). Clients get `Retry-After` and, for programs, the error shape of the API family they speak (ours,
OpenAI's, the Hub's headers); browsers get a plain page that needs neither templates nor the database.

The web process is not restarted to recover: a dead persistent database connection is dropped at the end of
the request that hit it (CONN_HEALTH_CHECKS checks the next one before use), so the first request after the
database is back is served normally.

Two hooks: `process_exception` answers for errors raised by a view; for errors raised elsewhere in the
middleware stack (a session saved after the view, say), Django has already turned them into a 500 response by
the time they reach us, so a `got_request_exception` receiver marks the request and the middleware swaps
that 500 for a 503.
"""
import logging
import re
import sys

from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

from gatehouse.core.errors import ApplicationError

log = logging.getLogger("gatehouse.unavailable")
RETRY_AFTER_SECONDS = 5
JSON_PATH = re.compile(r"^/(api|v1)/|^/(healthz|readyz|metrics)$|^/[^/]+/[^/]+/resolve/")
# The Hub's API (huggingface_hub's calls): its errors are {"error": "<message>"}, as releases.hub answers them.
HUB_PATH = re.compile(r"^/api/(models|whoami-v2)(/|$)|^/[^/]+/[^/]+/resolve/")
_MARK = "_gatehouse_unavailable"


class ServiceUnavailable(ApplicationError):
    """Raised by services when a dependency fails in a way the client should simply retry later."""

    status = 503
    code = "unavailable"
    retry_after = RETRY_AFTER_SECONDS

    def __init__(self, message: str, *, component: str = "service", code: str | None = None):
        super().__init__(message, code=code)
        self.component = component


def dependency_down(exc: BaseException) -> str | None:
    """Which dependency `exc` says is unavailable ("database", "broker", "storage"), or None for anything else."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return "database"
    if isinstance(exc, ServiceUnavailable):
        return exc.component
    try:
        from kombu.exceptions import OperationalError as BrokerOperationalError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return None
    if isinstance(exc, BrokerOperationalError):
        return "broker"
    return None


def wants_json(request) -> bool:
    if JSON_PATH.match(request.path):
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Temporarily unavailable · Gatehouse</title></head>
<body><h1>Temporarily unavailable</h1>
<p>Gatehouse cannot reach its {component} at the moment. Nothing you sent was lost or half-saved:
please try again in a few seconds.</p></body></html>
"""


def unavailable_response(request, component: str) -> HttpResponse:
    """The 503 for `request`: JSON in the caller's API family, or a plain HTML page for browsers."""
    message = f"The service is temporarily unavailable ({component}); retry in {RETRY_AFTER_SECONDS} seconds."
    if HUB_PATH.match(request.path):
        response = JsonResponse({"error": message}, status=503)
    elif request.path.startswith("/v1/"):  # the OpenAI-compatible gateway: OpenAI's error shape
        response = JsonResponse({"error": {"message": message, "type": "service_unavailable", "param": None,
                                           "code": "service_unavailable"}}, status=503)
    elif wants_json(request):
        from gatehouse.core.api import error_body

        response = JsonResponse(error_body(503, "unavailable", message), status=503)
    else:
        response = HttpResponse(PAGE.format(component=component), status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["X-Error-Code"] = "ServiceUnavailable"  # what Hub clients read when there is no body (HEAD)
    response["X-Error-Message"] = message
    response["Cache-Control"] = "no-store"
    return response


def _note(request, exc: BaseException, component: str) -> None:
    log.warning("dependency unavailable: %s: %s: %s", component, exc.__class__.__name__, str(exc)[:300],
                extra={"request_id": getattr(request, "id", None), "path": request.path, "component": component})


def _mark_request(sender, request=None, **kwargs):
    """got_request_exception runs inside Django's `except` block: remember what the 500 was about."""
    exc = sys.exc_info()[1]
    if request is not None and exc is not None:
        component = dependency_down(exc)
        if component:
            setattr(request, _MARK, (component, exc))


got_request_exception.connect(_mark_request, dispatch_uid="gatehouse.core.unavailable")


class UnavailableMiddleware:
    """Database, broker and storage outages become 503 with Retry-After (see the module docstring)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        marked = getattr(request, _MARK, None)
        if marked and response.status_code == 500:
            component, exc = marked
            _note(request, exc, component)
            return unavailable_response(request, component)
        return response

    def process_exception(self, request, exc):
        component = dependency_down(exc)
        if component is None:
            return None  # a bug: Django logs it and answers 500
        _note(request, exc, component)
        return unavailable_response(request, component)
