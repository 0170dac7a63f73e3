"""Evaluation runs: create, claim, fail, release. Executing a claimed run is in
evaluation.services.execution (planning in .plans, recording in .recording), the reaper in
.reaper; this module holds the run-row compare-and-sets they all use.

Run states (EvaluationRun.status) and the version's states alongside::

    queued ──claim (CAS, attempts+1)──▶ running ──results recorded (CAS)──▶ succeeded
      ▲   version queued → evaluating      │   version evaluating → passed | failed
      │                                    │                      (→ admitted, automatically)
      └──── lost worker, attempts left ────┤
            (reaper: heartbeat stale)      ├──▶ failed: domain failure, deadline, worker
            version evaluating → queued    │    lost max_attempts times, sandbox failure
                                           │    version → failed
      running ──lost worker seen by the task itself (pid dead here, or heartbeat stale)──▶
            running again (re-claim by CAS, attempts+1), or failed when attempts are used up
      running ──transient error (database, broker)──▶ queued, the attempt not counted; the
            Celery task retries with backoff (5 times), then the run fails "transient_errors"
      running ──its group's child failed as a whole──▶ queued, the attempt not counted,
            marked ``alone`` (next time in a child of its own), a fresh message

Every run-row change is a compare-and-set ``filter(pk=…, status=…[, claimed_by=…]).update``
checked for one row; the version moves only through adapter_version_transition in the
same transaction. A worker that finds a claim gone (the reaper failed or re-queued the
run) records nothing for that run, and stops its child once no run of the child's group
is left to it.

Concurrency contract: one Celery task per run id (``evaluation.evaluate_run``), delivered
at least once. Duplicates are harmless: the claim admits one worker, a finished run is a
no-op, and a running run whose claimant looks alive is left to it. A queued run may be
claimed by its own message or as a batch-mate by another run's (evaluation.services.groups):
whichever claims it first evaluates it, the other finds it running or finished.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone

from contributions.models import AdapterVersion
from contributions.services import VersionTransition, adapter_version_transition
from evaluation.models import (
    EvaluationRun,
)
from evaluation.worker.sandbox import (
    LOG_CAP_BYTES,
)
from tessera.errors import DomainError

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
# Errors worth retrying: the database or the broker went away for a moment.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)

# Failure codes that mean the platform failed, not the contributor's adapter. A run failing
# with one of these is queued again after a back-off (TESSERA_EVAL_INFRA_RETRIES times,
# TESSERA_EVAL_INFRA_BACKOFF_SECONDS doubling), then ends as a platform fault, which leaves
# its weights free to be uploaded again (AdapterVersion.platform_fault). Every other code is
# the contributor's: the adapter refused or crashing its own child (adapter_refused,
# sandbox_*), failed rules (no_targeted_task), its own run past its deadline
# (deadline_passed), a withdrawn version (version_not_evaluating).
INFRASTRUCTURE_FAILURES: frozenset[str] = frozenset(
    {
        "sandbox_unavailable",  # no working sandbox on the worker
        "base_model_not_prepared",  # the worker has no prepared base model
        "worker_lost",  # the worker died (attempts used up)
        "transient_errors",  # database or broker errors outlasted the task's retries
        "internal_error",  # a bug in the evaluation service
        "weights_changed",  # the stored file no longer matches its upload's sha256
    }
)
# The code a contributor reads on a version whose evaluation ended on a platform fault.
PLATFORM_FAULT = "platform_fault"


class RunTakenAway(Exception):
    """The run is no longer this worker's (reaped or re-queued): record nothing."""


class RunFailure(Exception):
    """A domain failure, recorded on the run with its code and reason."""

    def __init__(self, code: str, reason: str, *, log: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.log = code, reason, log


# --- Creating and enqueuing ---------------------------------------------------------------------


def evaluation_queue() -> str:
    return "eval-gpu" if settings.TESSERA_EVAL_GPU_WORKERS else "eval-cpu"


def evaluation_run_create(*, version: AdapterVersion) -> EvaluationRun:
    """validated → queued, and the version's run; the Celery task is sent only after the
    surrounding transaction commits (a worker must find the row)."""
    queue = evaluation_queue()
    with transaction.atomic():
        _check_live_runs(owner_id=version.adapter.owner_id)
        adapter_version_transition(
            version=version,
            to_status=VersionStatus.QUEUED,
            actor=None,
            reason=f"Queued for evaluation ({queue}).",
        )
        run = EvaluationRun.objects.create(
            version=version,
            queue=queue,
            max_attempts=settings.TESSERA_EVAL_MAX_ATTEMPTS,
            sent_at=timezone.now(),
        )
        run_id = run.pk
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return run


def _check_live_runs(*, owner_id: int) -> None:
    """At most TESSERA_LIVE_RUNS_PER_CONTRIBUTOR queued or running evaluations per
    contributor, so one contributor's burst of uploads cannot fill the workers' queue ahead
    of everyone else. Raised inside the upload's transaction (this runs from its transition
    listener), so the refused upload is rolled back with its files; the upload holds the
    owner's lock (contributions.services.contributor_lock), which makes the count exact."""
    limit = settings.TESSERA_LIVE_RUNS_PER_CONTRIBUTOR
    live = EvaluationRun.objects.filter(
        version__adapter__owner_id=owner_id, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]
    ).count()
    if live >= limit:
        raise DomainError(
            "too_many_live_evaluations",
            f"You have {live} evaluations queued or running, the most at once is {limit}; "
            "upload this version when one of them has finished.",
            kind="conflict",
            details={"limit": limit, "live": live},
        )


def version_validated_queue(event: VersionTransition) -> None:
    """Transition listener (registered in EvaluationConfig.ready): a version that passed
    intake is queued for evaluation in the same transaction."""
    if event.to_status == VersionStatus.VALIDATED:
        evaluation_run_create(version=event.version)


def run_enqueue(*, run_id: int, queue: str) -> None:
    """Send ``evaluation.evaluate_run``. Called after commit. A broker that is down here is
    logged, not raised: the upload (or the reaper's work) has committed and must not look
    failed. Such a run stays queued with no message until the reaper sends it again
    (``evaluation_run_resend``)."""
    from evaluation.tasks import evaluate_run

    try:
        evaluate_run.apply_async(args=[run_id], queue=queue)
    except Exception:  # kombu/redis connection errors have no common base worth naming
        logger.exception("could not enqueue evaluation run %s on %s", run_id, queue)


# --- Claiming -----------------------------------------------------------------------------


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim_fields(now: datetime, worker: str) -> dict[str, Any]:
    return {
        "status": RunStatus.RUNNING,
        "attempts": F("attempts") + 1,
        "claimed_by": worker[:200],
        "started_at": now,
        "heartbeat_at": now,
        "deadline_at": now + timedelta(seconds=settings.TESSERA_EVAL_DEADLINE_SECONDS),
        "finished_at": None,
        "progress_done": 0,
        "progress_total": 0,
        "progress_label": "Starting",
        "retry_at": None,
    }


def evaluation_run_claim(*, run: EvaluationRun, worker: str) -> EvaluationRun | None:
    """queued → running for ``worker``; None when another worker got there first. The
    version moves queued → evaluating in the same transaction (a withdrawn version stays
    withdrawn; the run then fails in evaluation_run_execute)."""
    now = timezone.now()
    with transaction.atomic():
        # A run backing off after a platform fault waits for its retry_at (the reaper sends
        # it then); an early duplicate message finds it not claimable.
        claimed = (
            EvaluationRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED)
            .filter(Q(retry_at__isnull=True) | Q(retry_at__lte=now))
            .update(**_claim_fields(now, worker))
        )
        if claimed != 1:
            return None
        run = EvaluationRun.objects.select_related("version").get(pk=run.pk)
        version = AdapterVersion.objects.select_for_update().get(pk=run.version_id)
        if version.status == VersionStatus.QUEUED:
            adapter_version_transition(
                version=version,
                to_status=VersionStatus.EVALUATING,
                actor=None,
                reason=f"Evaluation started (attempt {run.attempts} of {run.max_attempts}).",
            )
        run.version = version
    return run


def evaluation_run_reclaim(*, run: EvaluationRun, worker: str) -> EvaluationRun | None:
    """A running run whose worker is lost: take it over (attempts+1) by compare-and-set on
    the claim we saw; None if anything moved meanwhile."""
    now = timezone.now()
    with transaction.atomic():
        claimed = EvaluationRun.objects.filter(
            pk=run.pk,
            status=RunStatus.RUNNING,
            claimed_by=run.claimed_by,
            attempts=run.attempts,
        ).update(**_claim_fields(now, worker))
        if claimed != 1:
            return None
    return EvaluationRun.objects.select_related("version").get(pk=run.pk)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def claim_is_lost(run: EvaluationRun, *, worker: str, now: datetime | None = None) -> bool:
    """Whether a running run's worker is gone: its heartbeat is stale, or it was claimed on
    this host by a process that is dead — or by this very process, which is here, not
    running it (a prefork/solo pool runs one task at a time per process)."""
    now = now or timezone.now()
    stale = timedelta(seconds=settings.TESSERA_EVAL_STALE_AFTER_SECONDS)
    if run.heartbeat_at is None or run.heartbeat_at < now - stale:
        return True
    host, _, pid = run.claimed_by.rpartition(":")
    my_host, _, my_pid = worker.rpartition(":")
    if host != my_host or not pid.isdigit():
        return False
    if pid == my_pid:
        return True
    return not _pid_alive(int(pid))


# --- Failing, releasing, beating --------------------------------------------------------------


def _version_to_failed(version_id: int, reason: str, *, platform_fault: str = "") -> None:
    """Caller holds the transaction. Only a version still in evaluation moves; with
    ``platform_fault`` (the run's code) it is marked as ended by the platform."""
    version = AdapterVersion.objects.select_for_update().get(pk=version_id)
    if version.status in (VersionStatus.QUEUED, VersionStatus.EVALUATING):
        adapter_version_transition(
            version=version,
            to_status=VersionStatus.FAILED,
            actor=None,
            reason=f"Evaluation failed: {reason}",
        )
        if platform_fault:
            AdapterVersion.objects.filter(pk=version_id).update(platform_fault=platform_fault)


def infra_backoff_seconds(retries: int) -> float:
    """The wait before infrastructure retry number ``retries + 1``: doubling, capped."""
    base = settings.TESSERA_EVAL_INFRA_BACKOFF_SECONDS
    return min(base * 2**retries, settings.TESSERA_EVAL_INFRA_BACKOFF_MAX_SECONDS)


def evaluation_run_fail(
    *,
    run: EvaluationRun,
    code: str,
    reason: str,
    log: str | None = None,
    worker: str | None = None,
    conditions: dict[str, Any] | None = None,
) -> bool:
    """queued|running → failed with ``code`` and ``reason``; the version → failed. With
    ``worker``, only if the run is still that worker's; ``conditions`` narrow the
    compare-and-set further. False when it had moved on.

    A code in INFRASTRUCTURE_FAILURES does not fail the contributor: the run is queued
    again after a back-off while infrastructure retries are left (evaluation_run_infra_retry),
    and only then fails, the version marked with its platform fault."""
    now = timezone.now()
    live = EvaluationRun.objects.filter(pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    if worker is not None:
        live = live.filter(claimed_by=worker)
    if conditions:
        live = live.filter(**conditions)
    fault = ""
    if code in INFRASTRUCTURE_FAILURES:
        retries = live.values_list("infra_retries", flat=True).first()
        if retries is None:
            return False
        if retries < settings.TESSERA_EVAL_INFRA_RETRIES:
            return evaluation_run_infra_retry(
                run=run,
                live=live.filter(infra_retries=retries),
                retries=retries,
                code=code,
                reason=reason,
                log=log,
                now=now,
            )
        live = live.filter(infra_retries=retries)
        fault = code
        reason = (
            f"{reason} The evaluation was interrupted by a platform fault, not by your "
            f"adapter, and ended after {retries} retries; you may upload the same weights again."
        )
    fields: dict[str, Any] = {
        "status": RunStatus.FAILED,
        "failure_code": code[:64],
        "failure_reason": reason,
        "finished_at": now,
        "passed": None,
    }
    if log is not None:
        fields["log"] = log[-LOG_CAP_BYTES:]
    if run.started_at is not None:
        fields["duration_seconds"] = (now - run.started_at).total_seconds()
    with transaction.atomic():
        if live.update(**fields) != 1:
            return False
        _version_to_failed(run.version_id, reason, platform_fault=fault)
    logger.info("evaluation run %s failed (%s): %s", run.pk, code, reason)
    return True


def evaluation_run_infra_retry(
    *, run: EvaluationRun, live, retries: int, code: str, reason: str, log: str | None, now
) -> bool:
    """queued|running → queued after a platform fault: the attempts start again, the
    infrastructure retries count one more, and ``retry_at`` holds it back for the back-off
    (no claim before; the reaper sends its message then). The version goes back to queued
    with the reason, which the contributor reads. ``live`` is the caller's compare-and-set."""
    retry_at = now + timedelta(seconds=infra_backoff_seconds(retries))
    limit = settings.TESSERA_EVAL_INFRA_RETRIES
    told = (
        f"Interrupted by a platform fault ({code}), not by your adapter: {reason} "
        f"Queued again (retry {retries + 1} of {limit}) after {retry_at:%H:%M:%S} UTC."
    )
    fields: dict[str, Any] = {
        "status": RunStatus.QUEUED,
        "claimed_by": "",
        "heartbeat_at": None,
        "deadline_at": None,
        "attempts": 0,
        "infra_retries": retries + 1,
        "retry_at": retry_at,
        "failure_code": code[:64],
        "failure_reason": told,
        "progress_label": f"Waiting to retry after a platform fault ({code})"[:200],
    }
    if log is not None:
        fields["log"] = log[-LOG_CAP_BYTES:]
    with transaction.atomic():
        if live.update(**fields) != 1:
            return False
        version = AdapterVersion.objects.select_for_update().get(pk=run.version_id)
        if version.status == VersionStatus.EVALUATING:
            adapter_version_transition(
                version=version, to_status=VersionStatus.QUEUED, actor=None, reason=told
            )
    logger.warning("evaluation run %s: platform fault %s, retry at %s", run.pk, code, retry_at)
    return True


def evaluation_run_retry_due(*, run: EvaluationRun, now: datetime | None = None) -> bool:
    """A run whose back-off after a platform fault is over gets its message (the reaper).
    CAS on the ``retry_at`` we saw, so two reapers send one message."""
    now = now or timezone.now()
    with transaction.atomic():
        moved = EvaluationRun.objects.filter(
            pk=run.pk, status=RunStatus.QUEUED, retry_at=run.retry_at, retry_at__lte=now
        ).update(retry_at=None, sent_at=now)
        if moved != 1:
            return False
        run_id, queue = run.pk, run.queue
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return True


def evaluation_run_requeue(*, run: EvaluationRun, reason: str) -> bool:
    """running → queued after a lost worker (attempts left); version evaluating → queued;
    a fresh task message after commit. CAS on the heartbeat we saw."""
    with transaction.atomic():
        moved = EvaluationRun.objects.filter(
            pk=run.pk,
            status=RunStatus.RUNNING,
            claimed_by=run.claimed_by,
            heartbeat_at=run.heartbeat_at,
        ).update(
            status=RunStatus.QUEUED,
            claimed_by="",
            heartbeat_at=None,
            deadline_at=None,
            sent_at=timezone.now(),
            progress_label=reason[:200],
        )
        if moved != 1:
            return False
        version = AdapterVersion.objects.select_for_update().get(pk=run.version_id)
        if version.status == VersionStatus.EVALUATING:
            adapter_version_transition(
                version=version, to_status=VersionStatus.QUEUED, actor=None, reason=reason
            )
        run_id, queue = run.pk, run.queue
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return True


def evaluation_run_resend(*, run: EvaluationRun, now: datetime | None = None) -> bool:
    """A queued run's message is sent again (the reaper, for a run queued too long since
    its last message). CAS on the ``sent_at`` we saw, so two reapers send one message; a
    message that was not lost after all makes a duplicate, which the claim makes harmless."""
    now = now or timezone.now()
    with transaction.atomic():
        moved = EvaluationRun.objects.filter(
            pk=run.pk, status=RunStatus.QUEUED, sent_at=run.sent_at
        ).update(sent_at=now)
        if moved != 1:
            return False
        run_id, queue = run.pk, run.queue
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return True


def evaluation_run_release(*, run: EvaluationRun, worker: str, resend: bool = False) -> bool:
    """Give a run back after a transient error: running → queued, the attempt not counted
    (transient errors are capped by the task's retries instead). The run whose message is
    being handled is retried by its task; a batch-mate of its group, whose own message may
    have been handled already, is sent a fresh one (``resend``)."""
    return _release(
        run=run,
        worker=worker,
        label="Waiting to retry after a transient error",
        reason="Evaluation interrupted by a transient error; it will be retried.",
        resend=resend,
    )


def evaluation_run_release_alone(*, run: EvaluationRun, worker: str, why: str) -> bool:
    """Give back a run whose group's child failed as a whole (crash, memory, deadline,
    unreadable output): running → queued, the attempt not counted (the run may not be the
    cause), marked ``alone`` so that it is evaluated in a child of its own next time, and a
    fresh message after commit. A run evaluated alone that fails is failed as usual, so a
    broken adapter ends up failing its own run only."""
    return _release(
        run=run,
        worker=worker,
        label="Waiting to be evaluated on its own",
        reason=f"Evaluated in a group whose evaluation failed ({why[:300]}); "
        "it will be evaluated on its own.",
        resend=True,
        alone=True,
    )


def _release(
    *, run: EvaluationRun, worker: str, label: str, reason: str, resend: bool, alone: bool = False
) -> bool:
    """running → queued by compare-and-set on ``worker``'s claim; version evaluating →
    queued in the same transaction. False when the run was no longer this worker's."""
    fields: dict[str, Any] = {
        "status": RunStatus.QUEUED,
        "claimed_by": "",
        "heartbeat_at": None,
        "deadline_at": None,
        "attempts": F("attempts") - 1,
        "progress_label": label,
    }
    if alone:
        fields["alone"] = True
    if resend:
        fields["sent_at"] = timezone.now()
    with transaction.atomic():
        moved = EvaluationRun.objects.filter(
            pk=run.pk, status=RunStatus.RUNNING, claimed_by=worker
        ).update(**fields)
        if moved != 1:
            return False
        version = AdapterVersion.objects.select_for_update().get(pk=run.version_id)
        if version.status == VersionStatus.EVALUATING:
            adapter_version_transition(
                version=version, to_status=VersionStatus.QUEUED, actor=None, reason=reason
            )
        if resend:
            run_id, queue = run.pk, run.queue
            transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return True
