"""One env-driven settings module.

With no environment at all Gatehouse runs embedded: SQLite, local weight storage and a Celery
filesystem broker, all under var/. Production differs only by environment variables:
DATABASE_URL, CELERY_BROKER_URL, GATEHOUSE_STORAGE=s3 (+ AWS_*), DEBUG, SECRET_KEY, ALLOWED_HOSTS.
"""
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

# Secrets come from the environment or from files (Docker and Kubernetes secrets): NAME_FILE=/run/secrets/x sets
# NAME to that file's content, before anything reads it (boto3 reads the AWS_* names itself). Never from code.
SECRET_NAMES = ("SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "GATEHOUSE_CACHE_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY")


def _secrets_from_files() -> None:
    for name in SECRET_NAMES:
        path = os.environ.get(f"{name}_FILE")
        if not path:
            continue
        if os.environ.get(name):
            raise ImproperlyConfigured(f"Both {name} and {name}_FILE are set; keep one.")
        try:
            os.environ[name] = Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path} cannot be read: {exc.strerror}.") from None


_secrets_from_files()
REPO_DIR = Path(__file__).resolve().parents[2]
VAR_DIR = Path(os.environ.get("GATEHOUSE_VAR_DIR", REPO_DIR / "var")).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def envbool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "")
    if value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def envfloat(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from exc


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once into var/ (never committed)."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    path = VAR_DIR / "secret_key"
    if not path.exists():
        # O_EXCL: two processes starting together must not write two different keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(50))
        except FileExistsError:
            pass
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = envbool("DEBUG")
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

# Behind a TLS-terminating proxy (infra/nginx.conf): GATEHOUSE_TLS=1 makes cookies secure, redirects plain
# HTTP, sends HSTS, and trusts the proxy's X-Forwarded-Proto. `manage.py check --deploy` is clean with it.
if envbool("GATEHOUSE_TLS"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]  # probes come over plain HTTP inside
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("GATEHOUSE_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("GATEHOUSE_HSTS_INCLUDE_SUBDOMAINS")
    SECURE_HSTS_PRELOAD = envbool("GATEHOUSE_HSTS_PRELOAD")
SILENCED_SYSTEM_CHECKS = []
if envbool("GATEHOUSE_TLS") and not envbool("GATEHOUSE_HSTS_INCLUDE_SUBDOMAINS"):
    # HSTS for subdomains and preload lists bind every host of the domain for a year: the operator's call.
    SILENCED_SYSTEM_CHECKS += ["security.W005", "security.W021"]

INSTALLED_APPS = [
    "gatehouse.core",  # first, so its `runserver` (TCP_NODELAY) wins over staticfiles'
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "gatehouse.accounts",
    "gatehouse.audit",
    "gatehouse.registry",
    "gatehouse.webhooks",
    "gatehouse.web",
    "releases",
]

MIDDLEWARE = [
    "gatehouse.core.ops.RequestIdMiddleware",
    "gatehouse.core.unavailable.UnavailableMiddleware",  # database/broker/storage down: 503 + Retry-After
    "gatehouse.core.badinput.NulCharacterMiddleware",  # a NUL in the URL: 400 before any view or query
    "gatehouse.core.ops.ContentSecurityPolicyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gatehouse.urls"
WSGI_APPLICATION = "gatehouse.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'gatehouse.sqlite3'}",
        # Persistent connections: opening one costs more than a whole list request on PostgreSQL.
        conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"].startswith("django.db.backends.postgresql"):
    # An unreachable or restarting database must fail a request within seconds (a 503), never hang it.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", int(os.environ.get("GATEHOUSE_DB_CONNECT_TIMEOUT", "5")))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the worker write to one file: WAL lets readers run beside a writer,
    # IMMEDIATE takes the write lock up front so two writers queue instead of deadlocking.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files and weight storage --------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True  # `make run` works before collectstatic; no CDN anywhere.

GATEHOUSE_STORAGE = os.environ.get("GATEHOUSE_STORAGE", "local")
if GATEHOUSE_STORAGE == "local":
    WEIGHTS_STORAGE = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.environ.get("GATEHOUSE_WEIGHTS_DIR") or str(VAR_DIR / "weights")},
    }
elif GATEHOUSE_STORAGE == "s3":
    if not os.environ.get("AWS_STORAGE_BUCKET_NAME"):
        raise ImproperlyConfigured("GATEHOUSE_STORAGE=s3 needs AWS_STORAGE_BUCKET_NAME")
    WEIGHTS_STORAGE = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ["AWS_STORAGE_BUCKET_NAME"],
            "endpoint_url": os.environ.get("AWS_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("AWS_S3_REGION_NAME") or None,
            "querystring_expire": int(os.environ.get("AWS_QUERYSTRING_EXPIRE", "300")),
            "signature_version": os.environ.get("AWS_S3_SIGNATURE_VERSION", "s3v4"),
            "file_overwrite": False,
        },
    }
else:
    raise ImproperlyConfigured(f"GATEHOUSE_STORAGE must be local or s3, not {GATEHOUSE_STORAGE!r}")

# Downloads: behind nginx, set the internal location that maps to the weights folder (infra/nginx.conf) and
# nginx sends the bytes; with S3 the client is redirected to a presigned URL valid this long.
GATEHOUSE_ACCEL_REDIRECT_PREFIX = os.environ.get("GATEHOUSE_ACCEL_REDIRECT_PREFIX", "")
GATEHOUSE_PRESIGNED_SECONDS = int(os.environ.get("GATEHOUSE_PRESIGNED_SECONDS", "300"))
GATEHOUSE_HUB_PAGE_SIZE = int(os.environ.get("GATEHOUSE_HUB_PAGE_SIZE", "1000"))

# Extra panels on the model page, each `f(request, model) -> html`: how apps built on gatehouse add to it
# without gatehouse importing them.
GATEHOUSE_MODEL_PAGE_PANELS = ["releases.views.model_page_panel"]
# Extra catalog sorts, name -> `f(queryset) -> queryset` (downloads are counted by the releases app).
GATEHOUSE_MODEL_LIST_SORTS = {"downloads": "releases.views.sort_by_downloads"}
# Operations (gatehouse.core.ops): extra readiness checks and Prometheus gauges from the apps.
GATEHOUSE_READINESS_CHECKS = ["releases.ops.readiness_checks"]
GATEHOUSE_METRICS_COLLECTORS = ["gatehouse.core.ops.broker_metrics", "gatehouse.registry.ops.metrics",
                                "releases.ops.metrics"]

# Credential guessing: this many bad tokens or failed logins from one address (or for one username) within
# the window, and further attempts are refused with 429 until it passes. Counted in the cache: set
# GATEHOUSE_CACHE_URL (redis://…) so all web processes share the counts.
AUTH_FAILURES_PER_WINDOW = int(os.environ.get("GATEHOUSE_AUTH_FAILURES_PER_WINDOW", "20"))
AUTH_FAILURE_WINDOW_SECONDS = int(os.environ.get("GATEHOUSE_AUTH_FAILURE_WINDOW_SECONDS", "900"))
# Access requests: at most this many per person per window, across all models (reviewers are people).
ACCESS_REQUESTS_PER_USER_PER_WINDOW = int(os.environ.get("GATEHOUSE_ACCESS_REQUESTS_PER_USER_PER_WINDOW", "10"))
ACCESS_REQUEST_WINDOW_SECONDS = int(os.environ.get("GATEHOUSE_ACCESS_REQUEST_WINDOW_SECONDS", "3600"))
# How many proxies in front append to X-Forwarded-For (nginx as in infra/: 1). 0 trusts none of it.
TRUSTED_PROXY_HOPS = int(os.environ.get("GATEHOUSE_TRUSTED_PROXY_HOPS", "0"))
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                      "LOCATION": os.environ["GATEHOUSE_CACHE_URL"]}
          if os.environ.get("GATEHOUSE_CACHE_URL") else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Inference quotas (0: unlimited), counted from the metered calls, so they hold across web processes.
INFERENCE_RPM_PER_TOKEN = int(os.environ.get("GATEHOUSE_INFERENCE_RPM_PER_TOKEN", "60"))
INFERENCE_TOKENS_PER_DAY_PER_TOKEN = int(os.environ.get("GATEHOUSE_INFERENCE_TOKENS_PER_DAY_PER_TOKEN", "200000"))
INFERENCE_RPM_PER_ORGANIZATION = int(os.environ.get("GATEHOUSE_INFERENCE_RPM_PER_ORGANIZATION", "600"))
INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = int(os.environ.get("GATEHOUSE_INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION",
                                                               "2000000"))
INFERENCE_BACKEND_TIMEOUT_SECONDS = float(os.environ.get("GATEHOUSE_INFERENCE_BACKEND_TIMEOUT_SECONDS", "300"))
# A call still in flight this long after it started was abandoned (a stream may outlast the backend timeout, which
# bounds each wait for the next event, not the whole answer).
INFERENCE_ABANDONED_SECONDS = int(os.environ.get("GATEHOUSE_INFERENCE_ABANDONED_SECONDS", "3600"))
# The engine supervisor (manage.py serve_engines): a GPU engine compiles and captures every shape before it opens
# its port (minutes); a running engine that stops answering /health this long is taken for hung and restarted.
ENGINE_START_TIMEOUT_SECONDS = float(os.environ.get("GATEHOUSE_ENGINE_START_TIMEOUT_SECONDS", "1800"))
ENGINE_UNRESPONSIVE_SECONDS = float(os.environ.get("GATEHOUSE_ENGINE_UNRESPONSIVE_SECONDS", "60"))
# The context a local engine serves at most: its KV cache holds --max-batch times it, and public checkpoints
# declare up to 131,072 positions (a cache that size for 32 requests of an 8B model would be ~0.5 TB).
ENGINE_MAX_SEQ_LEN = int(os.environ.get("GATEHOUSE_ENGINE_MAX_SEQ_LEN", "8192"))

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": str(VAR_DIR / "media")}},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "weights": WEIGHTS_STORAGE,
}
# Uploads above this size spool to a temporary file, so a weight file is never held in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_TEMP_DIR = None

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "celery" / "queue"
    _processed_dir = VAR_DIR / "celery" / "processed"
    _control_dir = VAR_DIR / "celery" / "control"
    for _d in (_queue_dir, _processed_dir, _control_dir):
        _d.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(_processed_dir),
        "store_processed": False,
        "control_folder": str(_control_dir),
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A task taken by a worker that dies (kill -9, lost node) goes back to the queue once it has been unacked
    # this long. It must exceed the longest countdown (webhook retries: 160 s) and the usual task run time; a
    # longer task is redelivered meanwhile, which is harmless since every task claims its work first.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": int(os.environ.get("GATEHOUSE_BROKER_VISIBILITY_TIMEOUT", "900")),
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("GATEHOUSE_DEFAULT_QUEUE", "default")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # a pool child killed mid-task: requeue the message, do not ack it
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "apply-due-releases": {"task": "releases.tasks.apply_due_releases_task",
                           "schedule": float(os.environ.get("RELEASE_SCHEDULER_INTERVAL_SECONDS", "60"))},
    "requeue-stale-training-runs": {"task": "gatehouse.registry.tasks.requeue_stale_training_runs_task",
                                    "schedule": float(os.environ.get("TRAINING_REAPER_INTERVAL_SECONDS", "10"))},
    # Work whose task was lost (the filesystem broker forgets a message its worker took and died with; a broker
    # that was down when the work was committed) is queued again: pending verifications, webhook deliveries.
    "redeliver-stranded-work": {"task": "gatehouse.core.tasks.redeliver_stranded_work_task",
                                "schedule": float(os.environ.get("GATEHOUSE_REDELIVERY_INTERVAL_SECONDS", "60"))},
    "finish-abandoned-inference-calls": {"task": "releases.tasks.finish_abandoned_inference_calls_task",
                                         "schedule": float(os.environ.get("GATEHOUSE_INFERENCE_SWEEP_INTERVAL_SECONDS",
                                                                          "300"))},
}
# Pending work untouched for this long counts as stranded (well above a normal queue wait and task run).
GATEHOUSE_STRANDED_WORK_SECONDS = int(os.environ.get("GATEHOUSE_STRANDED_WORK_SECONDS", "600"))
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celery" / "beat-schedule")

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "gatehouse.accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["gatehouse.accounts.permissions.HasScope"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "gatehouse.core.api.Pagination",
    # JSON bodies are held to DATA_UPLOAD_MAX_MEMORY_SIZE (a 413) and their nesting depth (a 400), unlike DRF's own.
    "DEFAULT_PARSER_CLASSES": ["gatehouse.core.parsers.JSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    "DEFAULT_SCHEMA_CLASS": "gatehouse.core.openapi.AutoSchema",  # knows paginated GenericAPIView lists
    "EXCEPTION_HANDLER": "gatehouse.core.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Gatehouse API",
    "DESCRIPTION": "Registry of foundation models: versions, files, datasets, licenses, compute, "
    "evaluations and risk assessments. Authenticate with `Authorization: Bearer <token>`.",
    "VERSION": "1.0.0",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Every operation documents its error responses in the one error shape (gatehouse.core.openapi).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "gatehouse.core.openapi.document_error_responses"],
    "ENUM_NAME_OVERRIDES": {
        "TierEnum": "gatehouse.registry.models.Tier",
        "VersionStatusEnum": "gatehouse.registry.models.ModelVersion.Status",
        "TrainingRunStatusEnum": "gatehouse.registry.models.TrainingRun.Status",
    },
}

# --- Gatehouse domain knobs -----------------------------------------------------------------
# Ingest refuses a safetensors header larger than this (the format's own reference loader uses 100 MB).
SAFETENSORS_MAX_HEADER_BYTES = int(os.environ.get("SAFETENSORS_MAX_HEADER_BYTES", str(100 * 1024 * 1024)))
# Grid carbon intensity (kg CO2e per kWh) used when a compute record gives energy but no emissions.
GRID_INTENSITY_KG_PER_KWH = envfloat("GRID_INTENSITY_KG_PER_KWH", 0.4)
# Default power-usage effectiveness of the data centre when energy is estimated from device power.
DATACENTER_PUE = envfloat("DATACENTER_PUE", 1.2)
# Price per device-hour (USD) and board power (watts) by hardware name; unknown hardware costs nothing
# and must state its energy explicitly.
COMPUTE_PRICE_TABLE = {
    "H100-SXM": {"usd_per_hour": envfloat("PRICE_H100_SXM", 2.50), "watts": 700, "peak_flops": 989e12},
    "H200": {"usd_per_hour": envfloat("PRICE_H200", 3.50), "watts": 700, "peak_flops": 989e12},
    "A100-80GB": {"usd_per_hour": envfloat("PRICE_A100_80GB", 1.50), "watts": 400, "peak_flops": 312e12},
    "CPU": {"usd_per_hour": envfloat("PRICE_CPU", 0.05), "watts": 65, "peak_flops": 2.07e11},
}
API_TOKEN_LAST_USED_RESOLUTION_SECONDS = 60
# Webhooks go only to public addresses, or they would let admins make our servers call internal services (SSRF).
# On-premises receivers on loopback or private networks (and tests' local receivers) need this on; link-local
# (cloud metadata), multicast, reserved and unspecified addresses stay refused regardless.
WEBHOOK_ALLOW_PRIVATE_URLS = envbool("GATEHOUSE_WEBHOOK_ALLOW_PRIVATE_URLS")

# --- Release governance --------------------------------------------------------------------
# The framework whose tracked domains every release must have fresh assessments for.
RELEASE_RISK_FRAMEWORK = os.environ.get("RELEASE_RISK_FRAMEWORK", "openai-preparedness")
RELEASE_MAX_ASSESSMENT_AGE_DAYS = int(os.environ.get("RELEASE_MAX_ASSESSMENT_AGE_DAYS", "180"))
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "gatehouse@localhost")

# --- Training runs --------------------------------------------------------------------------
# Runs work under TRAINING_ROOT/<run id>; dataset versions may read folders under GATEHOUSE_DATA_ROOT only.
TRAINING_ROOT = Path(os.environ.get("GATEHOUSE_TRAINING_ROOT") or VAR_DIR / "training")
GATEHOUSE_DATA_ROOT = Path(os.environ.get("GATEHOUSE_DATA_ROOT") or VAR_DIR / "datasets")
# GPU workers consume "gpu"; the embedded worker consumes both queues, so "gpu" works everywhere.
TRAINING_QUEUE = os.environ.get("GATEHOUSE_TRAINING_QUEUE", "gpu")
# A running run whose worker has not written a heartbeat for this long is requeued (it resumes from its
# last checkpoint). Worker heartbeats come every couple of seconds.
TRAINING_HEARTBEAT_STALE_SECONDS = int(os.environ.get("TRAINING_HEARTBEAT_STALE_SECONDS", "30"))
TRAINING_PYTHON = os.environ.get("GATEHOUSE_TRAINING_PYTHON", "")  # default: the worker's own interpreter
# Multi-node: each node's gpu worker joins torchrun's rendezvous at node 0 (see README, Deploying).
TRAINING_NNODES = int(os.environ.get("GATEHOUSE_TRAINING_NNODES", "1"))
TRAINING_NODE_RANK = int(os.environ.get("GATEHOUSE_TRAINING_NODE_RANK", "0"))
TRAINING_RDZV_ENDPOINT = os.environ.get("GATEHOUSE_TRAINING_RDZV_ENDPOINT", "")
TRAINING_RDZV_ID = os.environ.get("GATEHOUSE_TRAINING_RDZV_ID", "gatehouse")

# GATEHOUSE_LOG_FORMAT=json: one JSON object per line (production), with a line per request carrying its
# X-Request-Id; the default is plain text, and runserver prints its own request lines.
LOG_JSON = os.environ.get("GATEHOUSE_LOG_FORMAT", "text") == "json"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "gatehouse.core.ops.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", **({"formatter": "json"} if LOG_JSON else {})}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
    "loggers": {"gatehouse.requests": {"level": "INFO" if LOG_JSON else "WARNING"}},
}
