"""The scoreboard's compositions: each router's decisions turned into each method's answer,
per example, measured only where they differ from a stored outcome.

For every router and every mixing method (``topk``, ``arrow``, ``logit``), an example's
composition is what routing.compose makes of that router's decision, exactly as serving
makes it. Most compositions need no generation: one the router sends to the base model is
the base model's stored outcome, and one with a single adapter is that adapter's. The rest
are measured together in one sandboxed child (evaluation.services.composed), with the
mixture's merged adapter (when it is built) answering every example as the ``merged``
method. On a generative task a composition's greedy answer is scored; on a
multiple-choice task, the choice the composed model finds likeliest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from contributions.models import AdapterVersion, BaseModel
from evaluation.services.composed import ComposedPart, ExtraAdapter, composed_measure
from evaluation.services.outcomes import UnionSplit
from routing.catalog import Catalog
from routing.compose import Composed, compose
from routing.router import RoutingDecision

MIXING = ("topk", "arrow", "logit")
MERGED = "merged"
MERGED_KEY = "merged"  # the merged adapter's name inside the measuring child


@dataclass(frozen=True)
class SplitRouting:
    """One split's examples (its task parts, in order), every candidate's stored score per
    example, and each router's decision per example."""

    parts: list[UnionSplit]
    scores: Mapping[int | None, Sequence[float]]  # version id (None: base) -> per example
    decisions: Mapping[str, Sequence[RoutingDecision]]  # router -> per example


def method_label(router: str, method: str) -> str:
    return f"{router}/{method}"


def composed_for(
    catalog: Catalog, decision: RoutingDecision, method: str
) -> tuple[Composed, dict[str, Any] | None]:
    """The composition serving makes of ``decision`` under ``method``, and what to measure
    for it (None when a stored outcome is its answer: the base model or one adapter)."""
    composed = compose(catalog=catalog, decision=decision, method=method)
    engine = composed.engine
    if engine.is_base or engine.method == "top1":
        return composed, None
    return composed, {
        "method": engine.method,
        "adapters": [adapter.version_id for adapter in composed.adapters],
        "weights": list(engine.weights),
        "k": engine.k,
        "temperature": engine.temperature,
    }


def stored_score(
    composed: Composed, scores: Mapping[int | None, Sequence[float]], position: int
) -> float:
    adapter = composed.primary
    row = scores.get(adapter.version_id if adapter is not None else None)
    return float(row[position]) if row is not None else 0.0


def method_scores(
    *,
    base_model: BaseModel,
    members: list[AdapterVersion],
    catalog: Catalog,
    splits: Mapping[str, SplitRouting],
    merged: ExtraAdapter | None = None,
    measure: Callable[..., dict[str, list[float]]] = composed_measure,
) -> dict[str, dict[str, list[float]]]:
    """{split name: {label: per-example score}} for every router × mixing method, and
    ``merged`` when a merged adapter is given. One sandboxed child measures everything
    that no stored outcome answers."""
    results: dict[str, dict[str, list[float]]] = {}
    to_measure: list[ComposedPart] = []
    # (split name, label, part key, positions in the split) of what the child answers
    pending: list[tuple[str, str, str, list[int]]] = []
    for name, routing in splits.items():
        labels: dict[str, list[float]] = {}
        offsets = _offsets(routing.parts)
        for router, decisions in routing.decisions.items():
            for method in MIXING:
                label = method_label(router, method)
                values = [0.0] * len(decisions)
                for part, start in zip(routing.parts, offsets, strict=True):
                    wanted: list[int] = []
                    compositions: list[dict[str, Any]] = []
                    for offset in range(len(part.example_ids)):
                        position = start + offset
                        composed, fields = composed_for(catalog, decisions[position], method)
                        if fields is None:
                            values[position] = stored_score(composed, routing.scores, position)
                        else:
                            wanted.append(position)
                            compositions.append(fields)
                    if wanted:
                        subset = _subset(part, [p - start for p in wanted])
                        item = ComposedPart(label=label, split=subset, compositions=compositions)
                        to_measure.append(item)
                        pending.append((name, label, item.key, wanted))
                labels[label] = values
        if merged is not None:
            labels[MERGED] = [0.0] * sum(len(part.example_ids) for part in routing.parts)
            for part, start in zip(routing.parts, offsets, strict=True):
                item = ComposedPart(
                    label=MERGED,
                    split=part,
                    compositions=[
                        {"method": "top1", "adapters": [MERGED_KEY], "weights": [1.0]}
                        for _ in part.example_ids
                    ],
                )
                to_measure.append(item)
                pending.append(
                    (name, MERGED, item.key, list(range(start, start + len(part.example_ids))))
                )
        results[name] = labels
    if to_measure:
        measured = measure(
            base_model=base_model,
            versions=members,
            parts=to_measure,
            extra=[merged] if merged is not None else [],
        )
        for name, label, key, positions in pending:
            values = measured.get(key) or [0.0] * len(positions)
            for position, value in zip(positions, values, strict=True):
                results[name][label][position] = value
    return results


def deployment_composition() -> dict[str, Any]:
    """The settings the compositions were made with, for the board."""
    return {
        "default": settings.TESSERA_COMPOSITION,
        "k": settings.TESSERA_COMPOSITION_K,
        "temperature": settings.TESSERA_COMPOSITION_TEMPERATURE,
        "arrow_temperature": settings.TESSERA_ARROW_TEMPERATURE,
    }


def _offsets(parts: list[UnionSplit]) -> list[int]:
    offsets, cursor = [], 0
    for part in parts:
        offsets.append(cursor)
        cursor += len(part.example_ids)
    return offsets


def _subset(part: UnionSplit, indices: list[int]) -> UnionSplit:
    return UnionSplit(
        task=part.task,
        split=part.split,
        example_ids=[part.example_ids[i] for i in indices],
        examples=[part.examples[i] for i in indices],
        template=part.template,
    )
