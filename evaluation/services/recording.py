"""Recording a run's outcome: the child's answer checked, scores with their intervals,
the admission policy applied, the version concluded, all in one transaction."""

import logging
import math
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from contributions.models import AdapterVersion
from evaluation import selectors
from evaluation.models import (
    BaseScore,
    EvaluationRun,
    Outcome,
    RoutingSignature,
    Task,
    TaskResult,
    TestSetResult,
    WeightSketch,
)
from evaluation.policy import (
    PolicyOutcome,
    TaskOutcome,
    evaluate_policy,
    policy_from_settings,
    targets_rule,
)
from evaluation.services.admission import (
    admission_checks_run,
    admission_needs_review,
    rule_results_store,
    version_admit_automatically,
    version_conclude,
)
from evaluation.services.plans import TARGET, Measure, Plan, test_set_key
from evaluation.services.runs import RunFailure, RunTakenAway, evaluation_run_fail
from evaluation.worker.sandbox import (
    LOG_CAP_BYTES,
)
from evaluation.worker.specs import JobSpec, TaskSpec

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
# The child, as the worker starts it. A test's worker bootstrap may swap it for a snippet.
_SCORE_RANGE = {  # metric -> (lowest, highest) per-example score
    "exact_match": (0.0, 1.0),
    "contains": (0.0, 1.0),
    "multiple_choice": (0.0, 1.0),
    "mean_loglik": (-1e4, 1e-6),  # a mean log-probability: at most 0
}


def answer_validated(result: Any, job: JobSpec, version: AdapterVersion, *, key: str):
    """Adapter ``key``'s part of the child's answer, checked: every task key, per-example
    lists as long as the examples, finite numbers in the metric's range, a sketch of known
    module kinds. An adapter the engine refused raises RunFailure with the engine's reason;
    anything malformed raises ValueError."""
    answer_shape_check(result, job)
    failed, scores = result["failed"], result["scores"]
    if key in failed:
        raise RunFailure(
            "adapter_refused",
            f"The inference engine could not load this adapter: {str(failed[key])[:500]}",
        )
    checked: dict[str, tuple[list[float] | None, list[float]]] = {}
    for task in job.tasks:
        if key not in job.task_adapters(task):
            continue
        entry = scores[task.key]
        if not isinstance(entry, dict) or set(entry) != {"base", "adapters"}:
            raise ValueError(f"{task.key}: expected base and adapter scores")
        if not isinstance(entry["adapters"], dict) or key not in entry["adapters"]:
            raise ValueError(f"{task.key}: no scores for {key}")
        adapter = _score_list(entry["adapters"][key], task, "adapter")
        base = _score_list(entry["base"], task, "base") if task.score_base else None
        if not task.score_base and entry["base"] is not None:
            raise ValueError(f"{task.key}: base scores were not asked for")
        checked[task.key] = (base, adapter)
    sketches = result.get("sketches")
    sketch = sketches.get(key) if isinstance(sketches, dict) else None
    from evaluation.worker.sketch import BLOCK

    if not isinstance(sketch, dict) or not set(sketch) <= set(version.target_modules):
        raise ValueError("the weight sketch names modules the adapter does not target")
    for kind, block in sketch.items():
        if not isinstance(block, list) or len(block) != BLOCK or not all(_finite(x) for x in block):
            raise ValueError(f"the weight sketch of {kind} is not {BLOCK} finite numbers")
    return checked, sketch


def answer_shape_check(result: Any, job: JobSpec) -> None:
    """The part of the child's answer every adapter's reading needs: a result, its list of
    refused adapters, scores for exactly the job's tasks. ValueError otherwise: then the
    answer is unusable for every adapter of the job, not for one."""
    if not isinstance(result, dict):
        raise ValueError("no result")
    if not isinstance(result.get("failed"), dict):
        raise ValueError("no list of refused adapters")
    scores = result.get("scores")
    if not isinstance(scores, dict) or set(scores) != {t.key for t in job.tasks}:
        raise ValueError("the scores do not name exactly the tasks asked for")


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


def signature_compute(
    version: AdapterVersion, plan: Plan
) -> tuple[tuple[list[float], int] | None, str]:
    """(vector, prompt count) or None with a note: the run still counts without one (an
    operator can compute it again), it must not fail the contributor's version."""
    from evaluation.worker.signatures import signature_for

    try:
        return signature_for(version, tasks=plan.targeted), ""
    except Exception as exc:
        logger.exception("routing signature of version %s failed", version.pk)
        return None, f"routing signature not computed: {type(exc).__name__}: {exc}"


# --- Recording ------------------------------------------------------------------------------


def _outcome(task: Task, name: str, base: list[float], adapter: list[float]) -> TaskOutcome:
    from evaluation.worker.scoring import bootstrap_delta_ci

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


def _base_scores(version: AdapterVersion, measure: Measure, fresh: list[float] | None):
    """The base model's scores for a task split: cached, or fresh and cached now. Two runs
    may score the same split at once; the first to commit wins, the other uses its row."""
    n = len(measure.examples)
    if measure.cached is not None:
        return [float(x) for x in measure.cached.scores[:n]]
    assert fresh is not None
    row, created = BaseScore.objects.get_or_create(
        base_model_id=version.base_model_id,
        task=measure.task,
        split=measure.split,
        defaults={"scores": fresh, "mean": sum(fresh) / len(fresh)},
    )
    if not created and len(row.scores) < len(fresh):
        # A run that measured only the union's share came first: keep the longer scores, so
        # later runs find the whole split cached (a prefix of it serves the shorter shares).
        BaseScore.objects.filter(pk=row.pk).update(scores=fresh, mean=sum(fresh) / len(fresh))
        return fresh
    return [float(x) for x in row.scores[:n]]


def _outcomes_store(version: AdapterVersion, measure: Measure, base, adapter) -> None:
    """Per-example outcomes of the version and of the base model (the base's once)."""
    Outcome.objects.bulk_create(
        [
            Outcome(base_model_id=version.base_model_id, version=version, example_id=pk, score=s)
            for pk, s in zip(measure.example_ids, adapter, strict=True)
        ],
        ignore_conflicts=True,
    )
    Outcome.objects.bulk_create(
        [
            Outcome(base_model_id=version.base_model_id, version=None, example_id=pk, score=s)
            for pk, s in zip(measure.example_ids, base, strict=True)
        ],
        ignore_conflicts=True,
    )


def results_record(
    run, version, plan: Plan, scores, sketch, signature, worker: str, log: str
) -> None:
    from evaluation.worker.sketch import sketch_vector

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
        for measure in plan.measures:
            fresh, adapter = scores[measure.key]
            # Another run of the group may have had the split scored whole: this run's share
            # is its first examples (plans.job_for).
            n = len(measure.examples)
            adapter, fresh = adapter[:n], None if fresh is None else fresh[:n]
            base = _base_scores(version, measure, fresh)
            outcome = _outcome(measure.task, measure.name, base, adapter)
            if measure.decides:
                outcomes[measure.task.pk] = outcome
            _outcomes_store(version, measure, base, adapter)
            TaskResult.objects.create(
                run=run,
                task=measure.task,
                split=measure.split,
                is_target=measure.role == TARGET,
                n=outcome.n,
                base_score=outcome.base_score,
                adapter_score=outcome.adapter_score,
                delta=outcome.delta,
                ci_low=outcome.ci_low,
                ci_high=outcome.ci_high,
            )
        for test_set in plan.test_sets:
            base, adapter = scores[test_set_key(test_set)]
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
            from evaluation.worker.signatures import EMBEDDING_MODEL

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
        locked = AdapterVersion.objects.select_for_update().get(pk=version.pk)
        # Checks of apps above evaluation (the mixture-contribution rule) never fail a
        # version: one that passed the policy but not a check is held for review.
        held = admission_checks_run(version=locked) if verdict.passed else []
        verdict = PolicyOutcome(rules=[*verdict.rules, *held], passed=verdict.passed)
        rule_results_store(run=run, outcome=verdict)
        needs_review = verdict.passed and (
            admission_needs_review(version=locked, mode=policy.review)
            or any(not rule.passed for rule in held)
        )
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


def untargeted_finish(run: EvaluationRun, version: AdapterVersion, worker: str) -> None:
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
