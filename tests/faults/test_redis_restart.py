"""Redis, the broker, stopped and started again on the same port while runs are queued,
with and without persistence; one upload lands while it is down. A real Celery worker
consumes from it. Every run ends, each evaluated once; messages lost with an empty Redis
are sent again by the reaper (a queued run's message older than
TESSERA_EVAL_RESEND_QUEUED_SECONDS), and its duplicates change nothing."""

from __future__ import annotations

import pytest
import redis

from evaluation.models import EvaluationRun
from evaluation.services.reaper import evaluation_runs_reap
from tests.evaluation.test_runs import fake_child, make_task, upload_version
from tests.faults.conftest import Run, assert_consistent, wait_runs_finished

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("tiny_base_model"),
]

FAKE_CHILD = fake_child()[2]  # the adapter gains on every example


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_runs_queued_across_a_redis_restart_all_end_once(
    persistent, dedicated_redis, start_worker, send_to, settings, caplog, contributor
):
    settings.TESSERA_ADMISSION_REVIEW = "never"
    settings.TESSERA_EVAL_RESEND_QUEUED_SECONDS = 1
    broker = dedicated_redis(persistent=persistent)
    messages = send_to(broker.url)
    make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)])
    queued = [upload_version(contributor) for _ in range(2)]
    assert len(messages) == 2
    assert redis.Redis.from_url(broker.url).llen("eval-cpu") == 2

    broker.stop()
    down = upload_version(contributor)  # the broker is down: the upload still commits
    assert "could not enqueue evaluation run" in caplog.text
    broker.start()
    left = redis.Redis.from_url(broker.url).llen("eval-cpu")
    assert left == (2 if persistent else 0)

    versions = [*queued, down]
    runs = [EvaluationRun.objects.get(version=v) for v in versions]
    assert all(run.status == Run.QUEUED for run in runs)
    worker = start_worker(broker.url, TESSERA_TEST_FAKE_CHILD=FAKE_CHILD)
    resent: list[int] = []

    def reap() -> None:
        resent.extend(evaluation_runs_reap()["resent"])

    wait_runs_finished(runs, worker, timeout=60, tick=reap)
    assert runs[2].pk in resent  # the message that never reached the broker
    if not persistent:
        assert {runs[0].pk, runs[1].pk} <= set(resent)  # lost with the empty Redis
    assert [(run.status, run.passed, run.attempts) for run in runs] == [
        (Run.SUCCEEDED, True, 1)
    ] * 3
    assert_consistent(*versions)
    # Nothing left to resend, and the duplicates still in the queue only meet finished runs.
    assert evaluation_runs_reap()["resent"] == []
