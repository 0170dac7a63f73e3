"""PostgreSQL connections dropped mid-transition: the server ends this process's backend
(pg_terminate_backend from another connection) inside the admission and inside the
recording of a run. Each transition is all or nothing, and retrying it completes it."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import psycopg
import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from contributions import services as contribution_services
from contributions.models import AuditEvent
from evaluation.models import EvaluationRun, RuleResult, TaskResult
from evaluation.services import execution
from evaluation.services.admission import version_admit
from evaluation.services.reaper import evaluation_runs_reap
from routing.models import MixtureVersion
from tests.evaluation.test_runs import fake_child, make_task, upload_version
from tests.faults.conftest import Run, Status, assert_consistent

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("tiny_base_model", "fast_eval"),
    pytest.mark.skipif(
        os.environ.get("TESSERA_TEST_DATABASE") == "sqlite", reason="needs PostgreSQL"
    ),
]


def terminate_my_backend() -> None:
    """From a second connection, end the backend serving Django's connection."""
    pid = connection.connection.info.backend_pid
    params = connection.get_connection_params()
    with psycopg.connect(
        dbname=params["dbname"],
        user=params.get("user"),
        host=params.get("host"),
        port=params.get("port"),
        password=params.get("password") or None,
        autocommit=True,
    ) as other:
        ended = other.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
    assert ended


@pytest.fixture
def cut_connection_on(monkeypatch):
    """``cut_connection_on(to_status)``: the first transition into ``to_status`` has its
    connection ended after every other listener ran (the mixture published, for an
    admission), before the transaction commits."""
    fired: list = []

    def arm(to_status: str) -> list:
        def listener(event) -> None:
            if event.to_status == to_status and not fired:
                fired.append(event.version.pk)
                terminate_my_backend()

        listeners = [*contribution_services.on_version_transition, listener]
        monkeypatch.setattr(contribution_services, "on_version_transition", listeners)
        return fired

    return arm


def reconnect() -> None:
    """What a request boundary or a task's start does: drop the unusable connection."""
    connection.close_if_unusable_or_obsolete()
    assert connection.connection is None or connection.is_usable()


def walk_to_passed(version):
    for status in (Status.EVALUATING, Status.PASSED):
        version = contribution_services.adapter_version_transition(
            version=version, to_status=status, actor=None
        )
    return version


def test_an_admission_cut_off_leaves_nothing_and_the_reaper_admits_once(
    contributor, cut_connection_on, sent, settings
):
    version = walk_to_passed(upload_version(contributor))
    EvaluationRun.objects.filter(version=version).update(
        status=Run.SUCCEEDED, passed=True, needs_review=False, finished_at=timezone.now()
    )
    mixtures, events = MixtureVersion.objects.count(), AuditEvent.objects.count()
    fired = cut_connection_on(Status.ADMITTED)

    with pytest.raises(OperationalError):
        version_admit(version=version)
    assert fired == [version.pk]
    reconnect()
    version.refresh_from_db()
    assert version.status == Status.PASSED  # the status, its event and the mixture: none
    assert AuditEvent.objects.count() == events
    assert MixtureVersion.objects.count() == mixtures

    # The retry is the reaper's: past the grace, a passed version with no decision after a
    # run that needed no review is admitted; a second sweep finds nothing left to do.
    later = timezone.now() + timedelta(seconds=settings.TESSERA_EVAL_DECISION_GRACE_SECONDS + 1)
    assert evaluation_runs_reap(now=later)["admitted"] == [version.pk]
    assert not any(evaluation_runs_reap(now=later).values())
    version.refresh_from_db()
    assert version.status == Status.ADMITTED
    assert MixtureVersion.objects.count() == mixtures + 1
    active = MixtureVersion.objects.get(is_active=True)
    assert list(active.members.values_list("pk", flat=True)) == [version.pk]
    assert AuditEvent.objects.filter(version=version, to_status=Status.ADMITTED).count() == 1
    assert_consistent(version)


def test_a_run_recording_cut_off_records_nothing_and_the_retry_records_it_once(
    contributor, child, cut_connection_on, sent
):
    make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)])
    child(fake_child())  # the adapter gains 1.0 on every example: it passes
    version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    fired = cut_connection_on(Status.PASSED)

    with pytest.raises(OperationalError):
        execution.evaluation_run_execute(run_id=run.pk, worker=worker)
    assert fired == [version.pk]
    reconnect()
    run.refresh_from_db()
    version.refresh_from_db()
    # The verdict, the results and the version's decision were one transaction: none of
    # it landed. The claim was given back (on a new connection), the attempt not counted.
    assert (run.status, run.attempts, run.claimed_by) == (Run.QUEUED, 0, "")
    assert not TaskResult.objects.filter(run=run).exists()
    assert not RuleResult.objects.filter(run=run).exists()
    assert version.status == Status.QUEUED
    assert not MixtureVersion.objects.exists()

    # The task's retry: the same pool process, a fresh connection.
    assert execution.evaluation_run_execute(run_id=run.pk, worker=worker) == "succeeded"
    run.refresh_from_db()
    assert (run.status, run.passed, run.attempts) == (Run.SUCCEEDED, True, 1)
    assert TaskResult.objects.filter(run=run).count() == 1
    version.refresh_from_db()
    assert version.status == Status.ADMITTED
    assert_consistent(version)
