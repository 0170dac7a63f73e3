"""Reads for evaluation runs: which tasks a version is measured on, who may see a run, and
whether a contributor already has an admitted adapter.

The targeted tasks and a task's examples come from evaluation.suites_selectors
(``tasks_targeted``, ``task_examples``); hidden examples are read only for the worker's
job, and nothing here that reaches a page or an API response selects them.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Prefetch, Q, QuerySet

from contributions.models import AdapterVersion, AuditEvent
from contributions.selectors import user_is_maintainer
from evaluation.models import (
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Example,
    ReviewDecision,
    RuleResult,
    Suite,
    Task,
    TaskResult,
    TestSetResult,
)
from evaluation.suites_selectors import tasks_targeted
from tessera.errors import DomainError

Status = AdapterVersion.Status


# --- Tasks a run measures ------------------------------------------------------------------


def _current_tasks(*, purpose: str) -> list[Task]:
    return list(
        Task.objects.select_related("suite_version", "suite_version__suite")
        .filter(suite_version__is_current=True, suite_version__suite__purpose=purpose)
        .order_by("suite_version__suite__slug", "slug", "id")
    )


def _lower(tags: Iterable[str]) -> set[str]:
    return {str(tag).strip().lower() for tag in tags if str(tag).strip()}


__all__ = ["tasks_targeted"]  # re-exported: the one definition of "targets" is the suites'


def tasks_general() -> list[Task]:
    """Every task of the current version of each general-purpose suite."""
    return _current_tasks(purpose=Suite.Purpose.GENERAL)


def tasks_skill() -> list[Task]:
    """Every task of the current version of each skill suite."""
    return _current_tasks(purpose=Suite.Purpose.SKILL)


def tasks_composite() -> list[Task]:
    """Every task of the current version of each composite suite: two skills in one answer.
    No admission reads them (tasks_targeted and tasks_general leave them out); they judge
    composed mixtures only (evaluation.services.outcomes.composite_splits)."""
    return _current_tasks(purpose=Suite.Purpose.COMPOSITE)


def task_tags_available() -> list[str]:
    """The tags an adapter can target now (for the "matches no task" message)."""
    tags: set[str] = set()
    for task in _current_tasks(purpose=Suite.Purpose.SKILL):
        tags |= _lower(task.tags)
    return sorted(tags)


def base_scores_cached(*, base_model_id: int, tasks: Iterable[Task]) -> dict[int, BaseScore]:
    """{task id: BaseScore} of the hidden split for tasks already scored on this base."""
    ids = [task.pk for task in tasks]
    return {
        score.task_id: score
        for score in BaseScore.objects.filter(
            base_model_id=base_model_id, task_id__in=ids, split=Example.Split.HIDDEN
        )
    }


def base_scores_cached_by_split(
    *, base_model_id: int, tasks: Iterable[Task]
) -> dict[tuple[int, str], BaseScore]:
    """{(task id, split): BaseScore} for every split already scored on this base."""
    ids = [task.pk for task in tasks]
    return {
        (score.task_id, score.split): score
        for score in BaseScore.objects.filter(base_model_id=base_model_id, task_id__in=ids)
    }


def test_sets_for(*, version: AdapterVersion) -> list[ContributorTestSet]:
    return list(ContributorTestSet.objects.filter(adapter_id=version.adapter_id).order_by("id"))


# --- Admission history ---------------------------------------------------------------------


def contributor_has_admitted(*, user_id: int, exclude_version_id: int | None = None) -> bool:
    """Whether any version of the user's adapters was ever admitted: admitted or suspended
    now, or an AuditEvent that took it to admitted (it may be withdrawn since)."""
    versions = AdapterVersion.objects.filter(adapter__owner_id=user_id)
    events = AuditEvent.objects.filter(adapter__owner_id=user_id, to_status=Status.ADMITTED)
    if exclude_version_id is not None:
        versions = versions.exclude(pk=exclude_version_id)
        events = events.exclude(version_id=exclude_version_id)
    return (
        versions.filter(status__in=[Status.ADMITTED, Status.SUSPENDED]).exists() or events.exists()
    )


def contributor_under_suspension(*, user_id: int, exclude_version_id: int | None = None) -> bool:
    """Whether a maintainer suspended one of the user's versions (a review decision, not a
    mixture rollback, which says nothing about the contributor) and has approved none of
    theirs since."""
    decisions = ReviewDecision.objects.filter(version__adapter__owner_id=user_id)
    if exclude_version_id is not None:
        decisions = decisions.exclude(version_id=exclude_version_id)
    suspended = (
        decisions.filter(decision=ReviewDecision.Decision.SUSPEND)
        .order_by("-created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    if suspended is None:
        return False
    return not decisions.filter(
        decision=ReviewDecision.Decision.APPROVE, created_at__gt=suspended
    ).exists()


# --- Runs, as their owner and the maintainers see them ---------------------------------------


def _runs_with_results() -> QuerySet[EvaluationRun]:
    return EvaluationRun.objects.select_related("version", "version__adapter").prefetch_related(
        Prefetch(
            "task_results",
            queryset=TaskResult.objects.select_related(
                "task", "task__suite_version", "task__suite_version__suite"
            ).order_by("-is_target", "task__slug", "id"),
        ),
        Prefetch("rule_results", queryset=RuleResult.objects.order_by("id")),
        Prefetch("test_set_results", queryset=TestSetResult.objects.select_related("test_set")),
    )


def _visible(qs: QuerySet[EvaluationRun], user: AbstractBaseUser | AnonymousUser):
    if user_is_maintainer(user):
        return qs
    if not user.is_authenticated:
        return qs.none()
    return qs.filter(version__adapter__owner_id=user.pk)


def runs_for_version_visible(
    *, user: AbstractBaseUser, adapter_id: int, number: int
) -> list[EvaluationRun]:
    """The version's runs, newest first; not_found unless the user owns it or maintains."""
    version = _visible_versions(user).filter(adapter_id=adapter_id, number=number).first()
    if version is None:
        raise DomainError("not_found", "No such version.", kind="not_found")
    return list(_runs_with_results().filter(version=version).order_by("-created_at", "-id"))


def _visible_versions(user: AbstractBaseUser | AnonymousUser) -> QuerySet[AdapterVersion]:
    qs = AdapterVersion.objects.all()
    if user_is_maintainer(user):
        return qs
    return qs.filter(adapter__owner_id=user.pk) if user.is_authenticated else qs.none()


def run_get_visible(*, user: AbstractBaseUser, run_id: int) -> EvaluationRun:
    run = _visible(_runs_with_results(), user).filter(pk=run_id).first()
    if run is None:
        # Someone else's run is indistinguishable from a missing one.
        raise DomainError("not_found", "No such run.", kind="not_found")
    return run


def run_progress_visible(*, user: AbstractBaseUser, run_id: int) -> EvaluationRun:
    """Just the columns the progress bar polls, no results."""
    run = (
        _visible(EvaluationRun.objects.all(), user)
        .filter(pk=run_id)
        .only(
            "id",
            "status",
            "progress_done",
            "progress_total",
            "progress_label",
            "attempts",
            "failure_code",
            "passed",
            "heartbeat_at",
            "finished_at",
        )
        .first()
    )
    if run is None:
        raise DomainError("not_found", "No such run.", kind="not_found")
    return run


def runs_live() -> QuerySet[EvaluationRun]:
    """Queued or running runs (one per version at most: a partial unique constraint)."""
    return EvaluationRun.objects.filter(
        Q(status=EvaluationRun.Status.QUEUED) | Q(status=EvaluationRun.Status.RUNNING)
    )
