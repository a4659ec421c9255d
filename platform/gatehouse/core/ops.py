"""Operations: a request id on every request and response, one structured log line per request, liveness
(/healthz), readiness (/readyz: database, broker, storage, plus the checks apps register) and Prometheus
metrics (/metrics: request latency here, plus the collectors apps register). Apps built on gatehouse add
checks and metrics through settings (GATEHOUSE_READINESS_CHECKS, GATEHOUSE_METRICS_COLLECTORS), so this
module never imports them."""
import json
import logging
import re
import time
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.utils.functional import SimpleLazyObject, empty
from django.utils.module_loading import import_string
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("gatehouse.requests")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REGISTRY = CollectorRegistry()
LATENCY = Histogram("gatehouse_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
                    registry=REGISTRY, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


class RequestIdMiddleware:
    """X-Request-Id from the client (or nginx) when sane, else a new one; echoed back, and in the log line.
    Tokens never reach the log: only the path, not the query string, and never headers."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        given = request.headers.get("X-Request-Id", "")
        request.id = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        start = time.perf_counter()
        response = self.get_response(request)
        elapsed = time.perf_counter() - start
        response["X-Request-Id"] = request.id
        match = getattr(request, "resolver_match", None)
        route = match.route if match else "unmatched"
        LATENCY.labels(request.method, route, str(response.status_code)).observe(elapsed)
        log.info("request", extra={"request_id": request.id, "method": request.method, "path": request.path,
                                   "route": route, "status": response.status_code, "ms": round(elapsed * 1000, 2),
                                   "user": _user_id(request)})
        return response


def _user_id(request):
    """The user's id when something already looked the user up; never a database query of its own (this runs
    for every response, 503s during a database outage included)."""
    user = getattr(request, "user", None)
    if isinstance(user, SimpleLazyObject):
        user = user._wrapped  # `empty` until something evaluated it
    return None if user is empty else getattr(user, "pk", None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        line.update({k: v for k, v in vars(record).items() if k not in self.STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


@require_safe
def healthz(request):
    """Liveness: the process answers. Nothing else is checked (a database outage must not restart the web)."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return "ok"


# A probe of the broker gives up within about two seconds: a broker that is down must not stall /readyz or /metrics
# (kombu's defaults retry for much longer).
BROKER_PROBE = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "timeout": 2}


def _check_broker() -> str:
    from gatehouse.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(**BROKER_PROBE)
    return "ok"


def _check_storage() -> str:
    storage = storages["weights"]
    name = storage.save(f"readiness/{uuid.uuid4().hex}", ContentFile(b"ok"))
    storage.delete(name)
    return "ok"


# name -> (check, required): a failing required check makes the instance unready (503); others degrade it.
CORE_CHECKS = {"database": (_check_database, True), "broker": (_check_broker, False),
               "storage": (_check_storage, True)}


@require_safe
def readyz(request):
    """Readiness: 200 ready or degraded (reads still work, e.g. the broker is down), 503 when a required part
    (database, storage) fails. Each part reports ok or its error; `unavailable` lists the failing parts."""
    checks = dict(CORE_CHECKS)
    for dotted in settings.GATEHOUSE_READINESS_CHECKS:
        checks.update(import_string(dotted)())
    results, failed = {}, {"required": [], "optional": []}
    for name, (check, required) in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # any failure of a dependency is the answer, not a crash
            results[name] = f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
            failed["required" if required else "optional"].append(name)
    status = "unready" if failed["required"] else "degraded" if failed["optional"] else "ready"
    body = {"status": status, "checks": results}
    if status != "ready":
        body["unavailable"] = failed["required"] + failed["optional"]  # which parts, at a glance
    response = JsonResponse(body, status=503 if status == "unready" else 200)
    if status == "unready":
        response["Retry-After"] = "5"
    return response


class _AppMetrics:
    """Gauges computed at scrape time by the collectors apps register: each yields (name, help, value, labels)."""

    def collect(self):
        for dotted in settings.GATEHOUSE_METRICS_COLLECTORS:
            families = {}
            for name, help_text, value, labels in import_string(dotted)():
                family = families.setdefault(name, GaugeMetricFamily(name, help_text, labels=sorted(labels)))
                family.add_metric([str(labels[k]) for k in sorted(labels)], value)
            yield from families.values()


REGISTRY.register(_AppMetrics())


@require_safe
def metrics(request):
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def broker_metrics():
    """Tasks waiting in the broker's queues (Redis lists or the filesystem transport's files)."""
    from gatehouse.celery import app

    queues = {settings.CELERY_TASK_DEFAULT_QUEUE, settings.TRAINING_QUEUE}
    url = settings.CELERY_BROKER_URL
    if url.startswith("redis"):
        try:
            with app.connection_for_read() as conn:
                conn.ensure_connection(**BROKER_PROBE)  # once, and briefly: Redis down must not stall the scrape
                depths = {queue: conn.default_channel.client.llen(queue) for queue in sorted(queues)}
        except Exception:  # an unreachable broker is readiness' news; metrics stay up
            return
        for queue, depth in depths.items():
            yield "gatehouse_queue_depth", "Tasks waiting in a queue", depth, {"queue": queue}
        return
    if not url.startswith("filesystem"):
        return
    folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]
    for queue in sorted(queues):
        try:
            depth = sum(1 for _ in Path(folder).glob(f"*.{queue}.msg"))  # kombu's file naming
        except OSError:
            continue
        yield "gatehouse_queue_depth", "Tasks waiting in a queue", depth, {"queue": queue}


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


class ContentSecurityPolicyMiddleware:
    """Our pages run only our own scripts and styles (no inline script, nothing from elsewhere), so a card or
    a name that slipped past sanitizing still cannot run. Swagger UI and the admin keep their own inline code."""

    EXEMPT = ("/api/docs/", "/admin/")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.get("Content-Type", "").startswith("text/html") and not request.path.startswith(self.EXEMPT):
            response.setdefault("Content-Security-Policy", CSP)
        return response
