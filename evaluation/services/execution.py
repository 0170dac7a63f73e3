"""Executing claimed runs: the Celery task's service, the sandboxed child, recording.

``evaluation_run_execute`` claims (or re-claims) the run whose message arrived, claims up
to TESSERA_EVAL_GROUP_SIZE - 1 more queued runs to evaluate with it in the same child
(evaluation.services.groups), plans what each measures (evaluation.services.plans), runs
one child for the group in the sandbox, and hands each run's part of a valid answer to
evaluation.services.recording. See evaluation.services.runs for the run's states.

Every run of a group ends on its own: each step that concerns one run (its plan, its
weights, its part of the answer, its recording) runs in its own ``_settling`` block, where a
failure of any kind fails that run only, as it would a run evaluated alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from contributions.base_models import MANIFEST_NAME
from contributions.models import AdapterVersion
from evaluation.models import (
    EvaluationRun,
)
from evaluation.services.groups import GroupHeartbeat, group_claim, group_wall_seconds, log_for
from evaluation.services.plans import JobPart, Plan, adapter_files, adapter_key, job_for, plan_for
from evaluation.services.recording import (
    answer_shape_check,
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
    evaluation_run_release_alone,
    worker_identity,
)
from evaluation.worker.sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    run_sandboxed,
    sandbox_mode,
    workdir_add_readonly,
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


@dataclass
class _Member:
    """One claimed run of the group, as far as it got. ``word`` is set once it has ended
    (see evaluation_run_execute); until then it is still this worker's to record."""

    run: EvaluationRun
    version: AdapterVersion | None = None
    plan: Plan | None = None
    adapter_dir: Path | None = None
    word: str | None = None

    @property
    def key(self) -> str:
        return adapter_key(self.run.pk)


# --- The task's service -------------------------------------------------------------------------


def evaluation_run_execute(*, run_id: int, worker: str | None = None) -> str:
    """Everything ``evaluation.evaluate_run`` does. Returns what happened to the run whose
    message arrived, in one word: gone | finished | busy | lost | succeeded | failed |
    taken | released (its group's child failed as a whole; it waits to be evaluated alone).

    Raises only transient errors (after giving back every claim of the group not settled
    yet), for the task to retry."""
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
    members = [_Member(grouped) for grouped in group_claim(lead=claimed, worker=worker)]
    if len(members) > 1:
        logger.info("run %s: evaluated with runs %s", run_id, [m.run.pk for m in members[1:]])
    try:
        _perform(members, worker)
    except TRANSIENT_ERRORS:
        # Every run not settled yet goes back to the queue, the attempt not counted. This
        # run's task retries it; a batch-mate's own message may have been handled already
        # ("busy"), so it gets a fresh one.
        for member in members:
            if member.word is None:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    evaluation_run_release(
                        run=member.run, worker=worker, resend=member is not members[0]
                    )
        raise
    except Exception as exc:  # a bug outside any one step: still, no run is left running
        _fail_unexpected(_going_on(members), worker, exc)
    if len(members) > 1:
        words = {member.run.pk: member.word for member in members}
        logger.info("run %s: group of %s ended %s", run_id, len(members), words)
    if members[0].word is not None:
        return members[0].word
    claimed.refresh_from_db(fields=["status"])
    return "succeeded" if claimed.status == RunStatus.SUCCEEDED else "failed"


@contextlib.contextmanager
def _settling(members: Sequence[_Member], worker: str) -> Iterator[None]:
    """A step of ``members`` (one run's own step, or the group's shared one): if it fails,
    each of those runs ends with that failure, as a run evaluated alone would. RunFailure
    and unexpected exceptions fail it, RunTakenAway leaves it to whoever took it; the
    exception goes no further (``word`` says how each run ended). Transient errors
    propagate: the caller gives the claims back."""
    try:
        yield
    except RunTakenAway:
        for member in members:
            member.word = "taken"
    except RunFailure as failure:
        for member in members:
            evaluation_run_fail(
                run=member.run,
                code=failure.code,
                reason=failure.reason,
                worker=worker,
                log=failure.log,
            )
            member.word = "failed"
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        _fail_unexpected(members, worker, exc)


def _fail_unexpected(members: Sequence[_Member], worker: str, exc: Exception) -> None:
    """A bug or an unforeseen failure: recorded, never a run left running."""
    logger.exception("evaluation of runs %s crashed", [m.run.pk for m in members])
    for member in members:
        evaluation_run_fail(
            run=member.run,
            code="internal_error",
            reason=f"The evaluation service failed unexpectedly ({type(exc).__name__}: {exc}).",
            worker=worker,
        )
        member.word = "failed"


def _going_on(members: Sequence[_Member]) -> list[_Member]:
    return [m for m in members if m.word is None]


# --- Performing claimed runs --------------------------------------------------------------------


def _perform(members: list[_Member], worker: str) -> None:
    for member in members:
        with _settling([member], worker):
            _prepare(member, worker)
    pending = _going_on(members)
    if not pending:
        return
    started = time.monotonic()
    with _settling(pending, worker):
        # Every run of a group is of one base model (group_claim): one check for all.
        mode = _environment(pending[0].version)
        # The workdir is named after the run whose message is handled: if this worker is
        # killed mid-run, that message is delivered again, and its retry removes the copies
        # (all of the group's, inside it) that SIGKILL left behind on this host.
        prefix = f"tessera-run-{members[0].run.pk}-"
        workdirs_remove_stale(prefix)
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if not _going_on(pending):
        return
    try:
        for member in pending:
            with _settling([member], worker):
                member.adapter_dir = workdir_add_readonly(
                    workdir, f"adapter-{member.run.pk}", files=adapter_files(member.version)
                )
        ready = _going_on(pending)
        if not ready:
            return
        with _settling(ready, worker):
            device = "cuda" if ready[0].run.queue == "eval-gpu" else "cpu"
            job = job_for(
                [JobPart(m.key, m.plan, m.version, m.adapter_dir) for m in ready], device=device
            )
            outcome, beat = _run_child(ready, job, workdir, worker, mode)
        if not _going_on(ready):
            return
    finally:
        workdir_remove(workdir)
    _conclude(ready, job, outcome, beat, worker, mode, started)


def _prepare(member: _Member, worker: str) -> None:
    """The run's version and plan; a run that targets no task ends here, with its rule."""
    run = member.run
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
        untargeted_finish(run, version, worker)  # it never enters the job
        member.word = "failed"
        return

    from evaluation.services.suites import suite_version_lock

    for suite_version in {task.suite_version for task in plan.tasks}:
        suite_version_lock(suite_version=suite_version)
    member.version, member.plan = version, plan


def _environment(version: AdapterVersion) -> str:
    """The sandbox mode, once this worker is known to be able to evaluate ``version``."""
    if not (Path(version.base_model.local_path) / MANIFEST_NAME).is_file():
        raise RunFailure(
            "base_model_not_prepared",
            f"The base model {version.base_model.name} has no prepared copy on this worker; "
            "an operator must run 'python manage.py prepare_base_model' here.",
        )
    try:
        return sandbox_mode()
    except SandboxUnavailable as exc:
        raise RunFailure(exc.code, exc.message) from exc


def _run_child(
    members: Sequence[_Member], job: JobSpec, workdir: Path, worker: str, mode: str
) -> tuple[SandboxResult, GroupHeartbeat]:
    wall = group_wall_seconds([m.run for m in members])
    if wall <= 0:
        raise RunFailure("deadline_passed", "The deadline passed before the evaluation started.")
    beat = GroupHeartbeat([m.run for m in members], worker)
    beat.tick(force=True)
    outcome = run_sandboxed(
        CHILD_ARGV,
        stdin_bytes=json.dumps(job.to_dict()).encode(),
        limits=SandboxLimits.from_settings(wall_seconds=wall),
        workdir=workdir,
        mode=mode,
        readonly=[adapter.adapter_dir for adapter in job.adapters],
        inputs=[job.base_model_path],
        on_progress=beat.progress,
        tick=beat.tick,
    )
    if not outcome.aborted and not beat.tick(force=True):  # the last progress, saved
        outcome.aborted = True
    return outcome, beat


def _conclude(
    members: Sequence[_Member],
    job: JobSpec,
    outcome: SandboxResult,
    beat: GroupHeartbeat,
    worker: str,
    mode: str,
    started: float,
) -> None:
    """After the child: a run taken away meanwhile records nothing. When the child failed as
    a whole, a group's runs are given back to be evaluated alone (which of them caused it
    cannot be told) and a run evaluated alone fails; else each run is checked and recorded
    on its own."""
    beat.progress(beat.done, beat.total, "Recording the results")
    for member in members:
        if outcome.aborted or member.run.pk not in beat.live:
            member.word = "taken"
    live = _going_on(members)
    failure = None if outcome.aborted else outcome.failure()
    if live and failure is None:
        try:
            answer_shape_check(outcome.result, job)
        except ValueError as exc:
            failure = ("sandbox_bad_output", f"The evaluation's output was invalid: {exc}")
    keys = [adapter.key for adapter in job.adapters]
    for member in live:
        with _settling([member], worker):
            if failure is not None and len(keys) > 1:
                released = evaluation_run_release_alone(
                    run=member.run, worker=worker, why=f"{failure[0]}: {failure[1]}"
                )
                member.word = "released" if released else "taken"
                continue
            beat.tick(force=True)  # recording a group takes a while: keep the claims fresh
            if member.run.pk not in beat.live:
                raise RunTakenAway()
            log = log_for(outcome.log, key=member.key, keys=keys)
            if failure is not None:  # a run evaluated alone: it fails, as it always has
                raise RunFailure(*failure, log=log)
            _record(member, job, outcome, log, beat, worker=worker, mode=mode, started=started)


def _record(
    member: _Member,
    job: JobSpec,
    outcome: SandboxResult,
    log: str,
    beat: GroupHeartbeat,
    *,
    worker: str,
    mode: str,
    started: float,
) -> None:
    version, plan = member.version, member.plan
    try:
        scores, sketch = answer_validated(outcome.result, job, version, key=member.key)
    except RunFailure as failure:
        failure.log = log
        raise
    except ValueError as exc:
        raise RunFailure(
            "sandbox_bad_output", f"The evaluation's output was invalid: {exc}", log=log
        ) from exc
    stats = outcome.result.get("stats")
    log += f"\n[worker] sandbox {mode}; child finished in {outcome.duration_seconds:.1f}s"
    if len(job.adapters) > 1:
        log += f" (one child for a group of {len(job.adapters)} runs)"
    if isinstance(stats, dict):
        log += f"; stats {json.dumps(stats, default=str)[:2000]}"
    signature, note = signature_compute(version, plan)
    # Embedding the prompts takes seconds: say the claim is alive before recording on it.
    beat.tick(force=True)
    if member.run.pk not in beat.live:
        raise RunTakenAway()
    if note:
        log += f"\n[worker] {note}"
    log += f"\n[worker] evaluation took {time.monotonic() - started:.1f}s in all\n"
    results_record(member.run, version, plan, scores, sketch, signature, worker, log)
    member.word = "succeeded"
