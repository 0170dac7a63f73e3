"""The public leaderboard page: no login, stored figures only (see selectors)."""

from __future__ import annotations

import dataclasses

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from routing.leaderboard import selectors


@require_safe
def index(request: HttpRequest) -> HttpResponse:
    board = selectors.leaderboard(
        task=request.GET.get("task", ""),
        language=request.GET.get("language", ""),
        license=request.GET.get("license", ""),
    )
    context = {
        "lb": board,
        # The chart's data, also shown in the history table for readers without scripts.
        "chart": [dataclasses.asdict(series) for series in board.history],
    }
    return render(request, "leaderboard/index.html", context)
