"""What a run measures: the targeted and general tasks (admission decides on their hidden
splits), the rest of the union (every other skill task, every paraphrase split), the
contributor's test sets, the cached base scores, and the job the child is given."""

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from django.conf import settings

from contributions.models import AdapterVersion
from evaluation import selectors
from evaluation.models import (
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Example,
    Task,
)
from evaluation.services.runs import RunFailure
from evaluation.suites_selectors import (
    task_examples_with_ids,
    task_split_template,
    tasks_targeted,
)
from evaluation.worker.specs import AdapterSpec, ExampleSpec, JobSpec, TaskSpec

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
WEIGHTS_NAME = "adapter_model.safetensors"


# --- What a run measures --------------------------------------------------------------------

TARGET, GENERAL, OTHER = "target", "general", "other"


@dataclass(frozen=True)
class Measure:
    """One task split a run scores. ``role``: a task the adapter targets (its hidden split
    decides admission), a general task (the harm rule), or any other split of the union
    that the scoreboard and the marginal rule read (other skills, every paraphrase split)."""

    task: Task
    split: str
    role: str
    examples: list[ExampleSpec]
    example_ids: list[int]
    template: str
    cached: BaseScore | None  # the base model's scores, when they cover these examples
    name: str

    @property
    def key(self) -> str:
        return task_key(self.task, self.split)

    @property
    def decides(self) -> bool:
        """Whether the admission policy reads it: hidden split, targeted or general."""
        return self.split == Example.Split.HIDDEN and self.role in (TARGET, GENERAL)


@dataclass
class Plan:
    measures: list[Measure]
    test_sets: list[ContributorTestSet]

    def _tasks(self, role: str) -> list[Task]:
        return [m.task for m in self.measures if m.role == role and m.split == Example.Split.HIDDEN]

    @property
    def targeted(self) -> list[Task]:
        return self._tasks(TARGET)

    @property
    def general(self) -> list[Task]:
        return self._tasks(GENERAL)

    @property
    def tasks(self) -> list[Task]:
        return list(dict.fromkeys(m.task for m in self.measures))


def plan_for(version: AdapterVersion) -> Plan:
    """The targeted tasks' and the general suite's hidden splits, which admission decides
    on; with TESSERA_EVAL_UNION also every other current skill task's hidden split and every
    paraphrase split, so the version's outcome on each example of the union is known
    (the scoreboard and the marginal rule read them, never recomputing them)."""
    targeted = list(tasks_targeted(tags=version.adapter.task_tags))
    targeted_ids = {task.pk for task in targeted}
    general = [t for t in selectors.tasks_general() if t.pk not in targeted_ids]
    wanted: list[tuple[Task, str, str]] = [(t, Example.Split.HIDDEN, TARGET) for t in targeted]
    wanted += [(t, Example.Split.HIDDEN, GENERAL) for t in general]
    if settings.TESSERA_EVAL_UNION:
        others = [t for t in selectors.tasks_skill() if t.pk not in targeted_ids]
        wanted += [(t, Example.Split.HIDDEN, OTHER) for t in others]
        wanted += [
            (t, Example.Split.PARAPHRASE, TARGET if t.pk in targeted_ids else OTHER)
            for t in [*targeted, *others]
        ]
    all_tasks = list(dict.fromkeys(task for task, _split, _role in wanted))
    slugs = [task.slug for task in all_tasks]
    cached = selectors.base_scores_cached_by_split(
        base_model_id=version.base_model_id, tasks=all_tasks
    )
    measures: list[Measure] = []
    for task, split, role in wanted:
        ids, examples = task_examples_with_ids(task=task, split=split)
        if not (split == Example.Split.HIDDEN and role in (TARGET, GENERAL)):
            # Only the union's share, which the scoreboard reads (see union_examples).
            ids, examples = ids[: union_examples()], examples[: union_examples()]
        if not examples:
            if split == Example.Split.HIDDEN:
                logger.warning("task %s has no hidden examples; it is not measured", task)
            continue
        base = cached.get((task.pk, split))
        name = (
            task.slug
            if slugs.count(task.slug) == 1
            else f"{task.suite_version.suite.slug}/{task.slug}"
        )
        measures.append(
            Measure(
                task=task,
                split=split,
                role=role,
                examples=examples,
                example_ids=ids,
                template=task_split_template(task=task, split=split),
                # A cached score is used only if it covers these examples: the split's first
                # ones are its first scores (the union's share is a prefix of the split).
                cached=base if base is not None and len(base.scores) >= len(examples) else None,
                name=name if split == Example.Split.HIDDEN else f"{name} ({split})",
            )
        )
    return Plan(measures=measures, test_sets=selectors.test_sets_for(version=version))


def union_examples() -> int:
    """How many of each split's examples (its first ones) form the union that the
    scoreboard and the marginal rule compare models on. What admission decides on (the
    targeted tasks' and the general suite's hidden splits) is always measured whole."""
    return max(1, int(settings.TESSERA_EVAL_UNION_EXAMPLES))


def task_key(task: Task, split: str = Example.Split.HIDDEN) -> str:
    return f"task:{task.pk}:{split}"


def test_set_key(test_set: ContributorTestSet) -> str:
    return f"testset:{test_set.pk}"


def adapter_key(run_id: int) -> str:
    """How a run's adapter is named in the child's job and answer."""
    return f"run:{run_id}"


@dataclass(frozen=True)
class JobPart:
    """One run's share of a job: its adapter (``key``, the read-only copy of its weights in
    ``adapter_dir``) and its plan."""

    key: str
    plan: Plan
    version: AdapterVersion
    adapter_dir: Path


def job_for(parts: Sequence[JobPart], *, device: str) -> JobSpec:
    """One job for the runs of a group (all of one base model): one adapter per run, the
    union of their measures (a task split several runs measure appears once, scored for
    each of them, and for the base model unless every one of them has its base scores
    cached), then the runs' test sets, each scored for the runs whose plan has it (two
    versions of one adapter share its test sets). A task's ``adapters`` is None when every
    adapter of the job is scored on it: a job of one run lists none."""
    keys = [part.key for part in parts]
    # task key -> (the task spec, the adapters scored on it); insertion order is job order.
    wanted: dict[str, tuple[TaskSpec, list[str]]] = {}

    def want(spec: TaskSpec, key: str) -> None:
        first, scored = wanted.setdefault(spec.key, (spec, []))
        if len(spec.examples) > len(first.examples):
            first = replace(spec, score_base=spec.score_base or first.score_base)
        elif spec.score_base and not first.score_base:
            first = replace(first, score_base=True)
        wanted[spec.key] = (first, [*scored, key])

    # A task split's examples never change (a suite version is immutable once stored), and a
    # run measures either all of them or the union's share, their first ones: the longest
    # spec stands for all, and each run reads its own prefix of the scores.
    for part in parts:
        for measure in part.plan.measures:
            want(_measure_spec(measure), part.key)
    for part in parts:
        for test_set in part.plan.test_sets:
            want(_test_set_spec(test_set), part.key)
    return JobSpec(
        base_model_path=parts[0].version.base_model.local_path,
        adapters=[
            AdapterSpec(
                key=part.key,
                adapter_dir=str(part.adapter_dir),
                # Our validated, normalised config: never the contributor's file.
                lora_config=dict(part.version.adapter_config),
            )
            for part in parts
        ],
        tasks=[
            replace(spec, adapters=None if scored == keys else scored)
            for spec, scored in wanted.values()
        ],
        batch_size=settings.TESSERA_EVAL_BATCH_SIZE,
        device=device,
        seed=0,
    )


def _measure_spec(measure: Measure) -> TaskSpec:
    return TaskSpec(
        key=measure.key,
        metric=measure.task.metric,
        prompt_template=measure.template,
        max_new_tokens=measure.task.max_new_tokens,
        examples=measure.examples,
        score_base=measure.cached is None,
    )


def _test_set_spec(test_set: ContributorTestSet) -> TaskSpec:
    return TaskSpec(
        key=test_set_key(test_set),
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


def adapter_files(version: AdapterVersion) -> dict[str, bytes]:
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
