"""Celery tasks for evaluation: thin wrappers that take a primary key and call a service.

``evaluation.evaluate_run`` is acks_late with reject_on_worker_lost (settings), so a pool
process killed mid-run puts its message back; the run row's attempt counter, not the
broker, decides when to stop (brokers do not count redeliveries).
"""

from __future__ import annotations

import logging

from celery import shared_task

from evaluation.services.execution import evaluation_run_execute
from evaluation.services.reaper import evaluation_runs_reap
from evaluation.services.runs import TRANSIENT_ERRORS, evaluation_run_fail

logger = logging.getLogger(__name__)

MAX_TRANSIENT_RETRIES = 5


@shared_task(
    name="evaluation.evaluate_run",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=MAX_TRANSIENT_RETRIES,
)
def evaluate_run(self, run_id: int) -> str:
    """Evaluate one run. Quiet when the run is gone, finished, or owned by a live worker."""
    try:
        return evaluation_run_execute(run_id=run_id)
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= self.max_retries:
            _give_up(run_id, exc)
            raise
        countdown = min(120, 5 * 2**self.request.retries)
        logger.warning("run %s: transient error, retry in %ss: %s", run_id, countdown, exc)
        raise self.retry(exc=exc, countdown=countdown) from exc


def _give_up(run_id: int, exc: BaseException) -> None:
    """Transient errors outlasted the retries: a platform fault (runs.INFRASTRUCTURE_FAILURES),
    so the run is queued again after a back-off, or ends without failing the contributor."""
    from evaluation.models import EvaluationRun

    try:
        run = EvaluationRun.objects.filter(pk=run_id).first()
        if run is not None:
            evaluation_run_fail(
                run=run,
                code="transient_errors",
                reason=f"The evaluation kept failing on transient errors "
                f"({MAX_TRANSIENT_RETRIES} retries; last: {type(exc).__name__}).",
            )
    except TRANSIENT_ERRORS:
        logger.exception("run %s: could not record the failure either", run_id)


@shared_task(name="evaluation.reap_runs", ignore_result=True)
def reap_runs() -> dict[str, list[int]]:
    """Celery beat, every 30 s (settings.CELERY_BEAT_SCHEDULE), on the "maintenance" queue
    (settings.CELERY_TASK_ROUTES) so that long evaluations never keep it waiting."""
    report = evaluation_runs_reap()
    if any(report.values()):
        logger.info("reaper: %s", report)
    return report
