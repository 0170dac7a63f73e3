"""Reads for the public model cards and contributor profiles. They stand on the leaderboard's
selectors (the same admitted versions, newest runs, hidden-split results and contribution
figures), so a card and the board never disagree. Stored figures and contributor-written
text only: no example, prompt, answer or run log is ever selected.

A fixed number of queries per call, whatever the number of versions, tasks or days.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.utils.safestring import SafeString, mark_safe

from contributions.licenses import LICENSES
from contributions.models import Adapter, AdapterVersion, Contributor
from evaluation.review_selectors import model_card_text
from routing import usage_selectors
from routing.leaderboard import selectors as board
from routing.public import cards

# The versions a visitor sees: those that were served at some point. Versions still in
# review, or refused, are their owner's business (the portal shows them there).
PUBLIC_STATUSES = (
    AdapterVersion.Status.ADMITTED,
    AdapterVersion.Status.WITHDRAWN,
    AdapterVersion.Status.SUSPENDED,
)
USAGE_DAYS = board.USAGE_DAYS


@dataclass(frozen=True)
class VersionRow:
    number: int
    status: str
    status_label: str
    since: dt.datetime  # when it reached that status
    uploaded: dt.datetime


@dataclass(frozen=True)
class TaskScore:
    version: int
    task: str
    task_title: str
    suite: str
    n: int
    base_score: float
    adapter_score: float
    delta: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class UsageDay:
    day: dt.date
    requests: int
    tokens: int
    percent_of_peak: int  # the bar's height in the chart, 0–100


@dataclass(frozen=True)
class ModelCard:
    adapter: Adapter
    model_id: str
    owner_username: str
    contributor: str  # the name the leaderboard shows
    profile_public: bool  # then the contributor's name links to their profile
    license_name: str
    latest: AdapterVersion  # the newest admitted version
    readme_html: SafeString | None  # None: no README, the description stands in
    readme_truncated: bool
    versions: list[VersionRow]
    scores: list[TaskScore]
    usage: list[UsageDay]  # oldest first, every day of the window
    usage_requests: int
    usage_days: int


@dataclass(frozen=True)
class CardLink:
    owner_username: str
    slug: str
    title: str
    version: int
    license: str
    task_tags: list[str]
    languages: list[str]

    @property
    def model_id(self) -> str:
        return f"{self.owner_username}/{self.slug}"


@dataclass(frozen=True)
class Profile:
    username: str
    name: str
    affiliation: str
    since: dt.datetime
    cards: list[CardLink]  # each adapter's newest admitted version
    credit: board.ContributorRow | None  # None when nothing of theirs is admitted
    total_requests: int
    usage_days: int


def _public_profile(user) -> bool:
    profile = getattr(user, "contributor", None)
    return profile is not None and profile.is_public


def _card_html(text: str | None) -> SafeString | None:
    if not text or not text.strip():
        return None
    # Safe to mark: cards.render() sanitised it with nh3 against an allow-list.
    return mark_safe(cards.render(text))  # noqa: S308


# --- Model cards ----------------------------------------------------------------------------


def model_card(*, owner: str, slug: str) -> ModelCard | None:
    """The card of a public adapter with an admitted version, else None (whether it does
    not exist, is private or has nothing admitted: the caller answers the same 404)."""
    adapter = (
        Adapter.objects.select_related("owner", "owner__contributor")
        .filter(owner__username=owner, slug=slug, visibility=Adapter.Visibility.PUBLIC)
        .first()
    )
    if adapter is None:
        return None
    shown = list(
        AdapterVersion.objects.filter(adapter=adapter, status__in=PUBLIC_STATUSES).order_by(
            "-number"
        )
    )
    admitted = [v for v in shown if v.status == AdapterVersion.Status.ADMITTED]
    if not admitted:
        return None
    for version in shown:
        version.adapter = adapter  # the leaderboard's helpers read version.adapter.owner
    latest = admitted[0]
    text, truncated = model_card_text(version=latest)
    runs = board.latest_runs(admitted)
    numbers = {v.pk: v.number for v in admitted}
    scores = [
        TaskScore(
            version=numbers[result.run.version_id],
            task=result.task.slug,
            task_title=result.task.title,
            suite=result.task.suite_version.suite.title,
            n=result.n,
            base_score=result.base_score,
            adapter_score=result.adapter_score,
            delta=result.delta,
            ci_low=result.ci_low,
            ci_high=result.ci_high,
        )
        for result in board.task_results(runs)
    ]
    scores.sort(key=lambda s: (-s.version, s.task_title.lower(), s.task))
    days = usage_selectors.adapter_usage_daily(adapter_id=adapter.pk, days=USAGE_DAYS)
    peak = max((d.totals.requests for d in days), default=0)
    return ModelCard(
        adapter=adapter,
        model_id=board.model_id_of(latest),
        owner_username=adapter.owner.get_username(),
        contributor=board.contributor_name(adapter.owner),
        profile_public=_public_profile(adapter.owner),
        license_name=LICENSES.get(adapter.license, adapter.license),
        latest=latest,
        readme_html=_card_html(text),
        readme_truncated=truncated,
        versions=[
            VersionRow(
                number=v.number,
                status=v.status,
                status_label=v.get_status_display(),
                since=v.status_changed_at,
                uploaded=v.created_at,
            )
            for v in shown
        ],
        scores=scores,
        usage=[
            UsageDay(
                day=d.day,
                requests=d.totals.requests,
                tokens=d.totals.total_tokens,
                percent_of_peak=round(100 * d.totals.requests / peak) if peak else 0,
            )
            for d in days
        ],
        usage_requests=sum(d.totals.requests for d in days),
        usage_days=USAGE_DAYS,
    )


# --- Contributor profiles -------------------------------------------------------------------


def contributor_profile(*, username: str) -> Profile | None:
    """A contributor's public profile, or None when there is no such user or they did not
    choose a public profile (the caller answers the same 404 for both)."""
    profile = (
        Contributor.objects.select_related("user")
        .filter(user__username=username, is_public=True)
        .first()
    )
    if profile is None:
        return None
    user = profile.user
    versions = list(
        AdapterVersion.objects.filter(
            adapter__owner=user,
            status=AdapterVersion.Status.ADMITTED,
            adapter__visibility=Adapter.Visibility.PUBLIC,
        )
        .select_related("adapter")
        .order_by("adapter__slug", "number")
    )
    for version in versions:
        version.adapter.owner = user  # already read; the leaderboard's helpers name it
    # The leaderboard's own figures for this contributor: the same row it shows.
    rows, total = board.contributor_rows(versions, board.latest_runs(versions))
    newest: dict[int, AdapterVersion] = {}
    for version in versions:
        newest[version.adapter_id] = version  # ordered by number: the last one wins
    return Profile(
        username=user.get_username(),
        name=board.contributor_name(user),
        affiliation=profile.affiliation,
        since=profile.created_at,
        cards=[
            CardLink(
                owner_username=user.get_username(),
                slug=v.adapter.slug,
                title=v.adapter.title,
                version=v.number,
                license=v.adapter.license,
                task_tags=list(v.adapter.task_tags or ()),
                languages=list(v.adapter.languages or ()),
            )
            for v in newest.values()
        ],
        credit=rows[0] if rows else None,
        total_requests=total,
        usage_days=USAGE_DAYS,
    )


def public_profile_usernames() -> set[str]:
    """Usernames of contributors with a public profile and an admitted public adapter: the
    leaderboard links those names (one query, however many rows it shows)."""
    return set(
        get_user_model()
        .objects.filter(
            contributor__is_public=True,
            adapters__visibility=Adapter.Visibility.PUBLIC,
            adapters__versions__status=AdapterVersion.Status.ADMITTED,
        )
        .values_list("username", flat=True)
        .distinct()
    )
