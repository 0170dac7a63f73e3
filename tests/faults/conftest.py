"""Fault tests: real processes (a Celery worker, redis-server, uvicorn) stopped, killed or
cut off mid-work, and what is left afterwards checked: no lost upload, no run stuck, no
duplicate admission, and the active mixture holding exactly the admitted versions.

A fault that needs a process of its own to kill or restart starts a dedicated one here;
everything else is the suite's PostgreSQL and Redis (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from benchmarks.bench_load import free_port, stop
from contributions.models import AdapterVersion, AuditEvent
from evaluation import tasks as evaluation_tasks
from evaluation.models import EvaluationRun, TaskResult
from routing.models import MixtureVersion
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    child,
    fast_eval,
    model_cache,
    sent,
    tiny_base_model,
    tiny_model_source,
)
from tests.evaluation.test_worker import BOOTSTRAP

ROOT = Path(__file__).resolve().parents[2]
Run = EvaluationRun.Status
Status = AdapterVersion.Status


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port} after {timeout}s")


class RedisServer:
    """A redis-server of the test's own, on a fixed port, to stop and start again."""

    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        self.process = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.workdir), *persistence),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        """SIGTERM: redis-server exits after writing what its persistence keeps."""
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture
def dedicated_redis(tmp_path):
    servers: list[RedisServer] = []

    def make(*, persistent: bool) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, persistent=persistent)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def pg_url(pg_server) -> str:
    return f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/test_tessera"


@pytest.fixture
def start_worker(pg_server, settings):
    """``start(broker_url, **env)``: a real ``celery worker`` on the eval-cpu queue through
    the evaluation tests' bootstrap (which may swap the child for a stand-in)."""
    processes: list[subprocess.Popen] = []

    def start(broker_url: str, **env_changes: str) -> subprocess.Popen:
        env = dict(
            os.environ,
            CELERY_BROKER_URL=broker_url,
            DATABASE_URL=pg_url(pg_server),
            TESSERA_MEDIA_ROOT=str(settings.MEDIA_ROOT),
            TESSERA_EVAL_BOOTSTRAP_SAMPLES="200",
            TESSERA_EVAL_HEARTBEAT_SECONDS="0.5",
            TESSERA_ADMISSION_REVIEW="never",
            OMP_NUM_THREADS="1",
        )
        env.update(env_changes)
        process = subprocess.Popen(
            [
                *(sys.executable, "-c", BOOTSTRAP, "-A", "tessera", "worker"),
                *("--queues", "eval-cpu", "--concurrency", "1", "--loglevel", "INFO"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        # A cold shutdown: nothing of these workers' is worth waiting for.
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
        stop(process, timeout=10)


@pytest.fixture
def send_to(monkeypatch):
    """``send_to(broker_url)``: the service's task messages go through a client on that
    broker from then on; returns the list of what was sent (or attempted)."""
    messages: list = []

    def use(broker_url: str) -> list:
        client = Celery("client", broker=broker_url, set_as_current=False)
        client.conf.task_serializer = "json"
        client.conf.broker_connection_retry = False
        client.conf.broker_connection_max_retries = 0
        client.conf.broker_transport_options = {"max_retries": 0}

        def apply_async(args, queue):
            messages.append((args, queue))
            client.send_task("evaluation.evaluate_run", args=args, queue=queue, retry=False)

        monkeypatch.setattr(evaluation_tasks.evaluate_run, "apply_async", apply_async)
        return messages

    return use


def worker_log(worker: subprocess.Popen) -> str:
    stop(worker)
    return worker.stdout.read()[-4000:] if worker.stdout else ""


def finished(run: EvaluationRun) -> bool:
    return run.status in (Run.SUCCEEDED, Run.FAILED)


def wait_runs_finished(
    runs, worker: subprocess.Popen | None, timeout: float = 60, tick=None, until=finished
):
    """Poll until ``until(run)`` holds for every run (by default: it succeeded or failed);
    ``tick()`` is called between polls (a reaper sweep, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in runs:
            run.refresh_from_db()
        if all(until(run) for run in runs):
            return
        if worker is not None and worker.poll() is not None:
            break
        if tick is not None:
            tick()
        time.sleep(0.25)
    states = [(run.pk, run.status, run.attempts) for run in runs]
    log = worker_log(worker) if worker is not None else ""
    pytest.fail(f"runs not finished: {states}; worker log:\n{log}")


def assert_consistent(*versions: AdapterVersion) -> None:
    """No run stuck, no duplicate admission, the active mixture == the admitted set."""
    assert not EvaluationRun.objects.filter(status__in=(Run.QUEUED, Run.RUNNING)).exists()
    for version in versions:
        version.refresh_from_db()
        assert version.status not in (Status.QUEUED, Status.EVALUATING, Status.PASSED), (
            version.pk,
            version.status,
        )
        assert EvaluationRun.objects.filter(version=version).count() == 1
        run = EvaluationRun.objects.get(version=version)
        decided = AuditEvent.objects.filter(
            version=version, to_status__in=(Status.PASSED, Status.FAILED)
        )
        assert decided.count() == 1, list(decided.values_list("from_status", "to_status"))
        if run.status == Run.SUCCEEDED:
            tasks = list(TaskResult.objects.filter(run=run).values_list("task_id", flat=True))
            assert len(tasks) == len(set(tasks)), "a task's result was recorded twice"
    assert_mixture_consistent()


def assert_mixture_consistent() -> None:
    """No admission recorded twice; the active mixture holds exactly the admitted set."""
    admitted = set(
        AdapterVersion.objects.filter(status=Status.ADMITTED).values_list("pk", flat=True)
    )
    assert AuditEvent.objects.filter(to_status=Status.ADMITTED).count() == len(admitted), (
        "an admission was recorded twice"
    )
    active = MixtureVersion.objects.filter(is_active=True).first()
    members = set(active.members.values_list("pk", flat=True)) if active else set()
    assert members == admitted
