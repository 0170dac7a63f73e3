"""The reaper (Celery beat, on the "maintenance" queue): runs past their deadline, runs
whose worker is lost, runs queued so long since their message was sent that it may be lost,
runs whose back-off after a platform fault is over, and versions left passed without the
decision their run leads to. Nothing is left at a dead end."""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F, OuterRef, Q, Subquery
from django.utils import timezone

from contributions.models import AdapterVersion
from evaluation.models import (
    EvaluationRun,
)
from evaluation.services.admission import version_decision_complete
from evaluation.services.runs import (
    evaluation_run_fail,
    evaluation_run_requeue,
    evaluation_run_resend,
    evaluation_run_retry_due,
)

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status


# --- The reaper ---------------------------------------------------------------------------------


def evaluation_runs_reap(*, now: datetime | None = None) -> dict[str, list[int]]:
    """Run by celery beat (``evaluation.reap_runs``). Running runs past their deadline are
    failed ("deadline passed"); running runs whose heartbeat is stale are re-queued, or
    failed when their attempts are used up. Each change is a compare-and-set, so a worker
    finishing at the same moment wins or loses cleanly (its own CAS then fails and it
    records nothing).

    A queued run whose message was sent more than TESSERA_EVAL_RESEND_QUEUED_SECONDS ago
    gets a fresh one: the broker may have lost it (a filesystem broker without its folders,
    a flushed Redis) or the send failed. In a long queue that makes a duplicate message,
    which costs one indexed read: the claim admits one worker, the others see it taken.

    A run re-queued after a platform fault is sent once its ``retry_at`` has passed
    ("retried"). A version left passed with no decision (see undecided_versions_complete)
    is admitted or sent to review ("admitted", "review")."""
    now = now or timezone.now()
    stale_before = now - timedelta(seconds=settings.TESSERA_EVAL_STALE_AFTER_SECONDS)
    report: dict[str, list[int]] = {
        "deadline": [],
        "requeued": [],
        "lost": [],
        "resent": [],
        "retried": [],
        "admitted": [],
        "review": [],
    }
    running = EvaluationRun.objects.filter(status=RunStatus.RUNNING)
    for run in running.filter(deadline_at__lt=now):
        if evaluation_run_fail(
            run=run,
            code="deadline_passed",
            reason=f"The evaluation did not finish by its deadline "
            f"({settings.TESSERA_EVAL_DEADLINE_SECONDS} s after it started, at "
            f"{run.deadline_at:%Y-%m-%d %H:%M:%S} UTC); it was stopped.",
            conditions={"status": RunStatus.RUNNING, "deadline_at__lt": now},
        ):
            report["deadline"].append(run.pk)
    for run in running.filter(heartbeat_at__lt=stale_before):
        if run.attempts >= run.max_attempts:
            if evaluation_run_fail(
                run=run,
                code="worker_lost",
                reason=f"The worker evaluating this version was lost {run.attempts} times "
                "(no heartbeat); giving up.",
                conditions={"status": RunStatus.RUNNING, "heartbeat_at": run.heartbeat_at},
            ):
                report["lost"].append(run.pk)
        elif evaluation_run_requeue(
            run=run,
            reason=f"The worker stopped sending heartbeats (attempt {run.attempts} of "
            f"{run.max_attempts}); queued again.",
        ):
            report["requeued"].append(run.pk)
    # Running runs with no heartbeat at all cannot exist (the claim sets it); be safe.
    for run in running.filter(heartbeat_at__isnull=True, started_at__lt=stale_before):
        if evaluation_run_fail(
            run=run, code="worker_lost", reason="The run had no heartbeat.", worker=run.claimed_by
        ):
            report["lost"].append(run.pk)
    resend_before = now - timedelta(seconds=settings.TESSERA_EVAL_RESEND_QUEUED_SECONDS)
    waiting = EvaluationRun.objects.filter(status=RunStatus.QUEUED, retry_at__isnull=True).filter(
        Q(sent_at__lt=resend_before) | Q(sent_at__isnull=True, created_at__lt=resend_before)
    )
    for run in waiting.order_by("pk"):
        if evaluation_run_resend(run=run, now=now):
            report["resent"].append(run.pk)
    due = EvaluationRun.objects.filter(status=RunStatus.QUEUED, retry_at__lte=now)
    for run in due.order_by("retry_at", "pk"):
        if evaluation_run_retry_due(run=run, now=now):
            report["retried"].append(run.pk)
    for decision, version_id in undecided_versions_complete(now=now):
        report[decision].append(version_id)
    return report


def undecided_versions_complete(*, now: datetime) -> list[tuple[str, int]]:
    """Versions left ``passed`` by a run that passed and asked for no review, at least
    TESSERA_EVAL_DECISION_GRACE_SECONDS after it finished (the worker that recorded it
    admits at once after committing; past the grace, it never will): their decision is
    completed (admission.version_decision_complete). A version waiting in review has a run
    marked needs_review and is no dead end."""
    settled_before = now - timedelta(seconds=settings.TESSERA_EVAL_DECISION_GRACE_SECONDS)
    done: list[tuple[str, int]] = []
    latest = EvaluationRun.objects.filter(version=OuterRef("pk")).order_by("-created_at", "-pk")
    undecided = (
        AdapterVersion.objects.select_related("adapter")
        .filter(status=VersionStatus.PASSED, status_changed_at__lt=settled_before)
        .filter(appeal__isnull=True)
        .annotate(latest_run=Subquery(latest.values("pk")[:1]))
        .filter(
            evaluation_runs__pk=F("latest_run"),
            evaluation_runs__status=RunStatus.SUCCEEDED,
            evaluation_runs__passed=True,
            evaluation_runs__needs_review=False,
            evaluation_runs__finished_at__lt=settled_before,
        )
        .order_by("pk")
    )
    for version in undecided:
        run = EvaluationRun.objects.get(pk=version.latest_run)
        decision = version_decision_complete(version=version, run=run)
        if decision is not None:
            logger.warning("version %s was left passed undecided: %s", version.pk, decision)
            done.append((decision, version.pk))
    return done
