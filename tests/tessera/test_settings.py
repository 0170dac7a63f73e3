"""Settings fail loudly on bad values and never fall back to an insecure secret in
production."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import connection

from tessera.celery import app


def _load_settings(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CELERY_"))}
    environment["DJANGO_DEBUG"] = "true"  # development, unless a test says otherwise
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", "import tessera.settings"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_without_a_secret_key_refuses_to_start():
    result = _load_settings(DJANGO_DEBUG="false")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_production_with_a_secret_key_starts():
    result = _load_settings(
        DJANGO_DEBUG="false", DJANGO_SECRET_KEY="x" * 50, TESSERA_SUITE_SEED="s" * 32
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TESSERA_MAX_UPLOAD_BYTES", "lots"),
        ("TESSERA_MAX_LORA_RANK", "0"),
        ("DJANGO_DEBUG", "maybe"),
    ],
)
def test_a_bad_value_stops_the_settings_from_loading(name, value):
    result = _load_settings(**{name: value})
    assert result.returncode != 0
    assert name in result.stderr or "invalid" in result.stderr.lower()


def test_soft_time_limit_above_the_hard_one_is_refused():
    result = _load_settings(CELERY_TASK_SOFT_TIME_LIMIT="100", CELERY_TASK_TIME_LIMIT="50")
    assert result.returncode != 0
    assert "CELERY_TASK_SOFT_TIME_LIMIT" in result.stderr


def test_redis_visibility_timeout_is_at_least_twice_the_hard_time_limit():
    code = (
        "from django.conf import settings as s; import tessera.settings as t;"
        "print(t.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'], t.CELERY_TASK_TIME_LIMIT)"
    )
    environment = dict(os.environ, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True
    ).stdout.split()
    visibility, hard_limit = int(out[0]), int(out[1])
    assert visibility >= 2 * hard_limit


def test_celery_is_json_only_and_acknowledges_late():
    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit
    assert {q.name for q in app.conf.task_queues} >= {"eval-cpu", "eval-gpu"}


def test_the_upload_cap_is_enforced_by_our_handler_first():
    assert (
        settings.FILE_UPLOAD_HANDLERS[0] == "contributions.upload_handlers.SizeCappedUploadHandler"
    )


@pytest.mark.django_db
def test_the_suite_talks_to_postgresql():
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("select version()")
        assert "PostgreSQL" in cursor.fetchone()[0]


@pytest.mark.django_db
def test_the_cache_is_the_suites_redis(redis_proc):
    from django.core.cache import cache

    cache.set("probe", "ok")
    import redis

    client = redis.Redis(host=redis_proc.host, port=redis_proc.port, db=1)
    assert any(b"probe" in key for key in client.keys("*"))


def test_each_queue_has_its_own_routing_key():
    queues = {q.name: q for q in app.conf.task_queues}
    assert {name: q.routing_key for name, q in queues.items()} == {
        "default": "default",
        "eval-cpu": "eval-cpu",
        "eval-gpu": "eval-gpu",
        "maintenance": "maintenance",
    }
    assert len({q.exchange.name for q in queues.values()}) == 4


def _load_settings_on_defaults(var_dir, **env: str) -> None:
    """Load the settings in a fresh interpreter with none of the suite's configuration."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "CELERY_", "TESSERA_"))
        and k not in ("DATABASE_URL", "REDIS_URL")
    }
    environment.update(env, DJANGO_DEBUG="true", TESSERA_VAR_DIR=str(var_dir))
    subprocess.run(
        [sys.executable, "-c", "import tessera.settings"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


@pytest.mark.parametrize(
    ("env", "made", "not_made"),
    [
        ({}, ["broker/queue", "broker/processed", "broker/control", "cache", "log"], []),
        # The SQLite file's folder does not depend on the file cache happening to make var/.
        ({"REDIS_URL": "redis://127.0.0.1:1/1"}, ["broker/queue", "log"], ["cache"]),
        ({"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}, ["cache", "log"], ["broker"]),
    ],
)
def test_the_embedded_defaults_make_their_folders_on_an_empty_var(tmp_path, env, made, not_made):
    var = tmp_path / "var"
    _load_settings_on_defaults(var, **env)
    assert var.is_dir()  # the SQLite file's
    assert [name for name in made if not (var / name).is_dir()] == []
    assert [name for name in not_made if (var / name).exists()] == []


def test_real_services_make_no_folders(tmp_path):
    _load_settings_on_defaults(
        tmp_path / "var",
        DATABASE_URL="postgres://tessera@127.0.0.1:1/tessera",
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",
        REDIS_URL="redis://127.0.0.1:1/1",
    )
    assert not (tmp_path / "var").exists()


def test_a_relative_var_dir_is_the_projects_wherever_a_process_starts(tmp_path):
    environment = dict(
        os.environ, TESSERA_VAR_DIR="var", CELERY_BROKER_URL="filesystem://", REDIS_URL=""
    )
    code = "import tessera.settings as s; print(s.VAR_DIR, s.CELERY_BROKER_TRANSPORT_OPTIONS)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    project_var = str(settings.BASE_DIR / "var")
    assert out.startswith(project_var + " ")
    assert f"'control_folder': '{project_var}/broker/control'" in out
    assert not list(tmp_path.iterdir())
