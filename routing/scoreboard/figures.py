"""The scoreboard's arithmetic, on plain values: per-example outcomes of every candidate
(the base model and each member of the mixture) and each router's pick per example.

Decoding is greedy and deterministic, so a candidate's outcome on an example never changes:
top-1 routing of any mixture is its routing decisions joined with the stored outcomes, and
oracle routing (per example, the best candidate) needs no generation at all.

Every per-example score is in [0, 1] (exact match, contains, multiple choice, and parts,
the share of a composite answer's parts that are right). The router's accuracy is taken
among the examples some candidate scores on: the share where its pick scores as well as
the best candidate does.

Compositions that mix adapters (``methods``: top-k sums, Arrow, logit fusion, the merged
adapter) make new answers, so their per-example scores are measured for the mixture and
handed in; each method is reported like a router, plus the share of examples it solves
(scores 1) and the share it solves while no single candidate does: what the mixture adds
beyond any one contribution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BASE = "base"  # the base model's label in picks and confusion counts


@dataclass(frozen=True)
class Candidate:
    version_id: int | None  # None: the base model alone
    label: str  # "base", or the adapter's model id "<owner>/<slug>"
    version_number: int | None = None


@dataclass(frozen=True)
class TaskSlice:
    """The positions, in the split's example list, of one task's examples."""

    slug: str
    suite: str
    title: str
    positions: list[int]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


SOLVED = 1.0 - 1e-9  # a score this high solves the example (every part of it right)


def split_figures(
    *,
    candidates: Sequence[Candidate],
    scores: Mapping[int | None, Sequence[float]],
    picks: Mapping[str, Sequence[int | None]],
    tasks: Sequence[TaskSlice],
    methods: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Figures of one split. ``scores[version_id]`` is that candidate's score on each
    example (the split's order); ``picks[router]`` the version id each example was routed
    to (None: the base model); ``methods[label]`` a composition's own score on each
    example."""
    n = len(scores[None])
    methods = methods or {}
    everything = TaskSlice(slug="", suite="", title="", positions=list(range(n)))
    figures = _slice_figures(candidates, scores, picks, everything, methods)
    figures["tasks"] = [
        {
            "task": t.slug,
            "suite": t.suite,
            "title": t.title,
            **_slice_figures(candidates, scores, picks, t, methods),
        }
        for t in tasks
    ]
    return figures


def _slice_figures(
    candidates: Sequence[Candidate],
    scores: Mapping[int | None, Sequence[float]],
    picks: Mapping[str, Sequence[int | None]],
    part: TaskSlice,
    methods: Mapping[str, Sequence[float]],
) -> dict[str, Any]:
    positions = part.positions
    label = {c.version_id: c.label for c in candidates}
    adapters = [c for c in candidates if c.version_id is not None]
    alone = {c.version_id: _mean([scores[c.version_id][i] for i in positions]) for c in candidates}
    best_per_example = [max(scores[c.version_id][i] for c in candidates) for i in positions]
    oracle = _mean(best_per_example)
    ranked = sorted(adapters, key=lambda c: (-(alone[c.version_id] or 0.0), c.label))
    best = ranked[0] if ranked else None
    best_score = alone[best.version_id] if best is not None else None
    routers: dict[str, Any] = {}
    for router, chosen in picks.items():
        routed = [scores[chosen[i]][i] for i in positions]
        score = _mean(routed)
        solvable = [k for k, best_here in enumerate(best_per_example) if best_here > 0]
        right = sum(1 for k in solvable if routed[k] >= best_per_example[k])
        routers[router] = {
            "score": score,
            "routed_over_oracle": score / oracle if score is not None and oracle else None,
            "routed_minus_best_single": (
                score - best_score if score is not None and best_score is not None else None
            ),
            "routed_minus_base": (
                score - alone[None] if score is not None and alone[None] is not None else None
            ),
            "accuracy": right / len(solvable) if solvable else None,
            "accuracy_n": len(solvable),
            "picks": dict(Counter(label[chosen[i]] for i in positions).most_common()),
        }
    single_solves = [any(scores[c.version_id][i] >= SOLVED for c in candidates) for i in positions]
    composed: dict[str, Any] = {}
    for label, measured in methods.items():
        values = [measured[i] for i in positions]
        score = _mean(values)
        composed[label] = {
            "score": score,
            "over_oracle": score / oracle if score is not None and oracle else None,
            "minus_best_single": (
                score - best_score if score is not None and best_score is not None else None
            ),
            "minus_base": (
                score - alone[None] if score is not None and alone[None] is not None else None
            ),
            "solved": _mean([float(v >= SOLVED) for v in values]),
            # Solved by the mixture while the base model and every adapter alone fail it.
            "emergent": _mean(
                [
                    float(v >= SOLVED and not single)
                    for v, single in zip(values, single_solves, strict=True)
                ]
            ),
        }
    return {
        "n": len(positions),
        "base": alone[None],
        "adapters": [
            {"model_id": c.label, "version": c.version_number, "score": alone[c.version_id]}
            for c in ranked
        ],
        "best_single": (
            {"model_id": best.label, "version": best.version_number, "score": best_score}
            if best is not None
            else None
        ),
        "oracle": oracle,
        "unsolved": sum(1 for b in best_per_example if b <= 0),
        "single_solved": _mean([float(solved) for solved in single_solves]),
        "routers": routers,
        "methods": composed,
    }
