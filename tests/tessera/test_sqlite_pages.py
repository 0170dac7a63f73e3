"""The public pages on SQLite, the database a fresh clone runs on: the rest of the suite runs
on PostgreSQL, and a query only PostgreSQL can run (DISTINCT ON) once answered the
leaderboard with a 500 on a newcomer's `make run` while every test passed. So the tests of
the pages a visitor sees first (the scoreboard, the leaderboard and its API, the model cards
and contributor pages, the playground) run again here, in a pytest of their own with
TESSERA_TEST_DATABASE=sqlite (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    "tests/routing/test_scoreboard.py",
    "tests/routing/test_leaderboard.py",
    "tests/routing/test_public_pages.py",
    "tests/routing/test_playground.py",
)


@pytest.mark.timeout(1200)  # the inner run has its own 900 s bound
def test_the_pages_a_visitor_sees_first_work_on_sqlite():
    # A short base for the inner run's temporary files: Redis's UNIX socket lives there and
    # its path must fit in 107 bytes. A folder of its own, since the suite opens up the
    # parent of its base (tests/conftest.py) and that must not be /tmp itself.
    short = Path(tempfile.mkdtemp(prefix="tsq-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("PYTEST_")
    }
    env["TESSERA_TEST_DATABASE"] = "sqlite"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", *MODULES),
            *("-q", "-p", "no:cacheprovider", "--basetemp", str(short / "b")),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
