"""The whole Celery worker (its main process and the pool process running the task)
SIGKILLed mid-evaluation. Its heartbeat goes stale, the reaper re-queues the run, a new
worker evaluates it: one outcome recorded, the version decided once and admitted once."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from contributions.models import AuditEvent
from evaluation.models import EvaluationRun, TaskResult
from evaluation.services.reaper import evaluation_runs_reap
from tests.evaluation.test_runs import fake_child, make_task, upload_version
from tests.faults.conftest import Run, Status, assert_consistent, wait_runs_finished

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("tiny_base_model"),
]


def test_a_worker_killed_mid_evaluation_is_reaped_and_its_run_finishes_once(
    dedicated_redis, start_worker, send_to, settings, contributor
):
    settings.TESSERA_ADMISSION_REVIEW = "never"
    settings.TESSERA_EVAL_STALE_AFTER_SECONDS = 2
    broker = dedicated_redis(persistent=False)
    send_to(broker.url)
    task = make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)])
    # The first worker's child would take a minute: it is killed long before.
    first = start_worker(broker.url, TESSERA_TEST_FAKE_CHILD=fake_child(sleep=60)[2])
    version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    wait_runs_finished(
        [run], first, timeout=60, until=lambda r: r.status == Run.RUNNING and r.progress_total
    )
    pool = psutil.Process(int(run.claimed_by.rsplit(":", 1)[1]))
    assert pool.ppid() == first.pid
    descendants = pool.children(recursive=True)
    assert descendants  # the sandboxed child is at work
    os.kill(first.pid, signal.SIGKILL)
    os.kill(pool.pid, signal.SIGKILL)
    first.wait(timeout=10)
    _gone, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, f"the killed worker's children outlived it: {alive}"
    run.refresh_from_db()
    assert (run.status, run.attempts) == (Run.RUNNING, 1)  # nobody knows yet

    second = start_worker(broker.url, TESSERA_TEST_FAKE_CHILD=fake_child()[2])
    requeued: list[int] = []

    def reap() -> None:
        # Beat's sweeps, until the lost run is found: a heartbeat bound this short would
        # also catch the new worker's recording step, which writes no heartbeat.
        if not requeued:
            requeued.extend(evaluation_runs_reap()["requeued"])

    wait_runs_finished([run], second, timeout=60, tick=reap)
    assert requeued == [run.pk]
    assert not any(evaluation_runs_reap().values())
    assert (run.status, run.passed, run.attempts) == (Run.SUCCEEDED, True, 2)
    assert int(run.claimed_by.rsplit(":", 1)[1]) != pool.pid
    assert TaskResult.objects.filter(run=run, task=task).count() == 1
    version.refresh_from_db()
    assert version.status == Status.ADMITTED
    trail = list(
        AuditEvent.objects.filter(version=version)
        .order_by("pk")
        .values_list("to_status", flat=True)
    )
    assert trail[-4:] == [Status.QUEUED, Status.EVALUATING, Status.PASSED, Status.ADMITTED], trail
    assert_consistent(version)
