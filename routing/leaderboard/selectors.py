"""Reads for the public leaderboard. Everything here is stored: the newest finished
scoreboard (a Celery job computed it when the mixture was published), the evaluation runs of
admitted versions, the admission rule that measured each one's effect on the mixture, and
the daily usage tables. Nothing is scored on a request, and no example, prompt or answer is
ever selected: boards and results hold aggregates only.

A fixed number of queries per call, whatever the number of adapters, tasks or boards.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.utils import timezone

from contributions.licenses import LICENSES
from contributions.models import Adapter, AdapterVersion
from evaluation.models import EvaluationRun, RuleResult, TaskResult
from routing import selectors as mixture_selectors
from routing import usage_selectors
from routing.models import MixtureVersion, Scoreboard
from routing.scoreboard import selectors as board_selectors

BEST = "best"  # a router or composition setting that serves whatever scored best

# The board's splits in the order the page shows them; a board holds those it could score.
SPLITS = ("hidden", "paraphrase", "composite")
SPLIT_TITLES = {
    "hidden": "Hidden examples",
    "paraphrase": "Paraphrased examples",
    "composite": "Composite tasks",
}
# Usage shares are over this many UTC days, today included.
USAGE_DAYS = 30
# The rule evaluation stores, per admitted version, the mixture's routed score with and
# without it (routing.scoreboard.marginal.RULE; not imported, to keep this module's imports
# to reads).
MIXTURE_CONTRIBUTION_RULE = "mixture_contribution"


@dataclass(frozen=True)
class Filters:
    task: str = ""
    language: str = ""
    license: str = ""

    @property
    def any(self) -> bool:
        return bool(self.task or self.language or self.license)


@dataclass(frozen=True)
class BoardRow:
    """One router (top-1 routing) or composition method on one split of the board."""

    label: str  # the board's key: "embedding", "embedding/topk", "merged"
    router: str  # "" for the merged adapter, which no router chooses
    method: str  # "top1" for a router's own row
    score: float | None
    minus_base: float | None
    minus_best_single: float | None
    over_oracle: float | None
    accuracy: float | None = None  # routers only: picks as good as the best candidate
    solved: float | None = None  # methods only: the share of examples solved outright
    emergent: float | None = None  # methods only: solved while no single model solves it
    deployed: bool = False  # what the mixture serves by default


@dataclass(frozen=True)
class SplitBoard:
    name: str
    title: str
    n: int
    base: float | None
    best_single_model: str
    best_single_version: int | None
    best_single: float | None
    oracle: float | None
    routed: float | None  # the mixture's own router
    routers: list[BoardRow]
    methods: list[BoardRow]


@dataclass(frozen=True)
class Board:
    mixture: int
    finished_at: dt.datetime | None
    router: str  # the router it serves with ("best" resolved to the board's choice)
    composition: str  # likewise the composition method
    chosen_by_board: bool  # the deployment serves whatever scored best here
    members: int
    task: str  # the task the splits are narrowed to, "" for the whole union
    task_title: str
    splits: list[SplitBoard]
    methods_failed: bool
    methods_pending: bool  # the mixing methods are still being measured


@dataclass(frozen=True)
class HistorySeries:
    split: str
    title: str
    mixtures: list[int]
    base: list[float | None]
    best_single: list[float | None]
    routed: list[float | None]
    oracle: list[float | None]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The same figures a row per mixture version, for the table beside the chart."""
        return [
            {"mixture": m, "routed": r, "base": b, "best_single": s, "oracle": o}
            for m, r, b, s, o in zip(
                self.mixtures, self.routed, self.base, self.best_single, self.oracle, strict=True
            )
        ]


@dataclass(frozen=True)
class TaskEntry:
    """An admitted version's result on one task: the hidden split that decided admission."""

    model_id: str
    title: str
    version: int
    contributor: str
    license: str
    languages: list[str]
    admitted_at: dt.datetime
    n: int
    base_score: float
    adapter_score: float
    delta: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class TaskBoard:
    slug: str
    title: str
    suite: str
    entries: list[TaskEntry]


@dataclass(frozen=True)
class Contribution:
    model_id: str
    title: str
    version: int
    license: str
    # The mixture's routed score with and without this version, measured when it was
    # admitted (against the mixture of that day); None when that was not measured.
    with_it: float | None
    without: float | None
    delta: float | None
    requests: int

    @property
    def measured(self) -> bool:
        return self.delta is not None


@dataclass(frozen=True)
class ContributorRow:
    name: str
    adapters: list[Contribution]
    requests: int
    share: float | None  # of every answer served in the window; None when there were none

    @property
    def share_percent(self) -> float | None:
        return None if self.share is None else 100 * self.share


@dataclass(frozen=True)
class Choice:
    value: str
    label: str


@dataclass(frozen=True)
class Leaderboard:
    filters: Filters
    ignored: dict[str, str]  # filter values that match nothing known, left unapplied
    active_mixture: int | None
    active_board_status: str  # the active mixture's own board: "", queued, running, failed
    board: Board | None
    board_has_task: bool  # False when a task filter matches no task slice of the board
    history: list[HistorySeries]
    tasks: list[TaskBoard]
    contributors: list[ContributorRow]
    usage_days: int
    total_requests: int
    task_choices: list[Choice] = field(default_factory=list)
    language_choices: list[Choice] = field(default_factory=list)
    license_choices: list[Choice] = field(default_factory=list)


def leaderboard(*, task: str = "", language: str = "", license: str = "") -> Leaderboard:
    """The leaderboard, narrowed by the given filters. An unknown value is reported in
    ``ignored`` and not applied: a typo in a URL shows everything, and says so."""
    active = mixture_selectors.mixture_active()
    latest = _board_latest()
    versions = _admitted_versions()
    runs = latest_runs(versions)
    results = task_results(runs)
    tasks_known = _task_choices(latest, results)
    languages = sorted({lang for v in versions for lang in v.adapter.languages or ()})
    licenses = sorted({v.adapter.license for v in versions})

    wanted = {"task": task.strip(), "language": language.strip(), "license": license.strip()}
    known = {
        "task": {c.value for c in tasks_known},
        "language": set(languages),
        "license": set(licenses),
    }
    ignored = {k: v for k, v in wanted.items() if v and v not in known[k]}
    filters = Filters(**{k: ("" if k in ignored else v) for k, v in wanted.items()})

    shown = [v for v in versions if _matches(v, filters)]
    board, board_has_task = (None, True) if latest is None else _board(latest, filters.task)
    task_boards = _task_boards(shown, results, filters.task)
    if filters.task:
        # An adapter is on this task's leaderboard only if it was measured on the task.
        on_task = {entry.model_id for board_ in task_boards for entry in board_.entries}
        shown = [v for v in shown if model_id_of(v) in on_task]
    contributors, total = contributor_rows(shown, runs)
    return Leaderboard(
        filters=filters,
        ignored=ignored,
        active_mixture=active.number if active is not None else None,
        active_board_status=_active_board_status(active, latest),
        board=board,
        board_has_task=board_has_task,
        history=_history(),
        tasks=task_boards,
        contributors=contributors,
        usage_days=USAGE_DAYS,
        total_requests=total,
        task_choices=tasks_known,
        language_choices=[Choice(lang, lang) for lang in languages],
        license_choices=[Choice(code, LICENSES.get(code, code)) for code in licenses],
    )


# --- The scoreboard ---------------------------------------------------------------------------


def _board_latest() -> Scoreboard | None:
    return (
        Scoreboard.objects.select_related("mixture")
        .filter(status=Scoreboard.Status.DONE)
        .order_by("-mixture__number")
        .first()
    )


def _active_board_status(active: MixtureVersion | None, latest: Scoreboard | None) -> str:
    """Why the board shown may not be the active mixture's: its own is still queued or
    running, or failed (then the newest finished one stands in)."""
    if active is None or (latest is not None and latest.mixture_id == active.pk):
        return ""
    status = Scoreboard.objects.filter(mixture=active).values_list("status", flat=True).first()
    return status or "missing"


def _board(board: Scoreboard, task: str) -> tuple[Board, bool]:
    figures = board.figures or {}
    router, composition, chosen = _served_choice(figures)
    splits: list[SplitBoard] = []
    task_title = ""
    for name in SPLITS:
        split = (figures.get("splits") or {}).get(name)
        if not split:
            continue
        if task:
            split = next((t for t in split.get("tasks") or () if t.get("task") == task), None)
            if split is None:
                continue
            task_title = split.get("title") or task
        splits.append(_split_board(name, split, router, composition))
    pending, pending_lost = _methods_pending(board)
    summary = Board(
        mixture=board.mixture.number,
        finished_at=board.finished_at,
        router=router,
        composition=composition,
        chosen_by_board=chosen,
        members=len(figures.get("members") or ()),
        task=task,
        task_title=task_title,
        splits=splits,
        methods_failed=bool(figures.get("methods_failed")) or pending_lost,
        methods_pending=pending and not pending_lost,
    )
    return summary, not task or bool(splits)


def _served_choice(figures: dict[str, Any]) -> tuple[str, str, bool]:
    """(the router, the composition method the mixture serves with, whether either was the
    board's own choice): a ``best`` setting resolved as serving resolves it."""
    router = figures.get("router") or ""
    composition = (figures.get("composition") or {}).get("default") or "top1"
    chosen = BEST in (router, composition)
    if router == BEST:
        router = board_selectors.best_router(figures) or "embedding"
    if composition == BEST:
        composition = board_selectors.best_compositions(figures).get(router, "top1")
    return router, composition, chosen


def _methods_pending(board: Scoreboard) -> tuple[bool, bool]:
    """Whether the board's mixing methods are still being measured, and whether that
    measuring was lost (its worker died: pending for longer than a job may run)."""
    if not (board.figures or {}).get("methods_pending"):
        return False, False
    limit = dt.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)
    lost = board.finished_at is None or timezone.now() - board.finished_at > limit
    return True, lost


def _split_board(name: str, split: dict[str, Any], router: str, composition: str) -> SplitBoard:
    best = split.get("best_single") or {}
    routers = [
        BoardRow(
            label=label,
            router=label,
            method="top1",
            score=row.get("score"),
            minus_base=row.get("routed_minus_base"),
            minus_best_single=row.get("routed_minus_best_single"),
            over_oracle=row.get("routed_over_oracle"),
            accuracy=row.get("accuracy"),
            deployed=label == router and composition == "top1",
        )
        for label, row in (split.get("routers") or {}).items()
    ]
    methods = []
    for label, row in (split.get("methods") or {}).items():
        by, _, method = label.partition("/")
        router_of, method = (by, method) if method else ("", by)
        methods.append(
            BoardRow(
                label=label,
                router=router_of,
                method=method,
                score=row.get("score"),
                minus_base=row.get("minus_base"),
                minus_best_single=row.get("minus_best_single"),
                over_oracle=row.get("over_oracle"),
                solved=row.get("solved"),
                emergent=row.get("emergent"),
                deployed=method == composition and router_of in ("", router),
            )
        )
    # The board is stored as jsonb, which keeps no key order: the mixture's own router
    # first, then the others, and each router's methods after it, the merged adapter last.
    routers.sort(key=lambda row: (row.label != router, row.label))
    methods.sort(key=lambda row: (not row.router, row.router != router, row.router, row.method))
    own = (split.get("routers") or {}).get(router) or {}
    return SplitBoard(
        name=name,
        title=SPLIT_TITLES.get(name, name),
        n=split.get("n") or 0,
        base=split.get("base"),
        best_single_model=best.get("model_id") or "",
        best_single_version=best.get("version"),
        best_single=best.get("score"),
        oracle=split.get("oracle"),
        routed=own.get("score"),
        routers=routers,
        methods=methods,
    )


def _history() -> list[HistorySeries]:
    """board_history's points as one series per split, oldest mixture first."""
    points: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for point in board_selectors.board_history():
        points[point["split"]].append(point)
    ordered = [s for s in SPLITS if s in points] + sorted(set(points) - set(SPLITS))
    return [
        HistorySeries(
            split=name,
            title=SPLIT_TITLES.get(name, name),
            mixtures=[p["mixture"] for p in points[name]],
            base=[p["base"] for p in points[name]],
            best_single=[p["best_single"] for p in points[name]],
            routed=[p["routed"] for p in points[name]],
            oracle=[p["oracle"] for p in points[name]],
        )
        for name in ordered
    ]


# --- Admitted adapters and their evaluation ---------------------------------------------------


def _admitted_versions() -> list[AdapterVersion]:
    # Private adapters answer their owner only and are left off the public board too.
    return list(
        AdapterVersion.objects.filter(
            status=AdapterVersion.Status.ADMITTED, adapter__visibility=Adapter.Visibility.PUBLIC
        )
        .select_related("adapter", "adapter__owner", "adapter__owner__contributor")
        .order_by("adapter__owner__username", "adapter__slug", "number")
    )


def latest_runs(versions: list[AdapterVersion]) -> dict[int, int]:
    """{version id: id of its newest finished run}: a re-evaluated version shows its
    latest results."""
    rows = (
        EvaluationRun.objects.filter(
            version_id__in=[v.pk for v in versions], status=EvaluationRun.Status.SUCCEEDED
        )
        .order_by("version_id", "-finished_at", "-id")
        .values_list("version_id", "id")
    )
    # The first row of each version, newest first; by hand, not DISTINCT ON, which only
    # PostgreSQL has (the embedded default is SQLite). A version has a run or two.
    latest: dict[int, int] = {}
    for version_id, run_id in rows:
        latest.setdefault(version_id, run_id)
    return latest


def task_results(runs: dict[int, int]) -> list[TaskResult]:
    # The hidden split decided admission; general-suite tasks (is_target False) only check
    # that nothing else got worse, so they are no adapter's task to rank on.
    return list(
        TaskResult.objects.filter(
            run_id__in=list(runs.values()), split=TaskResult.Split.HIDDEN, is_target=True
        ).select_related("task", "task__suite_version__suite", "run")
    )


def _task_choices(board: Scoreboard | None, results: list[TaskResult]) -> list[Choice]:
    titles: dict[str, str] = {}
    for result in results:
        titles.setdefault(result.task.slug, result.task.title)
    figures = board.figures if board is not None else {}
    for split in (figures.get("splits") or {}).values():
        for task in split.get("tasks") or ():
            titles.setdefault(task.get("task") or "", task.get("title") or task.get("task"))
    titles.pop("", None)
    return [Choice(slug, title) for slug, title in sorted(titles.items(), key=lambda i: i[1])]


def _matches(version: AdapterVersion, filters: Filters) -> bool:
    adapter = version.adapter
    if filters.language and filters.language not in (adapter.languages or ()):
        return False
    return not filters.license or adapter.license == filters.license


def model_id_of(version: AdapterVersion) -> str:
    return f"{version.adapter.owner.get_username()}/{version.adapter.slug}"


def contributor_name(user) -> str:
    """The display name when the profile is public, else the username (already public in
    every model id): how answers' attributions name contributors too."""
    profile = getattr(user, "contributor", None)
    if profile is not None and profile.is_public and profile.display_name:
        return profile.display_name
    return user.get_username()


def _task_boards(
    versions: list[AdapterVersion], results: list[TaskResult], task: str
) -> list[TaskBoard]:
    by_version = {v.pk: v for v in versions}
    boards: dict[str, TaskBoard] = {}
    for result in results:
        version = by_version.get(result.run.version_id)
        if version is None or (task and result.task.slug != task):
            continue
        slug = result.task.slug
        if slug not in boards:
            suite = result.task.suite_version.suite
            boards[slug] = TaskBoard(
                slug=slug, title=result.task.title, suite=suite.title, entries=[]
            )
        boards[slug].entries.append(
            TaskEntry(
                model_id=model_id_of(version),
                title=version.adapter.title,
                version=version.number,
                contributor=contributor_name(version.adapter.owner),
                license=version.adapter.license,
                languages=list(version.adapter.languages or ()),
                admitted_at=version.status_changed_at,
                n=result.n,
                base_score=result.base_score,
                adapter_score=result.adapter_score,
                delta=result.delta,
                ci_low=result.ci_low,
                ci_high=result.ci_high,
            )
        )
    for board in boards.values():
        board.entries.sort(key=lambda e: (-e.adapter_score, -e.delta, e.model_id))
    return sorted(boards.values(), key=lambda b: (b.title.lower(), b.slug))


# --- Contributors -------------------------------------------------------------------------------


def contributor_rows(
    versions: list[AdapterVersion], runs: dict[int, int]
) -> tuple[list[ContributorRow], int]:
    """Each contributor of a shown version, with what each version added to the mixture
    when it was admitted and their share of the answers served in the last USAGE_DAYS
    days. Returns the rows and the number of answers served in that window."""
    rules = {
        run_id: values
        for run_id, values in RuleResult.objects.filter(
            run_id__in=list(runs.values()), rule=MIXTURE_CONTRIBUTION_RULE
        ).values_list("run_id", "values")
    }
    usage = usage_selectors.adapter_usage_totals(days=USAGE_DAYS)
    # A request composed from several adapters counts once for each of them (and requests
    # the base model answered alone count too), so shares are of answers served, and they
    # add up to at most 100%.
    total = sum(t.requests for t in usage.values())
    total += usage_selectors.base_model_usage_totals(days=USAGE_DAYS).requests
    grouped: dict[int, list[AdapterVersion]] = defaultdict(list)
    for version in versions:
        grouped[version.adapter.owner_id].append(version)
    rows = []
    for owned in grouped.values():
        adapters = []
        for version in owned:
            values = rules.get(runs.get(version.pk, -1)) or {}
            measured = bool(values.get("measured")) and values.get("delta") is not None
            adapters.append(
                Contribution(
                    model_id=model_id_of(version),
                    title=version.adapter.title,
                    version=version.number,
                    license=version.adapter.license,
                    with_it=values.get("with") if measured else None,
                    without=values.get("without") if measured else None,
                    delta=values.get("delta") if measured else None,
                    requests=usage[version.adapter_id].requests
                    if version.adapter_id in usage
                    else 0,
                )
            )
        # Versions of one adapter share its usage rows; count each adapter once.
        requests = sum(
            usage[adapter_id].requests
            for adapter_id in {v.adapter_id for v in owned}
            if adapter_id in usage
        )
        rows.append(
            ContributorRow(
                name=contributor_name(owned[0].adapter.owner),
                adapters=adapters,
                requests=requests,
                share=requests / total if total else None,
            )
        )
    rows.sort(key=lambda r: (-r.requests, r.name.lower()))
    return rows, total
