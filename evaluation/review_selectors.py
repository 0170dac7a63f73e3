"""Reads for the review queue, the adapter page's evaluation panel, appeals and test sets.

Who may see what is decided here and in contributions.selectors, never in views or
templates. Nothing here ever reads benchmark Example rows: hidden examples are only scored,
never shown, so no page built from these selectors can leak one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, OuterRef, Prefetch, Q, QuerySet, Subquery

from contributions.models import Adapter, AdapterVersion
from contributions.selectors import adapter_get_visible, user_is_maintainer
from evaluation.models import (
    Appeal,
    ContributorTestSet,
    EvaluationRun,
    ReviewDecision,
    RuleResult,
    TaskResult,
    TestSetResult,
)
from evaluation.worker.sketch import similar_admitted
from tessera.errors import DomainError

Status = AdapterVersion.Status
RunStatus = EvaluationRun.Status

SIMILARITY_THRESHOLD = 0.95
MODEL_CARD_MAX_CHARS = 20_000  # intake caps the file at 256 KiB; a review needs far less


# --- Run reports --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunReport:
    """One run with its scores (no examples) and its rules' verdicts."""

    run: EvaluationRun
    task_results: list[TaskResult]
    rule_results: list[RuleResult]
    test_set_results: list[TestSetResult] = field(default_factory=list)

    @property
    def is_live(self) -> bool:
        return self.run.status in (RunStatus.QUEUED, RunStatus.RUNNING)

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [rule for rule in self.rule_results if not rule.passed]

    @property
    def percent(self) -> int:
        if not self.run.progress_total:
            return 0
        return round(100 * self.run.progress_done / self.run.progress_total)

    @property
    def queue_seconds(self) -> float | None:
        if self.run.started_at is None:
            return None
        # Clamped: the row's clock (the web process) and the worker's may differ a little.
        return max(0.0, (self.run.started_at - self.run.created_at).total_seconds())


def _runs_with_results() -> QuerySet[EvaluationRun]:
    return EvaluationRun.objects.prefetch_related(
        Prefetch(
            "task_results", queryset=TaskResult.objects.select_related("task__suite_version__suite")
        ),
        Prefetch("rule_results", queryset=RuleResult.objects.order_by("id")),
        Prefetch(
            "test_set_results",
            queryset=TestSetResult.objects.select_related("test_set").order_by("test_set__name"),
        ),
    ).order_by("-created_at", "-id")


def _report(run: EvaluationRun | None) -> RunReport | None:
    if run is None:
        return None
    return RunReport(
        run=run,
        task_results=list(run.task_results.all()),
        rule_results=list(run.rule_results.all()),
        test_set_results=list(run.test_set_results.all()),
    )


def run_report_latest(*, version: AdapterVersion, finished: bool = False) -> RunReport | None:
    """The version's latest run (``finished``: its latest run that succeeded)."""
    runs = _runs_with_results().filter(version=version)
    if finished:
        runs = runs.filter(status=RunStatus.SUCCEEDED)
    return _report(runs.first())


# --- The review queue ---------------------------------------------------------------------


@dataclass(frozen=True)
class SimilarAdapter:
    version: AdapterVersion
    similarity: float


@dataclass(frozen=True)
class PreviousVersion:
    version: AdapterVersion
    report: RunReport | None  # its latest finished run


@dataclass(frozen=True)
class ReviewItem:
    version: AdapterVersion
    report: RunReport | None
    model_card: str | None
    model_card_truncated: bool
    previous: PreviousVersion | None
    similar: list[SimilarAdapter]
    appeal: Appeal | None
    decisions: list[ReviewDecision]

    @property
    def appealed(self) -> bool:
        return self.appeal is not None

    @property
    def is_pending(self) -> bool:
        return self.version.status == Status.PASSED


def _require_maintainer(user: AbstractBaseUser | AnonymousUser) -> None:
    if not user_is_maintainer(user):
        raise DomainError(
            "not_maintainer", "Only maintainers see the review queue.", kind="forbidden"
        )


def _versions_for_review() -> QuerySet[AdapterVersion]:
    return AdapterVersion.objects.select_related(
        "adapter", "adapter__owner", "adapter__owner__contributor", "appeal", "base_model"
    ).prefetch_related(
        Prefetch(
            "review_decisions",
            queryset=ReviewDecision.objects.select_related("maintainer").order_by(
                "-created_at", "-id"
            ),
        )
    )


def pending_versions() -> QuerySet[AdapterVersion]:
    """Versions waiting for a maintainer: passed with a latest run that asked for review,
    or put back by an appeal. Oldest first: whoever waited longest is served first
    (``version_status_idx`` on (status, status_changed_at) serves this)."""
    latest_run = EvaluationRun.objects.filter(version=OuterRef("pk")).order_by("-created_at", "-id")
    return (
        _versions_for_review()
        .filter(status=Status.PASSED)
        .annotate(
            latest_needs_review=Subquery(latest_run.values("needs_review")[:1]),
            has_appeal=Exists(Appeal.objects.filter(version=OuterRef("pk"))),
        )
        .filter(Q(latest_needs_review=True) | Q(has_appeal=True))
        .order_by("status_changed_at", "id")
    )


def review_queue(*, user: AbstractBaseUser | AnonymousUser) -> list[ReviewItem]:
    _require_maintainer(user)
    return [_review_item(version) for version in pending_versions()]


def review_queue_count(*, user: AbstractBaseUser | AnonymousUser) -> int:
    _require_maintainer(user)
    return pending_versions().count()


def review_version_get(
    *, user: AbstractBaseUser | AnonymousUser, version_id: int
) -> AdapterVersion:
    """Any version, for a maintainer about to decide on it."""
    _require_maintainer(user)
    version = _versions_for_review().filter(pk=version_id).first()
    if version is None:
        raise DomainError("not_found", "No such version.", kind="not_found")
    return version


def review_item_get(*, user: AbstractBaseUser | AnonymousUser, version_id: int) -> ReviewItem:
    return _review_item(review_version_get(user=user, version_id=version_id))


def _review_item(version: AdapterVersion) -> ReviewItem:
    card, truncated = model_card_text(version=version)
    return ReviewItem(
        version=version,
        report=run_report_latest(version=version),
        model_card=card,
        model_card_truncated=truncated,
        previous=_previous_version(version),
        similar=[
            SimilarAdapter(version=other, similarity=score)
            for other, score in similar_admitted(version, threshold=SIMILARITY_THRESHOLD)
        ],
        appeal=_appeal_of(version),
        decisions=list(version.review_decisions.all()),
    )


def _appeal_of(version: AdapterVersion) -> Appeal | None:
    try:
        return version.appeal
    except Appeal.DoesNotExist:
        return None


def _previous_version(version: AdapterVersion) -> PreviousVersion | None:
    previous = (
        AdapterVersion.objects.filter(adapter_id=version.adapter_id, number__lt=version.number)
        .order_by("-number")
        .first()
    )
    if previous is None:
        return None
    return PreviousVersion(
        version=previous, report=run_report_latest(version=previous, finished=True)
    )


def model_card_text(*, version: AdapterVersion) -> tuple[str | None, bool]:
    """The README.md as text (never HTML: templates escape it), and whether it was cut."""
    if not version.card_file:
        return None, False
    try:
        with version.card_file.open("rb") as handle:
            data = handle.read(MODEL_CARD_MAX_CHARS * 4 + 4)
    except OSError:
        return None, False
    text = data.decode("utf-8", errors="replace")
    if len(text) > MODEL_CARD_MAX_CHARS:
        return text[:MODEL_CARD_MAX_CHARS], True
    return text, False


# --- The evaluation panel on the adapter page ----------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str  # a CSS-friendly word: admitted, refused, waiting, rejected, …
    words: str
    failed_rules: list[RuleResult] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationPanel:
    version: AdapterVersion
    report: RunReport | None
    outcome: Outcome
    decisions: list[ReviewDecision]
    appeal: Appeal | None
    can_appeal: bool
    show_log: bool
    can_suspend: bool
    deciding: ReviewDecision | None  # the decision that put the version where it is


# The decision that explains each outcome, for showing its reason next to it.
_DECIDED_BY = {"admitted": "approve", "rejected": "reject", "suspended": "suspend"}


def evaluation_panel(
    *, user: AbstractBaseUser | AnonymousUser, version: AdapterVersion
) -> EvaluationPanel:
    """What the owner (or a maintainer) sees about a version's evaluation and review.

    The adapter page that includes it was reached through adapter_get_visible, so the user
    is the owner or a maintainer; this checks again, since it decides what is shown.
    """
    is_owner = user.is_authenticated and version.adapter.owner_id == user.pk
    is_maintainer = user_is_maintainer(user)
    if not (is_owner or is_maintainer):
        raise DomainError("not_found", "No such version.", kind="not_found")
    report = run_report_latest(version=version)
    appeal = _appeal_of(version)
    decisions = list(
        ReviewDecision.objects.filter(version=version)
        .select_related("maintainer")
        .order_by("-created_at", "-id")
    )
    outcome = _outcome(version, report)
    latest = decisions[0] if decisions else None
    return EvaluationPanel(
        version=version,
        report=report,
        outcome=outcome,
        decisions=decisions,
        appeal=appeal,
        can_appeal=is_owner and version.status == Status.REJECTED and appeal is None,
        show_log=is_owner or is_maintainer,
        # Not on their own upload: a maintainer cannot decide on it (evaluation.services.review).
        can_suspend=is_maintainer
        and not is_owner
        and version.status in (Status.PASSED, Status.ADMITTED),
        deciding=latest
        if latest is not None and latest.decision == _DECIDED_BY.get(outcome.kind)
        else None,
    )


def _outcome(version: AdapterVersion, report: RunReport | None) -> Outcome:
    status = version.status
    failed = report.failed_rules if report else []
    if status == Status.ADMITTED:
        return Outcome("admitted", "Admitted: it is part of the live mixture.")
    if status == Status.REJECTED:
        return Outcome("rejected", "Rejected by a maintainer.")
    if status == Status.SUSPENDED:
        return Outcome("suspended", "Suspended by a maintainer.")
    if status == Status.WITHDRAWN:
        return Outcome("withdrawn", "Withdrawn by its contributor.")
    if status == Status.FAILED or (report and report.run.passed is False):
        if failed:
            names = ", ".join(rule.rule for rule in failed)
            return Outcome("refused", f"Refused: failed {names}.", failed)
        if report and report.run.failure_reason:
            return Outcome(
                "refused", f"The evaluation could not finish: {report.run.failure_reason}"
            )
        return Outcome("refused", "Refused by the admission rules.")
    if status == Status.PASSED:
        if _appeal_of(version) is not None:
            return Outcome("waiting", "Appealed: waiting for a maintainer's review.")
        if report and report.run.needs_review:
            return Outcome("waiting", "Passed every rule; waiting for a maintainer's review.")
        return Outcome("waiting", "Passed every rule; being admitted.")
    if report and report.is_live:
        return Outcome("running", "Being evaluated against the base model.")
    if status in (Status.QUEUED, Status.EVALUATING):
        return Outcome("running", "Waiting for an evaluation worker.")
    return Outcome("pending", "Not evaluated yet.")


def adapter_has_live_run(*, adapter: Adapter) -> bool:
    return EvaluationRun.objects.filter(
        version__adapter=adapter, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]
    ).exists()


# --- Appeals and test sets -----------------------------------------------------------------


@dataclass(frozen=True)
class ScoredTestSet:
    test_set: ContributorTestSet
    latest: TestSetResult | None  # from the newest run that scored it
    version_number: int | None


def adapter_test_sets(
    *, user: AbstractBaseUser, adapter_id: int
) -> tuple[Adapter, list[ScoredTestSet]]:
    """An adapter's test sets with their latest scores: its owner and maintainers."""
    adapter = adapter_get_visible(user=user, adapter_id=adapter_id)
    rows = []
    for test_set in ContributorTestSet.objects.filter(adapter=adapter).order_by("name"):
        latest = (
            TestSetResult.objects.filter(test_set=test_set)
            .select_related("run__version")
            .order_by("-run__created_at", "-run_id")
            .first()
        )
        rows.append(
            ScoredTestSet(
                test_set=test_set,
                latest=latest,
                version_number=latest.run.version.number if latest else None,
            )
        )
    return adapter, rows
