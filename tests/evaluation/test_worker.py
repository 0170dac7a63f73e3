"""Evaluation through a REAL Celery worker process on the suite's Redis and PostgreSQL:
an upload is evaluated end to end, a pool process killed mid-run is retried, and a child
that hangs is stopped at the deadline.

The worker is ``celery -A tessera worker`` started through a small bootstrap that can swap
the evaluation child for a stand-in (``TESSERA_TEST_FAKE_CHILD``, read only by this
bootstrap, never by Tessera). Settings changes reach the worker as environment variables.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from celery import Celery

from evaluation import tasks as evaluation_tasks
from evaluation.models import EvaluationRun, TaskResult
from tests.conftest import redis_url
from tests.evaluation.test_groups import group_child_code, key, queued_runs
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    make_task,
    model_cache,
    tiny_base_model,
    tiny_model_source,
    upload_version,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # The tiny random Llama, prepared as the active base model with a real local_path.
    pytest.mark.usefixtures("tiny_base_model"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Run = EvaluationRun.Status

BOOTSTRAP = textwrap.dedent(
    """
    import os, sys
    code = os.environ.get("TESSERA_TEST_FAKE_CHILD")
    if code:
        import django
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tessera.settings")
        django.setup()
        from evaluation.services import execution
        execution.CHILD_ARGV = [sys.executable, "-c", code]
    from celery.__main__ import main
    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(main())
    """
)

SLEEPING_CHILD = "import sys, time\nsys.stdin.read()\ntime.sleep(600)\n"


@pytest.fixture
def start_worker(redis_proc, pg_server, settings):
    processes: list[subprocess.Popen] = []

    def start(**env_changes: str) -> subprocess.Popen:
        env = dict(
            os.environ,
            CELERY_BROKER_URL=redis_url(redis_proc, 0),
            DATABASE_URL=(
                f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/test_tessera"
            ),
            TESSERA_MEDIA_ROOT=str(settings.MEDIA_ROOT),
            TESSERA_EVAL_BOOTSTRAP_SAMPLES="200",
            TESSERA_EVAL_HEARTBEAT_SECONDS="0.5",
            OMP_NUM_THREADS="1",  # see test_runs.fast_eval
        )
        env.update(env_changes)
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                BOOTSTRAP,
                "-A",
                "tessera",
                "worker",
                "--queues",
                "eval-cpu",
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
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def send_through_redis(redis_proc, monkeypatch):
    """The service sends its task (after commit) through a client on the suite's Redis."""
    # Not set as the current app: a current app outlives the test in this thread, and every
    # later test's patch of the task would land on this client's copy instead of tessera's.
    client = Celery("client", broker=redis_url(redis_proc, 0), set_as_current=False)
    client.conf.task_serializer = "json"
    sent: list = []

    def apply_async(args, queue):
        sent.append((args, queue))
        client.send_task("evaluation.evaluate_run", args=args, queue=queue)

    monkeypatch.setattr(evaluation_tasks.evaluate_run, "apply_async", apply_async)
    return sent


def wait_for(run: EvaluationRun, predicate, worker: subprocess.Popen, timeout: float = 90):
    """Poll the run until ``predicate(run)``; record every status seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if not seen or seen[-1] != run.status:
            seen.append(run.status)
        if predicate(run):
            return seen
        if worker.poll() is not None:
            break
        time.sleep(0.2)
    worker.terminate()
    output = worker.communicate(timeout=20)[0]
    pytest.fail(f"run {run.pk} stuck in {run.status} (seen {seen}); worker log:\n{output[-4000:]}")


def finished(run: EvaluationRun) -> bool:
    return run.status in (Run.SUCCEEDED, Run.FAILED)


def small_task():
    return make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)], max_new_tokens=3)


def test_a_real_worker_evaluates_an_upload_end_to_end(
    start_worker, send_through_redis, contributor
):
    worker = start_worker()
    task = small_task()
    started = time.monotonic()
    version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    assert send_through_redis == [([run.pk], "eval-cpu")]
    seen = wait_for(run, finished, worker)
    assert seen[0] == Run.QUEUED and Run.RUNNING in seen, seen
    assert run.status == Run.SUCCEEDED, (run.failure_code, run.failure_reason, run.log[-2000:])
    assert run.attempts == 1
    assert run.claimed_by.rsplit(":", 1)[0]  # host:pid of the pool process
    result = TaskResult.objects.get(run=run, task=task)
    assert (result.n, result.split, result.is_target) == (4, "hidden", True)
    version.refresh_from_db()
    assert version.status == "failed"  # a random tiny model gains nothing
    assert time.monotonic() - started < 90


def test_a_pool_process_killed_mid_run_is_retried_once_and_never_left_running(
    start_worker, send_through_redis, contributor
):
    worker = start_worker()
    small_task()
    version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    wait_for(run, lambda r: r.status == Run.RUNNING and r.progress_total > 0, worker)
    pool_pid = int(run.claimed_by.rsplit(":", 1)[1])
    pool = psutil.Process(pool_pid)
    assert pool.ppid() == worker.pid  # the prefork pool process running the task
    descendants = pool.children(recursive=True)  # the sandboxed child (and its wrappers)
    assert descendants
    os.kill(pool_pid, signal.SIGKILL)

    wait_for(run, finished, worker)
    assert run.attempts == 2
    assert run.status in (Run.SUCCEEDED, Run.FAILED)
    assert int(run.claimed_by.rsplit(":", 1)[1]) != pool_pid
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, f"the killed worker's children outlived it: {alive}"
    # The killed attempt's copy of the adapter was cleaned up by the retry.
    assert not list(Path(tempfile.gettempdir()).glob(f"tessera-run-{run.pk}-*"))


def test_a_child_that_hangs_is_stopped_at_the_deadline(
    start_worker, send_through_redis, contributor
):
    worker = start_worker(TESSERA_EVAL_DEADLINE_SECONDS="4", TESSERA_TEST_FAKE_CHILD=SLEEPING_CHILD)
    small_task()
    version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    wait_for(run, finished, worker, timeout=60)
    assert run.status == Run.FAILED
    assert run.failure_code == "sandbox_deadline"
    assert "deadline" in run.failure_reason
    assert run.attempts == 1
    version.refresh_from_db()
    assert version.status == "failed"


def test_eight_uploads_queued_before_the_worker_starts_are_evaluated_in_one_child(
    start_worker, send_through_redis, contributor
):
    small_task()
    runs = queued_runs(contributor, 8)
    assert sorted(send_through_redis) == sorted(([r.pk], "eval-cpu") for r in runs)
    refused = runs[5]
    # The stand-in child names itself by a random token in its log and refuses one adapter.
    worker = start_worker(TESSERA_TEST_FAKE_CHILD=group_child_code(refuse=(key(refused),)))
    for run in runs:
        wait_for(run, finished, worker)
    children = {re.search(r"fake child (\w+) adapters=(\d+)", run.log).groups() for run in runs}
    assert len(children) == 1, children  # every run's log is the same child's
    assert next(iter(children))[1] == "8"
    refused.refresh_from_db()
    assert (refused.status, refused.failure_code) == (Run.FAILED, "adapter_refused")
    assert not TaskResult.objects.filter(run=refused).exists()
    others = [run for run in runs if run.pk != refused.pk]
    assert [(r.status, r.passed) for r in others] == [(Run.SUCCEEDED, True)] * 7
    assert all(TaskResult.objects.filter(run=r).count() == 1 for r in others)
    # Each run was claimed once: the later messages of the grouped runs changed nothing.
    assert [r.attempts for r in runs] == [1] * 8
    assert len({r.claimed_by for r in runs}) == 1
