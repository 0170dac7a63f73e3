"""The suite's services: a real PostgreSQL and a real Redis, started from the local
binaries for the session; plus personas and the test base model.

PostgreSQL comes from pytest-postgresql's process fixture, through tests/support/pg_ctl,
which runs it as the postgres user when the suite runs as root (CI does). Django's test
database is created on that server by pytest-django, so every test that touches the
database talks to PostgreSQL, never SQLite, unless TESSERA_TEST_DATABASE=sqlite: then
Django's own SQLite test database stands in (tests/tessera/test_sqlite_pages.py runs the
public pages' tests that way, since SQLite is what a fresh clone runs on).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from pytest_postgresql import factories as pg_factories
from pytest_redis import factories as redis_factories

# The built-in suites' secret splits are drawn from this seed in every test (it is in the
# environment too, for the processes tests start).
from tests.support.environment import TEST_SUITE_SEED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SUPPORT = Path(__file__).parent / "support"


def pytest_configure(config: pytest.Config) -> None:
    from django.conf import settings

    settings.TESSERA_SUITE_SEED = TEST_SUITE_SEED


postgresql_proc = pg_factories.postgresql_proc(
    executable=str(SUPPORT / "pg_ctl"),
    port=None,
    user="postgres",
    dbname="tessera_seed",
    postgres_options="-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
)
redis_proc = redis_factories.redis_proc(port=None)


@pytest.fixture(scope="session")
def _service_tmp_access(tmp_path_factory: pytest.TempPathFactory) -> None:
    """As root, let the postgres user reach pytest's temporary directory."""
    if os.geteuid() != 0:
        return
    base = tmp_path_factory.getbasetemp()
    base.parent.chmod(0o711)
    base.chmod(0o777)


@pytest.fixture(scope="session")
def pg_server(_service_tmp_access, request: pytest.FixtureRequest):
    return request.getfixturevalue("postgresql_proc")


SQLITE = os.environ.get("TESSERA_TEST_DATABASE") == "sqlite"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(request: pytest.FixtureRequest, redis_proc) -> None:
    """Point Django at the suite's PostgreSQL and Redis before the test database exists."""
    from django.conf import settings

    if SQLITE:
        settings.DATABASES["default"]["ENGINE"] = "django.db.backends.sqlite3"
        _redis_cache(settings, redis_proc)
        return
    pg_server = request.getfixturevalue("pg_server")
    db = settings.DATABASES["default"]
    # Mutated in place: Django's connection handler holds this very dict (with its
    # defaults filled in), and no connection has been opened yet.
    db.update(
        {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "tessera",
            "USER": pg_server.user,
            "PASSWORD": pg_server.password or "",
            "HOST": pg_server.host,
            "PORT": str(pg_server.port),
        }
    )
    db.setdefault("TEST", {})["NAME"] = "test_tessera"
    from django.db import connections

    # Drop any wrapper made from the old settings, so the next use builds a PostgreSQL one.
    connections.close_all()
    for alias in connections:
        with contextlib.suppress(AttributeError):
            del connections[alias]
    _redis_cache(settings, redis_proc)


def _redis_cache(settings, redis_proc) -> None:
    settings.CACHES["default"] = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": redis_url(redis_proc, db=1),
    }
    from django.test.signals import clear_cache_handlers

    clear_cache_handlers(setting="CACHES")


def redis_url(proc, db: int = 0) -> str:
    return f"redis://{proc.host}:{proc.port}/{db}"


@pytest.fixture(autouse=True)
def _isolated_media(settings, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture(autouse=True)
def _no_scoreboard_jobs(settings) -> None:
    """Publishing a mixture queues a scoreboard job; tests that want one ask for it
    (``settings.TESSERA_SCOREBOARD_ON_PUBLISH = True``), so no other test's worker gets
    scoreboard work it did not expect. The same holds for the learned router's training job
    (``settings.TESSERA_LEARNED_ROUTER_ON_PUBLISH``) and the merged adapter's build
    (``settings.TESSERA_MERGE_ON_PUBLISH``)."""
    settings.TESSERA_SCOREBOARD_ON_PUBLISH = False
    settings.TESSERA_LEARNED_ROUTER_ON_PUBLISH = False
    settings.TESSERA_MERGE_ON_PUBLISH = False


@pytest.fixture(autouse=True)
def _clean_cache(request) -> None:
    """Throttle counters live in the shared cache: start every DB test from zero (whether it
    asks for the database by fixture or by the django_db marker)."""
    if "django_db_setup" in request.fixturenames or request.node.get_closest_marker("django_db"):
        from django.core.cache import cache

        cache.clear()


def media_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def media_root(settings) -> Path:
    return Path(settings.MEDIA_ROOT)


# --- The base model and personas ----------------------------------------------------------


@pytest.fixture
def base_model(db):
    from tests.factories import BaseModelFactory

    return BaseModelFactory()


@pytest.fixture
def contributor(db):
    from tests.factories import UserFactory

    return UserFactory(username="owner")


@pytest.fixture
def other_contributor(db):
    from tests.factories import UserFactory

    return UserFactory(username="other")


@pytest.fixture
def maintainer(db):
    from tests.factories import MaintainerFactory

    return MaintainerFactory(username="maint")
