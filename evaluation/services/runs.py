"""Evaluation runs: create, claim, execute in the sandbox, record, reap.

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

Every run-row change is a compare-and-set ``filter(pk=…, status=…[, claimed_by=…]).update``
checked for one row; the version moves only through adapter_version_transition in the
same transaction. A worker that finds its claim gone (the reaper failed or re-queued the
run) stops its child and records nothing.

Concurrency contract: one Celery task per run id (``evaluation.evaluate_run``), delivered
at least once. Duplicates are harmless: the claim admits one worker, a finished run is a
no-op, and a running run whose claimant looks alive is left to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F
from django.utils import timezone

from contributions.base_models import MANIFEST_NAME
from contributions.models import AdapterVersion
from contributions.services import adapter_version_transition
from evaluation import selectors
from evaluation.models import (
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Example,
    RoutingSignature,
    Task,
    TaskResult,
    TestSetResult,
    WeightSketch,
)
from evaluation.policy import (
    TaskOutcome,
    evaluate_policy,
    policy_from_settings,
    targets_rule,
)
from evaluation.sandbox import (
    LOG_CAP_BYTES,
    SandboxLimits,
    SandboxUnavailable,
    run_sandboxed,
    sandbox_mode,
    workdir_create,
    workdir_remove,
    workdirs_remove_stale,
)
from evaluation.services.admission import (
    admission_needs_review,
    rule_results_store,
    version_admit_automatically,
    version_conclude,
)
from evaluation.specs import ExampleSpec, JobSpec, TaskSpec
from evaluation.suites_selectors import task_examples, tasks_targeted

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
# The child, as the worker starts it. A test's worker bootstrap may swap it for a snippet.
CHILD_ARGV: list[str] = [sys.executable, "-m", "evaluation.child"]
# Errors worth retrying: the database or the broker went away for a moment.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)
WEIGHTS_NAME = "adapter_model.safetensors"
_FINISHED = (RunStatus.SUCCEEDED, RunStatus.FAILED)
_SCORE_RANGE = {  # metric -> (lowest, highest) per-example score
    "exact_match": (0.0, 1.0),
    "contains": (0.0, 1.0),
    "multiple_choice": (0.0, 1.0),
    "mean_loglik": (-1e4, 1e-6),  # a mean log-probability: at most 0
}


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
        adapter_version_transition(
            version=version,
            to_status=VersionStatus.QUEUED,
            actor=None,
            reason=f"Queued for evaluation ({queue}).",
        )
        run = EvaluationRun.objects.create(
            version=version, queue=queue, max_attempts=settings.TESSERA_EVAL_MAX_ATTEMPTS
        )
        run_id = run.pk
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, queue=queue))
    return run


def run_enqueue(*, run_id: int, queue: str) -> None:
    """Send ``evaluation.evaluate_run``. Called after commit. A broker that is down here is
    logged, not raised: the upload (or the reaper's work) has committed and must not look
    failed. Such a run stays queued with no message; the reaper leaves queued runs alone
    (a long queue is not a fault), so an operator re-sends it (``evaluate_run.delay``)."""
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
    }


def evaluation_run_claim(*, run: EvaluationRun, worker: str) -> EvaluationRun | None:
    """queued → running for ``worker``; None when another worker got there first. The
    version moves queued → evaluating in the same transaction (a withdrawn version stays
    withdrawn; the run then fails in evaluation_run_execute)."""
    now = timezone.now()
    with transaction.atomic():
        claimed = EvaluationRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
            **_claim_fields(now, worker)
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


def _version_to_failed(version_id: int, reason: str) -> None:
    """Caller holds the transaction. Only a version still in evaluation moves."""
    version = AdapterVersion.objects.select_for_update().get(pk=version_id)
    if version.status in (VersionStatus.QUEUED, VersionStatus.EVALUATING):
        adapter_version_transition(
            version=version,
            to_status=VersionStatus.FAILED,
            actor=None,
            reason=f"Evaluation failed: {reason}",
        )


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
    compare-and-set further. False when it had moved on."""
    now = timezone.now()
    live = EvaluationRun.objects.filter(pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    if worker is not None:
        live = live.filter(claimed_by=worker)
    if conditions:
        live = live.filter(**conditions)
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
        _version_to_failed(run.version_id, reason)
    logger.info("evaluation run %s failed (%s): %s", run.pk, code, reason)
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


def evaluation_run_release(*, run: EvaluationRun, worker: str) -> bool:
    """Give a run back after a transient error (the task retries): running → queued, the
    attempt not counted (transient errors are capped by the task's retries instead)."""
    with transaction.atomic():
        moved = EvaluationRun.objects.filter(
            pk=run.pk, status=RunStatus.RUNNING, claimed_by=worker
        ).update(
            status=RunStatus.QUEUED,
            claimed_by="",
            heartbeat_at=None,
            deadline_at=None,
            attempts=F("attempts") - 1,
            progress_label="Waiting to retry after a transient error",
        )
        if moved != 1:
            return False
        version = AdapterVersion.objects.select_for_update().get(pk=run.version_id)
        if version.status == VersionStatus.EVALUATING:
            adapter_version_transition(
                version=version,
                to_status=VersionStatus.QUEUED,
                actor=None,
                reason="Evaluation interrupted by a transient error; it will be retried.",
            )
    return True


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


# --- What a run measures --------------------------------------------------------------------


@dataclass
class _Plan:
    targeted: list[Task]
    general: list[Task]
    test_sets: list[ContributorTestSet]
    hidden: dict[int, list[ExampleSpec]]
    cached: dict[int, BaseScore]
    names: dict[int, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[Task]:
        return self.targeted + self.general


def _plan(version: AdapterVersion) -> _Plan:
    targeted = list(tasks_targeted(tags=version.adapter.task_tags))
    targeted_ids = {task.pk for task in targeted}
    general = [t for t in selectors.tasks_general() if t.pk not in targeted_ids]
    hidden = {
        task.pk: task_examples(task=task, split=Example.Split.HIDDEN) for task in targeted + general
    }
    empty = [task for task in targeted + general if not hidden[task.pk]]
    for task in empty:
        logger.warning("task %s has no hidden examples; it is not measured", task)
    targeted = [task for task in targeted if hidden[task.pk]]
    general = [task for task in general if hidden[task.pk]]
    cached = selectors.base_scores_cached(
        base_model_id=version.base_model_id, tasks=targeted + general
    )
    # A cached score is used only if it covers exactly the examples the task has.
    cached = {k: v for k, v in cached.items() if len(v.scores) == len(hidden[k])}
    slugs = [task.slug for task in targeted + general]
    names = {
        task.pk: task.slug
        if slugs.count(task.slug) == 1
        else f"{task.suite_version.suite.slug}/{task.slug}"
        for task in targeted + general
    }
    return _Plan(
        targeted=targeted,
        general=general,
        test_sets=selectors.test_sets_for(version=version),
        hidden=hidden,
        cached=cached,
        names=names,
    )


def _task_key(task: Task) -> str:
    return f"task:{task.pk}:hidden"


def _test_set_key(test_set: ContributorTestSet) -> str:
    return f"testset:{test_set.pk}"


def _job(plan: _Plan, version: AdapterVersion, adapter_dir: Path, device: str) -> JobSpec:
    specs = [
        TaskSpec(
            key=_task_key(task),
            metric=task.metric,
            prompt_template=task.prompt_template,
            max_new_tokens=task.max_new_tokens,
            examples=plan.hidden[task.pk],
            score_base=task.pk not in plan.cached,
        )
        for task in plan.tasks
    ]
    for test_set in plan.test_sets:
        specs.append(
            TaskSpec(
                key=_test_set_key(test_set),
                metric=test_set.metric,
                prompt_template=test_set.prompt_template,
                max_new_tokens=test_set.max_new_tokens,
                examples=[
                    ExampleSpec(
                        fields=dict(e["fields"]),
                        target=str(e["target"]),
                        choices=list(e.get("choices") or []),
                    )
                    for e in test_set.examples
                ],
            )
        )
    return JobSpec(
        base_model_path=version.base_model.local_path,
        adapter_dir=str(adapter_dir),
        # Our validated, normalised config: never the contributor's file.
        lora_config=dict(version.adapter_config),
        tasks=specs,
        batch_size=settings.TESSERA_EVAL_BATCH_SIZE,
        device=device,
        seed=0,
    )


def _adapter_files(version: AdapterVersion) -> dict[str, bytes]:
    """The weights only, checked against the sha256 intake recorded (storage is not trusted
    to be unchanged); the contributor's adapter_config.json never reaches the child."""
    with version.weights_file.open("rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != version.weights_sha256:
        raise RunFailure(
            "weights_changed",
            "The stored weights file no longer matches the sha256 recorded at upload.",
        )
    return {WEIGHTS_NAME: data}


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
    plan = _plan(version)
    if not plan.targeted:
        _finish_untargeted(run, version, worker)
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
    workdir, adapter_dir = workdir_create(files=_adapter_files(version), prefix=prefix)
    try:
        device = "cuda" if run.queue == "eval-gpu" else "cpu"
        job = _job(plan, version, adapter_dir, device)
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
        scores, sketch = _validated(outcome.result, job, version)
    except ValueError as exc:
        raise RunFailure(
            "sandbox_bad_output", f"The evaluation's output was invalid: {exc}", log=log
        ) from exc
    stats = outcome.result.get("stats") if isinstance(outcome.result, dict) else None
    log += f"\n[worker] sandbox {mode}; child finished in {outcome.duration_seconds:.1f}s"
    if isinstance(stats, dict):
        log += f"; stats {json.dumps(stats, default=str)[:2000]}"
    signature, note = _signature(version, plan)
    if note:
        log += f"\n[worker] {note}"
    log += f"\n[worker] evaluation took {time.monotonic() - started:.1f}s in all\n"
    _record(run, version, plan, scores, sketch, signature, worker, log)


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


def _validated(result: Any, job: JobSpec, version: AdapterVersion):
    """The child's answer, checked: every task key, per-example lists as long as the
    examples, finite numbers in the metric's range, a sketch of known module kinds."""
    if not isinstance(result, dict):
        raise ValueError("no result")
    scores = result.get("scores")
    if not isinstance(scores, dict) or set(scores) != {t.key for t in job.tasks}:
        raise ValueError("the scores do not name exactly the tasks asked for")
    checked: dict[str, tuple[list[float] | None, list[float]]] = {}
    for task in job.tasks:
        entry = scores[task.key]
        if not isinstance(entry, dict) or set(entry) != {"base", "adapter"}:
            raise ValueError(f"{task.key}: expected base and adapter scores")
        adapter = _score_list(entry["adapter"], task, "adapter")
        base = _score_list(entry["base"], task, "base") if task.score_base else None
        if not task.score_base and entry["base"] is not None:
            raise ValueError(f"{task.key}: base scores were not asked for")
        checked[task.key] = (base, adapter)
    sketch = result.get("sketch")
    from evaluation.sketch import BLOCK

    if not isinstance(sketch, dict) or not set(sketch) <= set(version.target_modules):
        raise ValueError("the weight sketch names modules the adapter does not target")
    for kind, block in sketch.items():
        if not isinstance(block, list) or len(block) != BLOCK or not all(_finite(x) for x in block):
            raise ValueError(f"the weight sketch of {kind} is not {BLOCK} finite numbers")
    return checked, sketch


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _score_list(values: Any, task: TaskSpec, which: str) -> list[float]:
    if not isinstance(values, list) or len(values) != len(task.examples):
        raise ValueError(f"{task.key}: {which} scores are not one per example")
    low, high = _SCORE_RANGE.get(task.metric, (-math.inf, math.inf))
    for value in values:
        if not _finite(value) or not low <= value <= high:
            raise ValueError(f"{task.key}: {which} score {value!r} is not a number in range")
    return [float(v) for v in values]


def _signature(version: AdapterVersion, plan: _Plan) -> tuple[tuple[list[float], int] | None, str]:
    """(vector, prompt count) or None with a note: the run still counts without one (an
    operator can compute it again), it must not fail the contributor's version."""
    from evaluation.signatures import signature_for

    try:
        return signature_for(version, tasks=plan.targeted), ""
    except Exception as exc:
        logger.exception("routing signature of version %s failed", version.pk)
        return None, f"routing signature not computed: {type(exc).__name__}: {exc}"


# --- Recording ------------------------------------------------------------------------------


def _outcome(task: Task, name: str, base: list[float], adapter: list[float]) -> TaskOutcome:
    from evaluation.scoring import bootstrap_delta_ci

    delta, low, high = bootstrap_delta_ci(
        base, adapter, samples=settings.TESSERA_EVAL_BOOTSTRAP_SAMPLES, seed=0
    )
    return TaskOutcome(
        name=name,
        title=task.title,
        n=len(adapter),
        base_score=sum(base) / len(base),
        adapter_score=sum(adapter) / len(adapter),
        delta=delta,
        ci_low=low,
        ci_high=high,
    )


def _base_scores(plan: _Plan, version: AdapterVersion, task: Task, fresh: list[float] | None):
    """The base model's scores for a task: cached, or fresh and cached now. Two runs may
    score the same task at once; the first to commit wins, the other uses its row."""
    cached = plan.cached.get(task.pk)
    if cached is not None:
        return [float(x) for x in cached.scores]
    assert fresh is not None
    row, _ = BaseScore.objects.get_or_create(
        base_model_id=version.base_model_id,
        task=task,
        split=Example.Split.HIDDEN,
        defaults={"scores": fresh, "mean": sum(fresh) / len(fresh)},
    )
    return [float(x) for x in row.scores] if len(row.scores) == len(fresh) else fresh


def _record(run, version, plan: _Plan, scores, sketch, signature, worker: str, log: str) -> None:
    from evaluation.sketch import sketch_vector

    policy = policy_from_settings()
    now = timezone.now()
    with transaction.atomic():
        mine = (
            EvaluationRun.objects.select_for_update()
            .filter(pk=run.pk, status=RunStatus.RUNNING, claimed_by=worker)
            .first()
        )
        if mine is None:
            raise RunTakenAway()
        outcomes: dict[int, TaskOutcome] = {}
        for task in plan.tasks:
            fresh, adapter = scores[_task_key(task)]
            base = _base_scores(plan, version, task, fresh)
            outcome = _outcome(task, plan.names[task.pk], base, adapter)
            outcomes[task.pk] = outcome
            TaskResult.objects.create(
                run=run,
                task=task,
                split=TaskResult.Split.HIDDEN,
                is_target=task in plan.targeted,
                n=outcome.n,
                base_score=outcome.base_score,
                adapter_score=outcome.adapter_score,
                delta=outcome.delta,
                ci_low=outcome.ci_low,
                ci_high=outcome.ci_high,
            )
        for test_set in plan.test_sets:
            base, adapter = scores[_test_set_key(test_set)]
            TestSetResult.objects.create(
                run=run,
                test_set=test_set,
                n=len(adapter),
                base_score=sum(base) / len(base) if base else 0.0,
                adapter_score=sum(adapter) / len(adapter) if adapter else 0.0,
            )
        WeightSketch.objects.update_or_create(
            version=version,
            defaults={
                "vector": sketch_vector(sketch, kinds=version.base_model.target_module_names)
            },
        )
        if signature is not None:
            from evaluation.signatures import EMBEDDING_MODEL

            RoutingSignature.objects.update_or_create(
                version=version,
                defaults={
                    "embedding_model": EMBEDDING_MODEL,
                    "vector": signature[0],
                    "prompt_count": signature[1],
                },
            )
        verdict = evaluate_policy(
            targeted=[outcomes[t.pk] for t in plan.targeted],
            general=[outcomes[t.pk] for t in plan.general],
            min_gain=policy.min_gain,
            max_general_drop=policy.max_general_drop,
            adapter_tags=version.adapter.task_tags,
            available_tags=selectors.task_tags_available(),
        )
        rule_results_store(run=run, outcome=verdict)
        locked = AdapterVersion.objects.select_for_update().get(pk=version.pk)
        needs_review = verdict.passed and admission_needs_review(version=locked, mode=policy.review)
        EvaluationRun.objects.filter(pk=run.pk).update(
            status=RunStatus.SUCCEEDED,
            passed=verdict.passed,
            needs_review=needs_review,
            finished_at=now,
            duration_seconds=(now - mine.started_at).total_seconds() if mine.started_at else None,
            log=log[-LOG_CAP_BYTES:],
            heartbeat_at=now,
            progress_done=F("progress_total"),
            progress_label="Finished",
        )
        concluded = None
        if locked.status == VersionStatus.EVALUATING:
            concluded = version_conclude(version=locked, outcome=verdict, needs_review=needs_review)
    if concluded is not None and verdict.passed and not needs_review:
        version_admit_automatically(version=concluded, outcome=verdict)


def _finish_untargeted(run: EvaluationRun, version: AdapterVersion, worker: str) -> None:
    """No benchmark task meets the adapter's tags: the run fails with that rule, the child
    never starts."""
    from evaluation.models import RuleResult

    rule = targets_rule(
        targeted_count=0,
        adapter_tags=version.adapter.task_tags,
        available_tags=selectors.task_tags_available(),
    )
    with transaction.atomic():
        if (
            not EvaluationRun.objects.select_for_update()
            .filter(pk=run.pk, status=RunStatus.RUNNING, claimed_by=worker)
            .exists()
        ):
            raise RunTakenAway()
        RuleResult.objects.create(
            run=run, rule=rule.rule, passed=False, detail=rule.detail, values=rule.values
        )
        evaluation_run_fail(run=run, code="no_targeted_task", reason=rule.detail, worker=worker)
        EvaluationRun.objects.filter(pk=run.pk).update(passed=False)


# --- The reaper ---------------------------------------------------------------------------------


def evaluation_runs_reap(*, now: datetime | None = None) -> dict[str, list[int]]:
    """Run by celery beat (``evaluation.reap_runs``). Running runs past their deadline are
    failed ("deadline passed"); running runs whose heartbeat is stale are re-queued, or
    failed when their attempts are used up. Each change is a compare-and-set, so a worker
    finishing at the same moment wins or loses cleanly (its own CAS then fails and it
    records nothing).

    Queued runs are left alone, however old: a long queue with busy workers is not a fault,
    and with no worker consuming the queue there is nobody to help. Their age shows on the
    status page; an operator starts workers (or re-sends the task)."""
    now = now or timezone.now()
    stale_before = now - timedelta(seconds=settings.TESSERA_EVAL_STALE_AFTER_SECONDS)
    report: dict[str, list[int]] = {"deadline": [], "requeued": [], "lost": []}
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
    return report
