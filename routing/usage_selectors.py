"""Reads of the public API's usage: per key for its owner, per adapter for its page and the
leaderboard. They read the daily tables, so they trail live traffic by at most one flush
(TESSERA_USAGE_FLUSH_SECONDS)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import Sum
from django.db.models.functions import Coalesce

from routing.limits import utc_today
from routing.models import AdapterUsageDaily, KeyUsageDaily


@dataclass(frozen=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class DailyUsage:
    day: dt.date
    totals: UsageTotals


def _first_day(days: int) -> dt.date:
    """The first of the last ``days`` UTC days, today included."""
    if days < 1:
        raise ValueError("days must be at least 1")
    return utc_today() - dt.timedelta(days=days - 1)


_SUMS = {
    "requests": Coalesce(Sum("requests"), 0),
    "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
    "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
}


def _totals(row: dict) -> UsageTotals:
    return UsageTotals(
        requests=row["requests"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
    )


def key_usage_totals(*, token_ids: Iterable[int], days: int = 30) -> dict[int, UsageTotals]:
    """Each key's usage over the last ``days`` UTC days; keys with none are left out."""
    rows = (
        KeyUsageDaily.objects.filter(api_token_id__in=list(token_ids), day__gte=_first_day(days))
        .values("api_token_id")
        .annotate(**_SUMS)
    )
    return {row["api_token_id"]: _totals(row) for row in rows}


def key_usage_daily(*, token_id: int, days: int = 30) -> list[DailyUsage]:
    """One key's usage per UTC day, oldest first, days without requests as zeros."""
    rows = KeyUsageDaily.objects.filter(api_token_id=token_id, day__gte=_first_day(days))
    return _daily(rows.values("day").annotate(**_SUMS), days)


def adapter_usage_daily(*, adapter_id: int, days: int = 14) -> list[DailyUsage]:
    """An adapter's usage per UTC day, all its versions together, oldest first, days
    without requests as zeros."""
    rows = AdapterUsageDaily.objects.filter(
        adapter_version__adapter_id=adapter_id, day__gte=_first_day(days)
    )
    return _daily(rows.values("day").annotate(**_SUMS), days)


def adapter_usage_totals(*, days: int = 30) -> dict[int, UsageTotals]:
    """Every adapter's usage over the last ``days`` UTC days, by adapter id (all versions
    together); adapters with none are left out, and so is the base model answering alone
    (base_model_usage_totals)."""
    rows = (
        AdapterUsageDaily.objects.filter(adapter_version__isnull=False, day__gte=_first_day(days))
        .values("adapter_version__adapter_id")
        .annotate(**_SUMS)
    )
    return {row["adapter_version__adapter_id"]: _totals(row) for row in rows}


def base_model_usage_totals(*, days: int = 30) -> UsageTotals:
    """Requests the base model answered with no adapter, over the last ``days`` UTC days."""
    row = AdapterUsageDaily.objects.filter(
        adapter_version__isnull=True, day__gte=_first_day(days)
    ).aggregate(**_SUMS)
    return _totals(row)


def _daily(rows, days: int) -> list[DailyUsage]:
    by_day = {row["day"]: _totals(row) for row in rows}
    first = _first_day(days)
    return [
        DailyUsage(day=day, totals=by_day.get(day, UsageTotals()))
        for day in (first + dt.timedelta(days=offset) for offset in range(days))
    ]
