"""The steps every per-mixture-version Celery job shares (the scoreboard, the learned router,
the merged adapter): one row per mixture version, queued → running → done | failed (or
superseded by a newer mixture version's row), computed by an ``acks_late`` task with
``reject_on_worker_lost`` on the evaluation queue.

Every transition is a conditional UPDATE on the row's status (and, for a take-over, on the
``started_at`` that was read), so of several workers handed the same message (redelivery,
a repeated command) exactly one computes. No step holds a lock or a transaction: the
domain step that follows a claim may run for minutes.

The domain step itself (scoring, training, merging) and what a finished row holds stay in
each job's own service; these are only the moves between statuses.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Protocol

from django.conf import settings
from django.utils import timezone

from evaluation.services.runs import evaluation_queue
from routing.models import MixtureVersion
from tessera.celery import app as celery_app

logger = logging.getLogger(__name__)

# Every job model's Status has these values (tests/routing/test_jobs.py checks it); plain
# strings here so the steps need not know which model they move.
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
SUPERSEDED = "superseded"


class JobRow(Protocol):
    """A job row: a model instance with a status, a start time and its mixture version."""

    pk: Any
    status: str
    started_at: Any
    mixture: MixtureVersion

    def refresh_from_db(self) -> None: ...


def _rows(row: JobRow) -> Any:
    """The queryset of ``row``'s model, narrowed to ``row``."""
    return type(row)._default_manager.filter(pk=row.pk)


def job_enqueue(*, task: str, pk: int, label: str) -> None:
    """Send the task named ``task`` for row ``pk`` to the evaluation queue (its workers have
    the sandbox and the base model). Sent by name, so a service never imports the module of
    tasks that imports it. Called after the publishing transaction commits, so the worker
    sees the row. A broker that is down is logged, not raised: the mixture is published
    regardless, and each job's management command does the work by hand."""
    try:
        celery_app.send_task(task, args=[pk], queue=evaluation_queue())
    except Exception:  # kombu/redis connection errors share no useful base class
        logger.exception("could not enqueue the %s %s", label, pk)
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        # kombu's filesystem transport (the embedded default) delivers messages in the order
        # of the millisecond they were sent, then of a random id: spaced by a millisecond,
        # jobs sent in a row are taken in that order, so a mixture's board (seconds) is not
        # left behind its learned router's training (a minute on a CPU).
        time.sleep(0.002)


def job_lost(row: JobRow) -> bool:
    """Whether a running ``row`` has been running longer than a task may run
    (CELERY_TASK_TIME_LIMIT), or never recorded its start: its worker is gone."""
    started = row.started_at
    limit = timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)
    return started is None or started < timezone.now() - limit


def job_take_over_if_lost(*, row: JobRow) -> None:
    """Put a running ``row`` whose worker is gone (``job_lost``) back to queued, so that the
    redelivered message can claim it; ``row`` is then re-read. Compare-and-set on the
    ``started_at`` read: of several redeliveries racing, the update matches once, and a row
    a live worker claimed again meanwhile (a new start) is left to it. A row that is not
    running, or not lost, is left as it is (and not re-read)."""
    if row.status != RUNNING or not job_lost(row):
        return
    _rows(row).filter(status=RUNNING, started_at=row.started_at).update(status=QUEUED)
    row.refresh_from_db()


def job_supersede_if_newer(*, row: JobRow) -> bool:
    """Whether a newer mixture version has a row of the same model that is queued, running
    or done (a failed one does not count: this row may still be the latest good one); if
    so, a still-queued ``row`` is marked superseded. True even when the mark found the row
    claimed meanwhile: the caller stops either way, and the claimer computes it. For models
    with a superseded status and a ``finished_at``."""
    newer = type(row)._default_manager.filter(
        mixture__number__gt=row.mixture.number, status__in=[QUEUED, RUNNING, DONE]
    )
    if not newer.exists():
        return False
    _rows(row).filter(status=QUEUED).update(status=SUPERSEDED, finished_at=timezone.now())
    return True


def job_claim(*, row: JobRow) -> bool:
    """Move a queued ``row`` to running, stamping ``started_at``; whether this caller won it.
    False when the update count is not 1: another worker got there first (or the row left
    queued meanwhile), and this caller must not compute. On success ``row`` in memory
    carries the new status and start."""
    started = timezone.now()
    if _rows(row).filter(status=QUEUED).update(status=RUNNING, started_at=started) != 1:
        return False
    row.status, row.started_at = RUNNING, started
    return True


def job_start(*, row: JobRow, coalesced: bool) -> str | None:
    """The steps before a job's domain step, in their order: take ``row`` over if its
    worker is lost, stop unless it is queued, stop if a newer mixture version supersedes it
    (only when ``coalesced``: the model has a superseded status), then claim it. None when
    this caller now holds the row (running); otherwise the word the job returns: finished
    (done, failed, superseded, or running on a live worker) | superseded | busy (another
    worker claimed it between the read and the claim)."""
    job_take_over_if_lost(row=row)
    if row.status != QUEUED:
        return "finished"
    if coalesced and job_supersede_if_newer(row=row):
        return "superseded"
    if not job_claim(row=row):
        return "busy"
    return None


def job_settle(*, row: JobRow, **fields: Any) -> bool:
    """Write ``fields`` (a done or failed status and what goes with it) to ``row`` only while
    it is still running; whether it was. False means another worker, which took the row
    over when this one ran past the time limit, settled it first: anything this one wrote
    elsewhere (files) is the caller's to delete. Only the status is compared, not the start,
    so of two workers holding a taken-over row the first to settle wins (the task's hard
    time limit is what normally stops the slow one before then)."""
    return _rows(row).filter(status=RUNNING).update(**fields) == 1


def job_failure_reason(exc: BaseException) -> str:
    """What a failed row records of ``exc``: its type and message, cut to fit."""
    return f"{type(exc).__name__}: {exc}"[:2000]
