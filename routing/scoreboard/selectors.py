"""Reads of stored scoreboards (never computed on a request)."""

from __future__ import annotations

from typing import Any

from routing.models import Scoreboard
from tessera.errors import DomainError

Status = Scoreboard.Status


def board_latest() -> Scoreboard:
    board = (
        Scoreboard.objects.select_related("mixture")
        .filter(status=Status.DONE)
        .order_by("-mixture__number")
        .first()
    )
    if board is None:
        raise DomainError(
            "scoreboard_not_ready",
            "No mixture version has been scored yet.",
            kind="not_found",
        )
    return board


def board_of(*, number: int) -> Scoreboard:
    board = Scoreboard.objects.select_related("mixture").filter(mixture__number=number).first()
    if board is None:
        raise DomainError(
            "scoreboard_not_found",
            f"Mixture version {number} has no scoreboard.",
            kind="not_found",
        )
    return board


def board_history() -> list[dict[str, Any]]:
    """One point per finished board and split, oldest mixture first."""
    points: list[dict[str, Any]] = []
    boards = (
        Scoreboard.objects.select_related("mixture")
        .filter(status=Status.DONE)
        .order_by("mixture__number")
    )
    for board in boards:
        figures = board.figures or {}
        for name, split in (figures.get("splits") or {}).items():
            routers = split.get("routers") or {}
            # The mixture's own router when the board has it, else the first it has.
            routed = routers.get(figures.get("router")) or next(iter(routers.values()), {})
            points.append(
                {
                    "mixture": board.mixture.number,
                    "finished_at": board.finished_at,
                    "adapters": len(figures.get("members") or []),
                    "split": name,
                    "base": split.get("base"),
                    "best_single": (split.get("best_single") or {}).get("score"),
                    "routed": routed.get("score"),
                    "oracle": split.get("oracle"),
                    "router_accuracy": routed.get("accuracy"),
                }
            )
    return points
