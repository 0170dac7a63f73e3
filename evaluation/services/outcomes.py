"""Per-example outcomes on the union: every current task of the built-in suites, on its
hidden and paraphrase splits.

A run stores its version's outcomes on the whole union (evaluation.services.plans), so
they are usually there already; ``outcomes_measure`` fills the gaps (a version evaluated
before a suite changed, the base model on a new split) with one sandboxed child that scores
every missing version and the base model together, as a run's child does. Readers (the
scoreboard, the marginal-contribution rule) get aggregates from these rows; no hidden
example leaves this module except as the rendered prompt a router is asked about, inside
the worker process.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from contributions.models import AdapterVersion, BaseModel
from evaluation import selectors
from evaluation.models import Example, Outcome, Task
from evaluation.services.plans import (
    adapter_files,
    adapter_key,
    task_key,
    union_examples,
)
from evaluation.services.runs import RunFailure
from evaluation.suites_selectors import task_examples_with_ids, task_split_template
from evaluation.worker.sandbox import (
    SandboxLimits,
    run_sandboxed,
    sandbox_mode,
    workdir_add_readonly,
)
from evaluation.worker.scoring import render_prompt
from evaluation.worker.specs import AdapterSpec, ExampleSpec, JobSpec, TaskSpec

logger = logging.getLogger(__name__)

UNION_SPLITS = (Example.Split.HIDDEN, Example.Split.PARAPHRASE)
# Outcomes are compared across models per example (best of, oracle): only metrics whose
# per-example score is "how right", 0 to 1, take part.
UNION_METRICS = frozenset({"exact_match", "contains", "multiple_choice"})


@dataclass(frozen=True)
class UnionSplit:
    task: Task
    split: str
    example_ids: list[int]
    examples: list[ExampleSpec]
    template: str

    @property
    def key(self) -> str:
        return task_key(self.task, self.split)

    def prompts(self) -> list[str]:
        """Each example's user turn, as a request to the inference API would carry it."""
        return [render_prompt(self.template, example.fields) for example in self.examples]


def union_splits() -> list[UnionSplit]:
    """The union, in a stable order: skill suites then general ones, by suite and task; the
    first TESSERA_EVAL_UNION_EXAMPLES examples of each split (every run measures those)."""
    return _splits(_union_tasks(), UNION_METRICS, UNION_SPLITS)


def public_splits() -> list[UnionSplit]:
    """The public splits of the same tasks, in the same order and with the same cap: what
    may be learned from (the learned router trains on these), while the union judges."""
    return _splits(_union_tasks(), UNION_METRICS, (Example.Split.PUBLIC,))


# The composite suite's parts metric is "how right", 0 to 1, too: the share of parts found.
COMPOSITE_METRICS = UNION_METRICS | {"parts"}


def composite_splits() -> list[UnionSplit]:
    """The composite suite's tasks' hidden splits (two skills in one answer), by suite and
    task, with the union's cap. Kept apart from the union: no run measures them (no
    admission reads them), so outcomes_measure fills them in when a mixture is judged."""
    return _splits(selectors.tasks_composite(), COMPOSITE_METRICS, (Example.Split.HIDDEN,))


def _union_tasks() -> list[Task]:
    return [*selectors.tasks_skill(), *selectors.tasks_general()]


def _splits(tasks: list[Task], metrics: frozenset[str], names: tuple[str, ...]) -> list[UnionSplit]:
    """Each task's (with one of ``metrics``) splits ``names``, in that order, each its first
    TESSERA_EVAL_UNION_EXAMPLES examples; an empty split is left out."""
    found: list[UnionSplit] = []
    for task in tasks:
        if task.metric not in metrics:
            continue
        for split in names:
            ids, examples = task_examples_with_ids(task=task, split=split)
            ids, examples = ids[: union_examples()], examples[: union_examples()]
            if examples:
                template = task_split_template(task=task, split=split)
                found.append(UnionSplit(task, split, ids, examples, template))
    return found


def outcomes_table(
    *, base_model_id: int, version_ids: list[int], example_ids: list[int]
) -> dict[int | None, dict[int, float]]:
    """{version id, or None for the base model: {example id: score}} for what is stored."""
    table: dict[int | None, dict[int, float]] = {None: {}, **{v: {} for v in version_ids}}
    rows = Outcome.objects.filter(base_model_id=base_model_id, example_id__in=example_ids)
    rows = rows.filter(version_id__in=version_ids) | rows.filter(version__isnull=True)
    for version_id, example_id, score in rows.values_list("version_id", "example_id", "score"):
        if version_id in table:
            table[version_id][example_id] = score
    return table


def outcomes_measure(
    *, base_model: BaseModel, versions: list[AdapterVersion], splits: list[UnionSplit]
) -> dict[int, str]:
    """Score, in one sandboxed child, every (version or base model, split) with an outcome
    missing, and store them. Returns {version id: why it could not be measured}; the base
    model failing (or the child as a whole) raises RunFailure."""
    example_ids = [pk for split in splits for pk in split.example_ids]
    table = outcomes_table(
        base_model_id=base_model.pk, version_ids=[v.pk for v in versions], example_ids=example_ids
    )
    wanted: dict[str, list[AdapterVersion]] = {}
    base_wanted: set[str] = set()
    for split in splits:
        ids = set(split.example_ids)
        if not ids <= set(table[None]):
            base_wanted.add(split.key)
        wanted[split.key] = [v for v in versions if not ids <= set(table[v.pk])]
    needed = list(dict.fromkeys(v for vs in wanted.values() for v in vs))
    if not needed and not base_wanted:
        return {}
    workdir = Path(tempfile.mkdtemp(prefix="tessera-outcomes-"))
    try:
        adapters, failures = adapter_copies(workdir, needed)
        measurable = {v.pk for v in needed} - set(failures)
        tasks = [
            TaskSpec(
                key=split.key,
                metric=split.task.metric,
                prompt_template=split.template,
                max_new_tokens=split.task.max_new_tokens,
                examples=split.examples,
                score_base=split.key in base_wanted,
                adapters=[adapter_key(v.pk) for v in wanted[split.key] if v.pk in measurable],
            )
            for split in splits
            if split.key in base_wanted or any(v.pk in measurable for v in wanted[split.key])
        ]
        job = JobSpec(
            base_model_path=base_model.local_path,
            adapters=adapters,
            tasks=tasks,
            batch_size=settings.TESSERA_EVAL_BATCH_SIZE,
            device="cuda" if settings.TESSERA_EVAL_GPU_WORKERS else "cpu",
        )
        result = child_run(job, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for key, reason in (result.get("failed") or {}).items():
        failures[int(str(key).split(":", 1)[1])] = str(reason)[:500]
    by_key = {split.key: split for split in splits}
    for task in job.tasks:
        entry = result["scores"].get(task.key) or {}
        split = by_key[task.key]
        if task.score_base:
            _store(base_model, None, split, entry.get("base"))
        for key, scores in (entry.get("adapters") or {}).items():
            version = next(v for v in needed if adapter_key(v.pk) == key)
            _store(base_model, version, split, scores)
    return failures


def adapter_copies(
    workdir: Path, versions: list[AdapterVersion]
) -> tuple[list[AdapterSpec], dict[int, str]]:
    """A read-only copy of each version's weights (checked against its sha256) in its own
    folder under ``workdir``; a version whose stored file changed is left out."""
    specs: list[AdapterSpec] = []
    failures: dict[int, str] = {}
    for version in versions:
        try:
            files = adapter_files(version)
        except RunFailure as exc:
            failures[version.pk] = exc.reason
            continue
        folder = workdir_add_readonly(workdir, f"v{version.pk}", files=files)
        specs.append(
            AdapterSpec(
                key=adapter_key(version.pk),
                adapter_dir=str(folder),
                lora_config=dict(version.adapter_config),
            )
        )
    return specs, failures


def child_run(job: JobSpec, workdir: Path) -> dict:
    """The sandboxed child's answer to ``job`` (its adapters' copies under ``workdir``);
    raises RunFailure when the child fails as a whole or answers no scores."""
    from evaluation.services.execution import CHILD_ARGV

    outcome = run_sandboxed(
        CHILD_ARGV,
        stdin_bytes=json.dumps(job.to_dict()).encode(),
        limits=SandboxLimits.from_settings(
            wall_seconds=float(settings.TESSERA_EVAL_DEADLINE_SECONDS)
        ),
        workdir=workdir,
        mode=sandbox_mode(),
        readonly=[adapter.adapter_dir for adapter in job.adapters],
        inputs=[job.base_model_path],
    )
    failure = outcome.failure()
    if failure is not None:
        raise RunFailure(*failure, log=outcome.log)
    result = outcome.result
    if not isinstance(result, dict) or not isinstance(result.get("scores"), dict):
        raise RunFailure("sandbox_bad_output", "The child answered no scores.", log=outcome.log)
    return result


def _store(base_model: BaseModel, version: AdapterVersion | None, split, scores) -> None:
    """Outcomes of one model on one split, if the child's list is sound (one finite score
    in [0, 1] per example); otherwise nothing, logged."""
    if (
        not isinstance(scores, list)
        or len(scores) != len(split.example_ids)
        or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            for s in scores
        )
        or not all(0.0 <= s <= 1.0 for s in scores)
    ):
        logger.warning("outcomes of %s on %s were malformed; not stored", version, split.key)
        return
    Outcome.objects.bulk_create(
        [
            Outcome(base_model=base_model, version=version, example_id=pk, score=float(s))
            for pk, s in zip(split.example_ids, scores, strict=True)
        ],
        ignore_conflicts=True,
    )
