"""What a run measures: the targeted and general tasks, the contributor's test sets, the
hidden examples, the cached base scores, and the job the child is given."""

import hashlib
import logging
from dataclasses import dataclass, field
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
from evaluation.suites_selectors import task_examples, tasks_targeted
from evaluation.worker.specs import AdapterSpec, ExampleSpec, JobSpec, TaskSpec

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status
VersionStatus = AdapterVersion.Status
# The child, as the worker starts it. A test's worker bootstrap may swap it for a snippet.
WEIGHTS_NAME = "adapter_model.safetensors"


# --- What a run measures --------------------------------------------------------------------


@dataclass
class Plan:
    targeted: list[Task]
    general: list[Task]
    test_sets: list[ContributorTestSet]
    hidden: dict[int, list[ExampleSpec]]
    cached: dict[int, BaseScore]
    names: dict[int, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[Task]:
        return self.targeted + self.general


def plan_for(version: AdapterVersion) -> Plan:
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
    return Plan(
        targeted=targeted,
        general=general,
        test_sets=selectors.test_sets_for(version=version),
        hidden=hidden,
        cached=cached,
        names=names,
    )


def task_key(task: Task) -> str:
    return f"task:{task.pk}:hidden"


def test_set_key(test_set: ContributorTestSet) -> str:
    return f"testset:{test_set.pk}"


def adapter_key(run_id: int) -> str:
    """How a run's adapter is named in the child's job and answer."""
    return f"run:{run_id}"


def job_for(
    plan: Plan, version: AdapterVersion, adapter_dir: Path, device: str, *, key: str
) -> JobSpec:
    specs = [
        TaskSpec(
            key=task_key(task),
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
        )
    return JobSpec(
        base_model_path=version.base_model.local_path,
        adapters=[
            AdapterSpec(
                key=key,
                adapter_dir=str(adapter_dir),
                # Our validated, normalised config: never the contributor's file.
                lora_config=dict(version.adapter_config),
            )
        ],
        tasks=specs,
        batch_size=settings.TESSERA_EVAL_BATCH_SIZE,
        device=device,
        seed=0,
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
