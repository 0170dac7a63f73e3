"""Executing a claimed run: the Celery task's service, the sandboxed child, heartbeats.

``evaluation_run_execute`` claims (or re-claims) the run, plans what it measures
(evaluation.services.plans), runs the child in the sandbox, and hands a valid answer to
evaluation.services.recording. See evaluation.services.runs for the run's states.
"""

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from contributions.base_models import MANIFEST_NAME
from contributions.models import AdapterVersion
from evaluation.models import (
    EvaluationRun,
)
from evaluation.services.plans import adapter_files, adapter_key, job_for, plan_for
from evaluation.services.recording import (
    answer_validated,
    results_record,
    signature_compute,
    untargeted_finish,
)
from evaluation.services.runs import (
    TRANSIENT_ERRORS,
    RunFailure,
    RunTakenAway,
    claim_is_lost,
    evaluation_run_claim,
    evaluation_run_fail,
    evaluation_run_reclaim,
    evaluation_run_release,
    worker_identity,
)
from evaluation.worker.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    run_sandboxed,
    sandbox_mode,
    workdir_create,
    workdir_remove,
    workdirs_remove_stale,
)
from evaluation.worker.specs import JobSpec

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
# The child, as the worker starts it. A test's worker bootstrap may swap it for a snippet.
CHILD_ARGV: list[str] = [sys.executable, "-m", "evaluation.worker.child"]

_FINISHED = (RunStatus.SUCCEEDED, RunStatus.FAILED)


class _Heartbeat:
    """Progress from the child, saved with the heartbeat at most every
    TESSERA_EVAL_HEARTBEAT_SECONDS; ``tick`` answers False once the run is not ours."""

    def __init__(self, run: EvaluationRun, worker: str) -> None:
        self.run_id, self.worker = run.pk, worker
        self.every = float(settings.TESSERA_EVAL_HEARTBEAT_SECONDS)
        self.last = 0.0
        self.done = self.total = 0
        self.label = "Starting the sandbox"

    def progress(self, done: int, total: int, label: str) -> None:
        self.done, self.total, self.label = done, total, label

    def tick(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return True
        self.last = now
        try:
            updated = EvaluationRun.objects.filter(
                pk=self.run_id, status=RunStatus.RUNNING, claimed_by=self.worker
            ).update(
                heartbeat_at=timezone.now(),
                progress_done=min(self.done, self.total),
                progress_total=self.total,
                progress_label=self.label[:200],
            )
        except TRANSIENT_ERRORS:
            # A blip must not kill a long evaluation; the reaper acts if it lasts.
            logger.warning("heartbeat of run %s not saved", self.run_id, exc_info=True)
            return True
        return updated == 1


# --- The task's service -------------------------------------------------------------------------


def evaluation_run_execute(*, run_id: int, worker: str | None = None) -> str:
    """Everything ``evaluation.evaluate_run`` does. Returns what happened, in one word:
    gone | finished | busy | lost | succeeded | failed | taken.

    Raises only transient errors (after giving the claim back), for the task to retry."""
    worker = worker or worker_identity()
    run = EvaluationRun.objects.select_related("version").filter(pk=run_id).first()
    if run is None:
        return "gone"
    if run.status in _FINISHED:
        return "finished"  # a redelivery of a finished run: nothing to do
    if run.status == RunStatus.RUNNING:
        if not claim_is_lost(run, worker=worker):
            return "busy"  # its worker looks alive: leave it (the reaper watches it)
        if run.attempts >= run.max_attempts:
            evaluation_run_fail(
                run=run,
                code="worker_lost",
                reason=f"The worker evaluating this version was lost {run.attempts} times "
                "(killed or crashed); giving up.",
                conditions={"claimed_by": run.claimed_by, "attempts": run.attempts},
            )
            return "lost"
        claimed = evaluation_run_reclaim(run=run, worker=worker)
    else:
        claimed = evaluation_run_claim(run=run, worker=worker)
    if claimed is None:
        return "busy"  # another worker got there first
    run = claimed
    try:
        _perform(run, worker)
    except RunTakenAway:
        return "taken"
    except RunFailure as failure:
        evaluation_run_fail(
            run=run, code=failure.code, reason=failure.reason, worker=worker, log=failure.log
        )
        return "failed"
    except TRANSIENT_ERRORS:
        with contextlib.suppress(*TRANSIENT_ERRORS):
            evaluation_run_release(run=run, worker=worker)
        raise
    except Exception as exc:
        # A bug or an unforeseen failure: recorded, never a run left running.
        logger.exception("evaluation run %s crashed", run.pk)
        evaluation_run_fail(
            run=run,
            code="internal_error",
            reason=f"The evaluation service failed unexpectedly ({type(exc).__name__}: {exc}).",
            worker=worker,
        )
        return "failed"
    run.refresh_from_db(fields=["status"])
    return "succeeded" if run.status == RunStatus.SUCCEEDED else "failed"


# --- Performing a claimed run -------------------------------------------------------------------


def _perform(run: EvaluationRun, worker: str) -> None:
    version = (
        AdapterVersion.objects.select_related("adapter", "base_model")
        .filter(pk=run.version_id)
        .get()
    )
    if version.status != VersionStatus.EVALUATING:
        raise RunFailure(
            "version_not_evaluating",
            f"The version is {version.status}; it is no longer waiting for this evaluation.",
        )
    plan = plan_for(version)
    if not plan.targeted:
        untargeted_finish(run, version, worker)
        return

    from evaluation.services.suites import suite_version_lock

    for suite_version in {task.suite_version for task in plan.tasks}:
        suite_version_lock(suite_version=suite_version)

    if not (Path(version.base_model.local_path) / MANIFEST_NAME).is_file():
        raise RunFailure(
            "base_model_not_prepared",
            f"The base model {version.base_model.name} has no prepared copy on this worker; "
            "an operator must run 'python manage.py prepare_base_model' here.",
        )
    try:
        mode = sandbox_mode()
    except SandboxUnavailable as exc:
        raise RunFailure(exc.code, exc.message) from exc

    started = time.monotonic()
    # A killed earlier attempt on this host left its copy behind: remove it first.
    prefix = f"tessera-run-{run.pk}-"
    workdirs_remove_stale(prefix)
    workdir, adapter_dir = workdir_create(files=adapter_files(version), prefix=prefix)
    try:
        device = "cuda" if run.queue == "eval-gpu" else "cpu"
        key = adapter_key(run.pk)
        job = job_for(plan, version, adapter_dir, device, key=key)
        outcome = _run_child(run, job, workdir, adapter_dir, worker, mode)
    finally:
        workdir_remove(workdir)
    log = outcome.log
    failure = outcome.failure()
    if outcome.aborted:
        raise RunTakenAway()
    if failure is not None:
        raise RunFailure(*failure, log=log)
    try:
        scores, sketch = answer_validated(outcome.result, job, version, key=key)
    except RunFailure as failure:
        failure.log = log
        raise
    except ValueError as exc:
        raise RunFailure(
            "sandbox_bad_output", f"The evaluation's output was invalid: {exc}", log=log
        ) from exc
    stats = outcome.result.get("stats") if isinstance(outcome.result, dict) else None
    log += f"\n[worker] sandbox {mode}; child finished in {outcome.duration_seconds:.1f}s"
    if isinstance(stats, dict):
        log += f"; stats {json.dumps(stats, default=str)[:2000]}"
    signature, note = signature_compute(version, plan)
    if note:
        log += f"\n[worker] {note}"
    log += f"\n[worker] evaluation took {time.monotonic() - started:.1f}s in all\n"
    results_record(run, version, plan, scores, sketch, signature, worker, log)


def _run_child(run, job: JobSpec, workdir: Path, adapter_dir: Path, worker: str, mode: str):
    remaining = (run.deadline_at - timezone.now()).total_seconds()
    # Leave time to record the results (and embed the signature) before the deadline.
    reserve = min(60.0, 0.1 * settings.TESSERA_EVAL_DEADLINE_SECONDS)
    wall = remaining - reserve
    if wall <= 0:
        raise RunFailure("deadline_passed", "The deadline passed before the evaluation started.")
    beat = _Heartbeat(run, worker)
    beat.tick(force=True)
    outcome = run_sandboxed(
        CHILD_ARGV,
        stdin_bytes=json.dumps(job.to_dict()).encode(),
        limits=SandboxLimits.from_settings(wall_seconds=wall),
        workdir=workdir,
        mode=mode,
        readonly=[adapter_dir],
        on_progress=beat.progress,
        tick=beat.tick,
    )
    if not outcome.aborted and not beat.tick(force=True):  # the last progress, saved
        outcome.aborted = True
    return outcome
