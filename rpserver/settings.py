"""rpserver's settings, driven by environment variables (all prefixed RPSERVER_).

Each variable is read through a small typed helper that raises
ImproperlyConfigured on a bad value, so a typo fails at start-up, not later.
docs/configuration.md lists every variable (tests/test_docs.py checks that it does).
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from rpserver.datadir import data_dir, stored_secret_key

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name, default=""):
    return os.environ.get(name, default)


def env_int(name, default, minimum=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_bool(name, default):
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be 0/1/true/false, got {raw!r}")


def env_choice(name, default, choices):
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def env_database(name, default):
    try:
        return dj_database_url.parse(env_str(name, default), conn_max_age=0)
    except ValueError as exc:  # the URL itself is not echoed: it may hold a password
        raise ImproperlyConfigured(f"{name} is not a database URL ({exc}); e.g. postgres://user:password@host/rpserver")


def env_list(name, default):
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("RPSERVER_DEBUG", False)
ALLOWED_HOSTS = env_list("RPSERVER_ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = env_list("RPSERVER_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "rpserver",  # the project's own commands: serve, remove_orphan_files (rpserver/management/commands)
    "accounts",
    "limits",
    "locks",
    "characters",
    "personas",
    "lore",
    "chat",
    "archive",
    "inference",
    "web",
    "statecache",
    "openai_api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "rpserver.envelope.JsonErrorMiddleware",
]

ROOT_URLCONF = "rpserver.urls"
ASGI_APPLICATION = "rpserver.asgi.application"
APPEND_SLASH = False

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

# Data: SQLite in the checkout by default; RPSERVER_DATABASE_URL for PostgreSQL.
DATA_DIR = data_dir("RPSERVER_DATA_DIR", BASE_DIR)  # must exist and be writable
# Unset, a random key is generated on the first start and kept in the data
# directory (secret_key, mode 0600), so no published key ever signs anything.
SECRET_KEY = env_str("RPSERVER_SECRET_KEY") or stored_secret_key(DATA_DIR)
DATABASES = {
    "default": env_database("RPSERVER_DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers and the writer work at once; IMMEDIATE transactions
    # take the write lock up front, so two writers queue instead of failing
    # with "database is locked" when one upgrades from a read.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Wherever a password is set: createuser, signup, the admin's forms.
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env_str("RPSERVER_MEDIA_ROOT", str(DATA_DIR / "media")))

# State blobs and avatars go through Django's storage API: local files by
# default, an S3-compatible bucket when RPSERVER_S3_BUCKET is set.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Hashed names, gzip, long caching: web/storage.py says how (needs `manage.py collectstatic`).
    "staticfiles": {"BACKEND": "web.storage.HashedCompressedStaticFiles"},
}
if env_str("RPSERVER_S3_BUCKET"):
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("RPSERVER_S3_BUCKET"),
            "endpoint_url": env_str("RPSERVER_S3_ENDPOINT_URL") or None,
            "file_overwrite": False,
        },
    }
WHITENOISE_USE_FINDERS = True

# The legacy UI is served from another origin and sends no cookies: the API
# routes answer every origin, or only these (rpserver/pipeline.py adds the headers).
CORS_ALLOWED_ORIGINS = env_list("RPSERVER_CORS_ORIGINS", [])

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.auth.LegacyTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # The pipeline (rpserver/pipeline.py) parsed the body already, for views and streams alike.
    "DEFAULT_PARSER_CLASSES": ["rpserver.pipeline.FieldsParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "rpserver.envelope.exception_handler",
    "UNAUTHENTICATED_USER": None,
}

# No channel layer: a stream is written by the process that took its request
# (the engine's tokens never cross processes), and no consumer sends to
# another, so several processes need no Redis (tests/test_scaleout.py).

# rpserver itself. The model settings are what `serve` flags override.
RPSERVER = {
    "MODEL": env_str("RPSERVER_MODEL"),
    "DEMO_MODEL": BASE_DIR / "model" / "demo-rwkv7.pth",
    "STRATEGY": env_str("RPSERVER_STRATEGY", "auto"),
    "BACKEND": env_choice("RPSERVER_BACKEND", "auto", ("auto", "rwkv")),
    "MAX_REPLY_TOKENS": env_int("RPSERVER_MAX_REPLY_TOKENS", 512, minimum=1),
    "MAX_PROMPT_CHARS": env_int("RPSERVER_MAX_PROMPT_CHARS", 4000, minimum=1),
    "MAX_PERSONA_CHARS": env_int("RPSERVER_MAX_PERSONA_CHARS", 20000, minimum=1),
    "MAX_AVATAR_BYTES": env_int("RPSERVER_MAX_AVATAR_BYTES", 2 * 1024 * 1024, minimum=1),
    "MAX_AVATAR_PIXELS": env_int("RPSERVER_MAX_AVATAR_PIXELS", 4096 * 4096, minimum=1),
    # Character cards (characters/cards.py): the file imported, and the card's JSON inside it.
    "MAX_CARD_FILE_BYTES": env_int("RPSERVER_MAX_CARD_FILE_BYTES", 3 * 1024 * 1024, minimum=1024),
    "MAX_CARD_JSON_BYTES": env_int("RPSERVER_MAX_CARD_JSON_BYTES", 1024 * 1024, minimum=1024),
    # Chat files (chat/transfer.py, docs/import-export.md): the JSONL file imported, its messages.
    "MAX_CHAT_FILE_BYTES": env_int("RPSERVER_MAX_CHAT_FILE_BYTES", 2 * 1024 * 1024, minimum=1024),
    "MAX_CHAT_MESSAGES": env_int("RPSERVER_MAX_CHAT_MESSAGES", 2000, minimum=1),
    "TOKEN_TTL_HOURS": env_int("RPSERVER_TOKEN_TTL_HOURS", 24 * 30, minimum=1),
    "ALLOW_SIGNUP": env_bool("RPSERVER_ALLOW_SIGNUP", True),
    # Locks (locks/services.py): a process silent this long is dead and its locks are freed.
    "LOCK_DEAD_AFTER_SECONDS": env_int("RPSERVER_LOCK_DEAD_AFTER_SECONDS", 20, minimum=2),
    "INSTANCE_HOST": env_str("RPSERVER_INSTANCE_HOST"),
    # Trust X-Forwarded-For for the client's address (only behind a proxy that sets it: deploy/nginx.conf).
    "TRUST_X_FORWARDED_FOR": env_bool("RPSERVER_TRUST_X_FORWARDED_FOR", False),
    "SHUTDOWN_GRACE_SECONDS": env_int("RPSERVER_SHUTDOWN_GRACE_SECONDS", 5, minimum=0),
    "MAX_BODY_BYTES": env_int("RPSERVER_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024),
    "MAX_FIELDS": env_int("RPSERVER_MAX_FIELDS", 100, minimum=1),
    "MAX_JSON_DEPTH": env_int("RPSERVER_MAX_JSON_DEPTH", 20, minimum=2),
    # Abuse limits (limits/services.py); a rate of 0 turns that limit off.
    "LIMITS": {
        "LOGIN_FREE_FAILURES_PER_ACCOUNT": env_int("RPSERVER_LOGIN_FREE_FAILURES_PER_ACCOUNT", 5, minimum=0),
        "LOGIN_FREE_FAILURES_PER_ADDRESS": env_int("RPSERVER_LOGIN_FREE_FAILURES_PER_ADDRESS", 20, minimum=0),
        "LOGIN_BACKOFF_SECONDS": env_int("RPSERVER_LOGIN_BACKOFF_SECONDS", 2, minimum=1),
        "LOGIN_BACKOFF_MAX_SECONDS": env_int("RPSERVER_LOGIN_BACKOFF_MAX_SECONDS", 900, minimum=1),
        "LOGIN_FAILURE_WINDOW_SECONDS": env_int("RPSERVER_LOGIN_FAILURE_WINDOW_SECONDS", 3600, minimum=1),
        "GUESTS_PER_HOUR_PER_ADDRESS": env_int("RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS", 30, minimum=0),
        "SIGNUPS_PER_HOUR_PER_ADDRESS": env_int("RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS", 10, minimum=0),
        "REPLIES_PER_MINUTE": env_int("RPSERVER_REPLIES_PER_MINUTE", 30, minimum=0),
        "MAX_REPLIES_PER_USER": env_int("RPSERVER_MAX_REPLIES_PER_USER", 2, minimum=0),
        "GUEST_MAX_CHARACTERS": env_int("RPSERVER_GUEST_MAX_CHARACTERS", 20, minimum=0),
        "GUEST_MAX_AVATAR_BYTES": env_int("RPSERVER_GUEST_MAX_AVATAR_BYTES", 256 * 1024, minimum=0),
    },
    # The state policy (chat.tree.kept_states) and the budgets of what each owner's rounds pin
    # (chat.states.keep_within_budget); 0: no limit of that kind.
    "STATE_CHECKPOINT_EVERY": env_int("RPSERVER_STATE_CHECKPOINT_EVERY", 8, minimum=1),
    "STATE_BUDGET_MB": env_int("RPSERVER_STATE_BUDGET_MB", 2048, minimum=0),
    "STATE_BUDGET_COUNT": env_int("RPSERVER_STATE_BUDGET_COUNT", 0, minimum=0),
    "GUEST_STATE_BUDGET_COUNT": env_int("RPSERVER_GUEST_STATE_BUDGET_COUNT", 8, minimum=0),
    "PREFILL_CHUNK": env_int("RPSERVER_PREFILL_CHUNK", 256, minimum=1),
    "MAX_BATCH": env_int("RPSERVER_MAX_BATCH", 32, minimum=1),
    "THREADS": env_int("RPSERVER_THREADS", 0, minimum=0),
    "PREFILL_THREADS": env_int("RPSERVER_PREFILL_THREADS", 0, minimum=0),
    "ADAPT_THREADS": env_bool("RPSERVER_ADAPT_THREADS", True),
    # /metrics answers only with this bearer token; unset, the route does not exist.
    "METRICS_TOKEN": env_str("RPSERVER_METRICS_TOKEN"),
    # The shared state cache (statecache/) and the OpenAI-compatible API (openai_api/).
    "STATE_CACHE_MB": env_int("RPSERVER_STATE_CACHE_MB", 512, minimum=0),
    "STATE_CACHE_DISK_MB": env_int("RPSERVER_STATE_CACHE_DISK_MB", 4096, minimum=0),
    "OPENAI_ANONYMOUS": env_bool("RPSERVER_OPENAI_ANONYMOUS", False),
    "OPENAI_MODEL_NAME": env_str("RPSERVER_OPENAI_MODEL_NAME"),
    "OPENAI_MAX_PROMPT_TOKENS": env_int("RPSERVER_OPENAI_MAX_PROMPT_TOKENS", 65536, minimum=1),
}

# The API's body limit is the pipeline's (rpserver/pipeline.py); Django's own, for the admin's forms, is the same.
DATA_UPLOAD_MAX_MEMORY_SIZE = RPSERVER["MAX_BODY_BYTES"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("RPSERVER_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
