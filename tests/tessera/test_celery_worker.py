"""A real Celery worker process consumes tasks from the suite's real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from celery import Celery

from tests.conftest import redis_url

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def celery_worker_process(redis_proc, pg_server):
    env = dict(
        os.environ,
        CELERY_BROKER_URL=redis_url(redis_proc, 0),
        CELERY_RESULT_BACKEND=redis_url(redis_proc, 2),
        DATABASE_URL=f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/test_tessera",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tessera",
            "worker",
            "--queues",
            "default,maintenance,eval-cpu",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_a_real_worker_answers_a_task_sent_through_redis(celery_worker_process, redis_proc):
    client = Celery("client", broker=redis_url(redis_proc, 0), backend=redis_url(redis_proc, 2))
    client.conf.task_serializer = "json"
    started = time.monotonic()
    result = client.send_task("tessera.ping", queue="default")
    try:
        assert result.get(timeout=60) == "pong"
    except Exception:
        celery_worker_process.terminate()
        output = celery_worker_process.communicate(timeout=20)[0]
        pytest.fail(f"worker did not answer: {output[-3000:]}")
    assert time.monotonic() - started < 60
