"""Following the demo to a live mixture: what ``make run`` shows while the committed demo
adapters go through the normal pipeline.

``seed_demo --adapters`` uploads every demo adapter as its demo contributor; the worker
evaluates them (together, in one sandboxed child); this module reads where each stands and
records the demo maintainer's decision on every version that passed and waits for review,
through the review service, with a reason, as a maintainer clicking "approve" would. The
mixture is then published by admission, the scoreboard job scores it, and the inference
server loads it: ``demo_ready`` says when all of that has happened.

The maintainer's decision is recorded here, not by a policy switch, so that the demo shows
the review path every first contribution takes; ``make run DEMO=0`` leaves it to a person.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model

from contributions.demo import DEMO_CONTRIBUTORS, DEMO_MAINTAINER
from contributions.models import AdapterVersion
from evaluation.models import EvaluationRun, RuleResult, Task
from evaluation.services.review import review_approve
from routing import selectors as mixture_selectors
from routing.models import Scoreboard
from tessera.errors import DomainError

logger = logging.getLogger(__name__)

Status = AdapterVersion.Status
APPROVAL_REASON = (
    "Approved by the demo maintainer when `make run` seeded the demo: it passed every "
    "admission rule on the hidden split."
)
# Where a version waits on something: evaluation, or the maintainer.
WAITING = {Status.UPLOADED, Status.VALIDATED, Status.QUEUED, Status.EVALUATING, Status.PASSED}


@dataclass(frozen=True)
class VersionLine:
    """One demo version as the follower prints it."""

    model_id: str
    number: int
    status: str
    run_status: str = ""
    done: int = 0
    total: int = 0
    label: str = ""
    failed_rules: list[str] = field(default_factory=list)
    failure: str = ""


@dataclass(frozen=True)
class DemoState:
    versions: list[VersionLine]
    approved: list[str]  # the versions this step approved
    mixture: int | None  # the active mixture version's number
    members: frozenset[int]
    admitted: frozenset[int]  # the demo versions admitted
    board_status: str  # of the active mixture's scoreboard ("" when there is none)
    figures: dict[str, Any]  # its figures, once done

    @property
    def settled(self) -> bool:
        """Every demo version has its outcome: none waits on evaluation or review."""
        return all(line.status not in WAITING for line in self.versions)

    @property
    def scored(self) -> bool:
        """The active mixture holds every admitted demo version and its board is done."""
        return (
            self.mixture is not None
            and self.admitted <= self.members
            and self.board_status == Scoreboard.Status.DONE
        )


def demo_versions() -> list[AdapterVersion]:
    """The newest version of every adapter the demo contributors own."""
    versions = (
        AdapterVersion.objects.filter(adapter__owner__username__in=DEMO_CONTRIBUTORS)
        .select_related("adapter__owner")
        .order_by("adapter__owner__username", "adapter__slug", "-number")
    )
    newest: dict[int, AdapterVersion] = {}
    for version in versions:
        newest.setdefault(version.adapter_id, version)
    return list(newest.values())


def demo_step(*, approve: bool = True) -> DemoState:
    """Approve what waits for the demo maintainer (when ``approve``), then read the state."""
    approved = _approve_passed() if approve else []
    versions = demo_versions()
    runs = _latest_runs(versions)
    mixture = mixture_selectors.mixture_active()
    board = Scoreboard.objects.filter(mixture=mixture).first() if mixture else None
    return DemoState(
        versions=[_line(version, runs.get(version.pk)) for version in versions],
        approved=approved,
        mixture=mixture.number if mixture else None,
        members=mixture_selectors.mixture_member_ids(mixture),
        admitted=frozenset(v.pk for v in versions if v.status == Status.ADMITTED),
        board_status=board.status if board else "",
        figures=(board.figures or {}) if board and board.status == Scoreboard.Status.DONE else {},
    )


def _approve_passed() -> list[str]:
    maintainer = get_user_model().objects.filter(username=DEMO_MAINTAINER).first()
    if maintainer is None:
        return []
    approved = []
    for version in demo_versions():
        if version.status != Status.PASSED:
            continue
        try:
            review_approve(version=version, actor=maintainer, reason=APPROVAL_REASON)
        except DomainError as exc:  # decided by a person meanwhile, or not the maintainer's
            logger.info("demo approval of %s skipped: %s", version, exc.code)
            continue
        approved.append(_model_id(version))
    return approved


def _latest_runs(versions: list[AdapterVersion]) -> dict[int, EvaluationRun]:
    runs: dict[int, EvaluationRun] = {}
    for run in EvaluationRun.objects.filter(version__in=versions).order_by("version_id", "-pk"):
        runs.setdefault(run.version_id, run)
    return runs


def _model_id(version: AdapterVersion) -> str:
    return f"{version.adapter.owner.username}/{version.adapter.slug}"


def _line(version: AdapterVersion, run: EvaluationRun | None) -> VersionLine:
    if run is None:
        return VersionLine(_model_id(version), version.number, version.status)
    failed = []
    if version.status == Status.FAILED:
        failed = list(
            RuleResult.objects.filter(run=run, passed=False).values_list("detail", flat=True)
        )
    return VersionLine(
        model_id=_model_id(version),
        number=version.number,
        status=version.status,
        run_status=run.status,
        done=run.progress_done,
        total=run.progress_total,
        label=progress_words(run.progress_label),
        failed_rules=failed,
        failure=run.failure_reason if run.status == EvaluationRun.Status.FAILED else "",
    )


def progress_words(label: str) -> str:
    """The worker's progress label in words: ``task:12:hidden`` is the task's title and
    split; other labels are words already."""
    parts = label.split(":")
    if len(parts) == 3 and parts[0] == "task" and parts[1].isdigit():
        title = Task.objects.filter(pk=int(parts[1])).values_list("title", flat=True).first()
        if title:
            return f"{title} ({parts[2]})"
    return label


def serving_mixture(api_url: str, *, timeout: float = 2.0) -> int | None:
    """The mixture version number the inference server at ``api_url`` serves (its
    /healthz), or None while it is starting or unreachable."""
    if not api_url.startswith(("http://", "https://")):
        return None
    url = f"{api_url.rstrip('/')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (http(s) only)
            health = json.loads(answer.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    number = health.get("mixture") if isinstance(health, dict) else None
    return number if isinstance(number, int) else None


def board_summary(figures: dict[str, Any]) -> list[str]:
    """A few lines of the board for a terminal: each split's base model, best single
    adapter, routed mixture per router, and oracle routing."""
    lines = []
    for name, split in (figures.get("splits") or {}).items():
        best = split.get("best_single") or {}
        routers = split.get("routers") or {}
        order = [r for r in figures.get("routers") or () if r in routers] or sorted(routers)
        routed = ", ".join(f"{router} {_score(routers[router].get('score'))}" for router in order)
        lines.append(
            f"  {name:<10} (n={split.get('n')}): base {_score(split.get('base'))} · "
            f"best single {_score(best.get('score'))} ({best.get('model_id', '-')}) · "
            f"routed {routed} · oracle {_score(split.get('oracle'))}"
        )
    return lines


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"
