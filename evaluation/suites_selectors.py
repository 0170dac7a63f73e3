"""Reads for benchmark suites. Hidden and paraphrase examples never leave through these
helpers except ``task_examples`` (and ``task_examples_with_ids``), which the evaluation
runner (not any page or API) calls with ``split="hidden"`` (or ``"paraphrase"``), and
``suite_secret_examples``, which only ``manage.py load_suites`` calls."""

from __future__ import annotations

from django.db.models import Count, Prefetch, Q, QuerySet

from evaluation.models import Example, Suite, SuiteVersion, Task
from evaluation.worker.specs import ExampleSpec
from tessera.errors import DomainError


def _tasks_with_counts() -> QuerySet[Task]:
    return Task.objects.annotate(
        public_count=Count("examples", filter=Q(examples__split=Example.Split.PUBLIC)),
        hidden_count=Count("examples", filter=Q(examples__split=Example.Split.HIDDEN)),
        paraphrase_count=Count("examples", filter=Q(examples__split=Example.Split.PARAPHRASE)),
    ).order_by("slug")


def suite_versions_current() -> QuerySet[SuiteVersion]:
    """Every suite's current version, its tasks prefetched with public_count, hidden_count
    and paraphrase_count annotated (the numbers only, never hidden content)."""
    return (
        SuiteVersion.objects.filter(is_current=True)
        .select_related("suite")
        .prefetch_related(Prefetch("tasks", queryset=_tasks_with_counts()))
        .order_by("suite__slug")
    )


def suite_version_current(*, slug: str) -> SuiteVersion:
    version = suite_versions_current().filter(suite__slug=slug).first()
    if version is None:
        raise DomainError("not_found", f"No suite {slug!r}.", kind="not_found")
    return version


def suite_version_get(*, suite_version_id: int) -> SuiteVersion:
    version = (
        SuiteVersion.objects.select_related("suite")
        .prefetch_related(Prefetch("tasks", queryset=_tasks_with_counts()))
        .filter(pk=suite_version_id)
        .first()
    )
    if version is None:
        raise DomainError("not_found", "No such suite version.", kind="not_found")
    return version


def suites_all() -> QuerySet[Suite]:
    return Suite.objects.order_by("slug")


def task_current(*, slug: str) -> Task:
    """The task called ``slug`` in a current suite version; ``suite/task`` picks among
    suites when two current versions have a task of that name."""
    suite_slug, _, task_slug = slug.rpartition("/")
    tasks = Task.objects.filter(slug=task_slug, suite_version__is_current=True).select_related(
        "suite_version__suite"
    )
    if suite_slug:
        tasks = tasks.filter(suite_version__suite__slug=suite_slug)
    found = list(tasks[:2])
    if not found:
        raise DomainError("not_found", f"No current task {slug!r}.", kind="not_found")
    if len(found) > 1:
        names = ", ".join(f"{t.suite_version.suite.slug}/{t.slug}" for t in found)
        raise DomainError(
            "task_ambiguous", f"{slug!r} names more than one task ({names}); say which suite."
        )
    return found[0]


def task_examples(*, task: Task, split: str) -> list[ExampleSpec]:
    """A task's examples of one split, in their order, as specs for scoring; render them
    with ``task_split_template(task=task, split=split)``, not ``task.prompt_template``
    (paraphrase examples have their own)."""
    rows = Example.objects.filter(task=task, split=split).order_by("position")
    return [
        ExampleSpec(fields=row.fields, target=row.target, choices=list(row.choices)) for row in rows
    ]


def task_examples_with_ids(*, task: Task, split: str) -> tuple[list[int], list[ExampleSpec]]:
    """``task_examples`` with each example's primary key, in the same order (per-example
    outcomes are stored against them)."""
    rows = list(Example.objects.filter(task=task, split=split).order_by("position"))
    specs = [
        ExampleSpec(fields=row.fields, target=row.target, choices=list(row.choices)) for row in rows
    ]
    return [row.pk for row in rows], specs


def task_split_template(*, task: Task, split: str) -> str:
    """The prompt template ``split``'s examples render with: their own where they carry
    one (suite_io allows one per task split), else the task's."""
    own = (
        Example.objects.filter(task=task, split=split)
        .exclude(prompt_template="")
        .values_list("prompt_template", flat=True)
        .first()
    )
    return own or task.prompt_template


def tasks_targeted(*, tags: list[str]) -> QuerySet[Task]:
    """Current skill tasks that an adapter with these task_tags targets (any tag in common)."""
    wanted = {tag.strip().lower() for tag in tags if tag.strip()}
    tasks = Task.objects.filter(
        suite_version__is_current=True, suite_version__suite__purpose=Suite.Purpose.SKILL
    ).select_related("suite_version__suite")
    ids = [task.pk for task in tasks if wanted & {t.lower() for t in task.tags}]
    return Task.objects.filter(pk__in=ids).select_related("suite_version__suite").order_by("slug")


def suite_secret_examples(*, slug: str) -> dict[tuple[str, str], list[tuple]] | None:
    """The current version of suite ``slug``'s hidden and paraphrase examples, by (task,
    split), in order, each as (fields, target, choices, prompt_template); None when the
    suite has no version. For ``load_suites`` alone, which must tell whether a reload would
    change them: no page or API calls this."""
    version = SuiteVersion.objects.filter(suite__slug=slug, is_current=True).first()
    if version is None:
        return None
    rows = (
        Example.objects.filter(
            task__suite_version=version,
            split__in=[Example.Split.HIDDEN, Example.Split.PARAPHRASE],
        )
        .select_related("task")
        .order_by("task__slug", "split", "position")
    )
    out: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        out.setdefault((row.task.slug, row.split), []).append(
            (row.fields, row.target, list(row.choices), row.prompt_template)
        )
    return out
