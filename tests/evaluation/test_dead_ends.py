"""No dead ends: platform faults re-queue runs with a bounded back-off instead of failing the
contributor, a version ended by one frees its weights for a new upload, and the reaper
completes the decision of a version left passed by a worker that stopped before making it.

Real database; the reaper is called as a service with ``now=``; messages are caught at the
broker's edge (the ``sent`` fixture)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from contributions.models import AdapterVersion, AuditEvent
from contributions.services import adapter_version_transition
from evaluation.models import EvaluationRun
from evaluation.policy import PolicyOutcome
from evaluation.services import reaper, runs
from evaluation.services.admission import version_admit_automatically
from routing.models import MixtureVersion
from tessera.errors import DomainError
from tests.evaluation.test_runs import fresh, queued_version, sent, upload_version  # noqa: F401

Run = EvaluationRun.Status
WORKER = "elsewhere:1"


def fault(run: EvaluationRun, code: str = "base_model_not_prepared") -> bool:
    """Claim ``run`` and fail it with ``code``, as a worker would."""
    claimed = runs.evaluation_run_claim(run=fresh(run), worker=WORKER)
    assert claimed is not None
    return runs.evaluation_run_fail(
        run=claimed, code=code, reason="No prepared base model here.", worker=WORKER
    )


def test_the_platform_failure_codes_are_not_the_contributors():
    assert {"sandbox_unavailable", "base_model_not_prepared", "worker_lost"} <= (
        runs.INFRASTRUCTURE_FAILURES
    )
    for own in ("adapter_refused", "deadline_passed", "no_targeted_task", "sandbox_memory"):
        assert own not in runs.INFRASTRUCTURE_FAILURES


def test_a_platform_fault_requeues_with_back_off_then_ends_freeing_the_weights(
    contributor,
    base_model,
    settings,
    sent,  # noqa: F811 (the fixture imported above)
    django_capture_on_commit_callbacks,
):
    settings.TESSERA_EVAL_INFRA_RETRIES = 2
    settings.TESSERA_EVAL_INFRA_BACKOFF_SECONDS = 60
    version, run = queued_version(contributor, variant=0)
    before = timezone.now()

    assert fault(run)
    run = fresh(run)
    assert (run.status, run.attempts, run.infra_retries) == (Run.QUEUED, 0, 1)
    assert before + timedelta(seconds=59) < run.retry_at < timezone.now() + timedelta(seconds=61)
    assert run.failure_code == "base_model_not_prepared"
    assert fresh(version).status == "queued" and version.platform_fault == ""
    told = AuditEvent.objects.filter(version=version).latest("id").reason
    assert "platform fault" in told and "not by your adapter" in told

    # Backing off: no claim, no message, not even the lost-message resend.
    assert runs.evaluation_run_claim(run=run, worker=WORKER) is None
    late = timezone.now() + timedelta(seconds=django_settings.TESSERA_EVAL_RESEND_QUEUED_SECONDS)
    with django_capture_on_commit_callbacks(execute=True):
        assert reaper.evaluation_runs_reap(now=run.retry_at - timedelta(seconds=1))["retried"] == []
    assert sent == []
    with django_capture_on_commit_callbacks(execute=True):
        report = reaper.evaluation_runs_reap(now=max(late, run.retry_at + timedelta(seconds=1)))
    assert (report["retried"], report["resent"]) == ([run.pk], [])
    assert sent == [([run.pk], "eval-cpu")]
    with django_capture_on_commit_callbacks(execute=True):
        assert reaper.evaluation_runs_reap(now=run.retry_at + timedelta(seconds=2))["retried"] == []
    assert len(sent) == 1  # one message per back-off, however often the reaper looks

    # The second fault waits twice as long; the third ends the run, not on the contributor.
    assert fault(run)
    run = fresh(run)
    assert run.infra_retries == 2
    assert run.retry_at > timezone.now() + timedelta(seconds=119)
    EvaluationRun.objects.filter(pk=run.pk).update(retry_at=timezone.now())
    assert fault(run)
    run, version = fresh(run), fresh(version)
    assert (run.status, run.failure_code) == (Run.FAILED, "base_model_not_prepared")
    assert "you may upload the same weights again" in run.failure_reason
    assert (version.status, version.platform_fault) == ("failed", "base_model_not_prepared")

    # The same weights may come again, once: the new version holds them.
    again = upload_version(contributor, adapter=version.adapter, variant=0)
    assert (again.weights_sha256, again.status) == (version.weights_sha256, "queued")
    with pytest.raises(DomainError) as refused:
        upload_version(contributor, adapter=version.adapter, variant=0)
    assert refused.value.code == "duplicate_upload"


def test_a_contributors_own_failure_ends_at_once_and_keeps_the_weights(contributor, base_model):
    version, run = queued_version(contributor, variant=1)
    assert fault(run, code="adapter_refused")
    run, version = fresh(run), fresh(version)
    assert (run.status, run.infra_retries, run.retry_at) == (Run.FAILED, 0, None)
    assert (version.status, version.platform_fault) == ("failed", "")
    with pytest.raises(DomainError) as refused:
        upload_version(contributor, adapter=version.adapter, variant=1)
    assert refused.value.code == "duplicate_upload"


def left_passed(user, variant: int) -> tuple[AdapterVersion, EvaluationRun]:
    """A version whose run passed and was recorded, the worker gone before admitting."""
    version, run = queued_version(user, variant=variant)
    run = runs.evaluation_run_claim(run=run, worker=WORKER)
    EvaluationRun.objects.filter(pk=run.pk).update(
        status=Run.SUCCEEDED, passed=True, needs_review=False, finished_at=timezone.now()
    )
    version = adapter_version_transition(
        version=fresh(version), to_status="passed", actor=None, reason="Passed every rule."
    )
    return version, fresh(run)


def test_the_reaper_completes_a_passed_version_left_without_a_decision(
    contributor, other_contributor, base_model, settings
):
    settings.TESSERA_ADMISSION_REVIEW = "never"
    admit, _ = left_passed(contributor, variant=2)
    grace = timedelta(seconds=settings.TESSERA_EVAL_DECISION_GRACE_SECONDS + 5)
    mixtures = MixtureVersion.objects.count()

    # Within the grace the worker may still be admitting it: left alone.
    assert reaper.evaluation_runs_reap(now=timezone.now())["admitted"] == []
    assert fresh(admit).status == "passed"

    report = reaper.evaluation_runs_reap(now=timezone.now() + grace)
    assert report["admitted"] == [admit.pk]
    assert fresh(admit).status == "admitted"
    assert MixtureVersion.objects.count() == mixtures + 1
    # Idempotent: a second sweep, or the late worker's own admission, changes nothing.
    assert reaper.evaluation_runs_reap(now=timezone.now() + grace)["admitted"] == []
    assert version_admit_automatically(version=admit, outcome=PolicyOutcome([], True)) is None
    assert AuditEvent.objects.filter(version=admit, action="version.admitted").count() == 1
    assert MixtureVersion.objects.count() == mixtures + 1

    # Under a policy that now asks for a maintainer, it goes to the review queue instead.
    settings.TESSERA_ADMISSION_REVIEW = "always"
    review, review_run = left_passed(other_contributor, variant=3)
    report = reaper.evaluation_runs_reap(now=timezone.now() + grace)
    assert (report["review"], report["admitted"]) == ([review.pk], [])
    assert fresh(review_run).needs_review is True
    assert fresh(review).status == "passed"
    assert reaper.evaluation_runs_reap(now=timezone.now() + grace)["review"] == []
    assert MixtureVersion.objects.count() == mixtures + 1


def test_the_reaper_and_the_usage_flush_have_their_own_queue_and_expire():
    from tessera.celery import app

    for name in ("evaluation.reap_runs", "routing.flush_usage"):
        assert app.amqp.router.route({}, name)["queue"].name == "maintenance"
    for entry in django_settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["options"]["queue"] == "maintenance"
        assert 0 < entry["options"]["expires"] <= entry["schedule"]
    assert app.amqp.router.route({}, "evaluation.evaluate_run")["queue"].name == "default"
