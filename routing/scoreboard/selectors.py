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


# Among methods that score the same, the cheaper one to serve (docs/benchmarks.md (g)).
_CHEAPEST_FIRST = ("top1", "topk", "merged", "logit", "arrow")


# Among routers that score the same, the one that needs no training job.
_SIMPLEST_FIRST = ("embedding", "learned")


def _hidden_scores(figures: dict[str, Any]) -> tuple[dict[str, dict[str, float]], float | None]:
    """({router: {method: score}} on the board's hidden union, top-1 routing as ``top1``;
    the merged adapter's score, which no router's), empty when there is no hidden split."""
    hidden = (figures.get("splits") or {}).get("hidden")
    if not hidden:
        return {}, None
    scores: dict[str, dict[str, float]] = {}
    for router, routed in (hidden.get("routers") or {}).items():
        if routed.get("score") is not None:
            scores.setdefault(router, {})["top1"] = routed["score"]
    merged = None
    for label, measured in (hidden.get("methods") or {}).items():
        if measured.get("score") is None:
            continue
        router, _, method = label.partition("/")
        if not method:  # "merged"
            merged = measured["score"]
        else:
            scores.setdefault(router, {})[method] = measured["score"]
    return scores, merged


def best_router(figures: dict[str, Any]) -> str | None:
    """The router that scored best on the board's hidden union, with its best composition
    method (the merged adapter, which no router chooses, left out): what
    TESSERA_ROUTER=best serves. On a tie the router that needs no training (embedding)
    wins. None when the board has no hidden split."""
    by_router, _merged = _hidden_scores(figures)
    scores = {r: max(methods.values()) for r, methods in by_router.items() if "top1" in methods}
    if not scores:
        return None
    order = {router: i for i, router in enumerate(_SIMPLEST_FIRST)}
    return max(scores, key=lambda r: (scores[r], -order.get(r, len(_SIMPLEST_FIRST)), r))


def best_compositions(figures: dict[str, Any]) -> dict[str, str]:
    """{router: the composition method that scored best with it on the board's hidden
    union}; ``merged`` (router-independent) competes under every router. Empty when the
    board has no hidden split."""
    scores, merged = _hidden_scores(figures)
    best: dict[str, str] = {}
    for router, by_method in scores.items():
        if merged is not None:
            by_method["merged"] = merged
        order = {method: i for i, method in enumerate(_CHEAPEST_FIRST)}
        best[router] = max(
            by_method, key=lambda m: (by_method[m], -order.get(m, len(_CHEAPEST_FIRST)))
        )
    return best
