"""Production settings: DEBUG is off unless asked for, ``manage.py check --deploy`` finds
nothing, the REST schema generates without a warning, and HTTPS is enforced (redirect, HSTS)
except for the health checks. Each runs in a fresh interpreter on production's environment,
none of the suite's development settings."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# What a deployment that configured nothing else would set.
PRODUCTION = {
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "TESSERA_SUITE_SEED": secrets.token_hex(16),
    "DJANGO_ALLOWED_HOSTS": "tessera.example.org,testserver",
}
UNSET_PREFIXES = ("DJANGO_", "CELERY_", "TESSERA_", "PYTEST_")


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(UNSET_PREFIXES) and key not in ("DATABASE_URL", "REDIS_URL")
    }
    # A private var/: nothing a check or a request writes lands in the checkout's.
    env.update(PRODUCTION, TESSERA_VAR_DIR=str(tmp_path / "var"), **extra)
    return env


# Requests through the whole middleware stack with Django's test client. /api/v1/me/ answers
# 401 to nobody before touching the database, so no database is needed.
REQUESTS = """
import json, django
django.setup()
from django.conf import settings
from django.test import Client, RequestFactory
from django.http import HttpResponse
from django.middleware.security import SecurityMiddleware

client = Client()
plain = client.get("/api/v1/me/")
secure = client.get("/api/v1/me/", secure=True)
proxied = client.get("/api/v1/me/", headers={"X-Forwarded-Proto": "https"})
# The inference server's health check, over plain HTTP: its answer, not a redirect.
middleware = SecurityMiddleware(lambda request: HttpResponse("ok"))
health = middleware(RequestFactory().get("/healthz"))
print(json.dumps({
    "debug": settings.DEBUG,
    "plain": [plain.status_code, plain.headers.get("Location")],
    "secure": [secure.status_code, secure.headers.get("Strict-Transport-Security")],
    "secure_headers": {k: secure.headers.get(k) for k in
        ("X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options")},
    "proxied": [proxied.status_code, proxied.headers.get("Strict-Transport-Security")],
    "health": [health.status_code, health.content.decode()],
    "cookies_secure": [settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE],
}))
"""


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`check --deploy`, the schema's generation and the requests below, each in its own
    interpreter on production's environment, started together (each loads Django anew)."""
    tmp = tmp_path_factory.mktemp("production")
    env = production_env(
        tmp,
        DJANGO_SETTINGS_MODULE="tessera.settings",
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
    )
    commands = {
        "check": [sys.executable, "manage.py", "check", "--deploy"],
        "schema": [
            *(sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn"),
            *("--file", str(tmp / "schema.yml")),
        ],
        "requests": [sys.executable, "-c", REQUESTS],
    }
    started = {
        name: subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in commands.items()
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=180)
        done[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    done["schema_file"] = tmp / "schema.yml"
    return done


def test_check_deploy_finds_no_issue_under_production_settings(production):
    done = production["check"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    assert "WARNING" not in done.stdout + done.stderr


def test_the_rest_schema_generates_without_a_warning_and_names_the_token_scheme(production):
    done = production["schema"]
    assert done.returncode == 0, done.stdout + done.stderr
    document = yaml.safe_load(production["schema_file"].read_text())
    assert document["components"]["securitySchemes"]["apiToken"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "tsr_<prefix>_<secret>",
        "description": "An API token made on the portal's tokens page.",
    }
    operations = [op for item in document["paths"].values() for op in item.values()]
    # Every operation that asks for credentials accepts the token (the suites' public files
    # ask for none).
    guarded = [op for op in operations if op.get("security")]
    assert len(guarded) >= 20
    assert all({"apiToken": []} in op["security"] for op in guarded)
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))


def test_without_django_debug_the_settings_are_production_and_want_a_secret_key(tmp_path):
    env = production_env(tmp_path)
    del env["DJANGO_SECRET_KEY"]
    done = run([sys.executable, "-c", "import tessera.settings"], env)
    assert done.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in done.stderr


def test_production_redirects_http_to_https_sends_hsts_and_spares_the_health_check(production):
    done = production["requests"]
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["debug"] is False
    assert seen["plain"] == [301, "https://testserver/api/v1/me/"]
    hsts = "max-age=31536000; includeSubDomains; preload"
    assert seen["secure"] == [401, hsts]
    assert seen["secure_headers"] == {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
    }
    # The TLS-terminating proxy's header makes the request secure: no redirect loop.
    assert seen["proxied"] == [401, hsts]
    assert seen["health"] == [200, "ok"]
    assert seen["cookies_secure"] == [True, True]


SETTINGS = (
    "import json, tessera.settings as s; print(json.dumps([s.SECURE_SSL_REDIRECT,"
    " s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE,"
    " getattr(s, 'SECURE_PROXY_SSL_HEADER', None)]))"
)


def test_a_deployment_behind_plain_http_can_turn_the_redirect_and_hsts_off(tmp_path):
    env = production_env(
        tmp_path,
        DJANGO_SECURE_SSL_REDIRECT="false",
        DJANGO_SECURE_HSTS_SECONDS="0",
        DJANGO_SECURE_COOKIES="false",
    )
    done = run([sys.executable, "-c", SETTINGS], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, 0, False, False, None]
    done = run([sys.executable, "-c", SETTINGS], production_env(tmp_path))
    assert json.loads(done.stdout) == [True, 31_536_000, True, True, None]


def test_a_proxy_ssl_header_that_is_not_a_header_name_is_refused(tmp_path):
    env = production_env(tmp_path, DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https")
    done = run([sys.executable, "-c", "import tessera.settings"], env)
    assert done.returncode != 0
    assert "DJANGO_SECURE_PROXY_SSL_HEADER must be a header name" in done.stderr
