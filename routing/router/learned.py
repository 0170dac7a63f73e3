"""The ``learned`` router: each candidate's predicted chance of answering a request
correctly, learned per mixture version from measured outcomes (routing.learned trains it).

A model has one column per candidate: column 0 is the base model, column j the adapter
version ``version_ids[j - 1]``. It predicts P(correct) for every column from the request's
all-MiniLM-L6-v2 embedding in one of two ways:

- ``knn``: the training prompts most similar to the request (cosine, the k best), each
  weighted by 1 / (cosine distance + 0.05), vote with what is known about them: a public
  benchmark example with every candidate's measured score, a contributor's example prompt
  with a 1 for its own adapter only. Unknowns abstain; each column is pulled towards its
  mean on the public examples by ``alpha`` neighbours' worth of weight, so a column few
  neighbours know about stays near what it does on average.
- ``linear``: one logistic regression per column, P = sigmoid(W q + b).

Either way it is one product with the request's vector (the training prompts' matrix or W),
then a gather of the candidates' columns: with 1,000 adapters a decision costs well under a
millisecond beyond embedding the request (benchmarks/bench_learned_router.py).

The decision: the candidate with the best prediction answers if it beats the base model's
prediction (``threshold`` is that prediction), else the base model does (``below_threshold``).
A request's own threshold, when it sets one, is a P(correct) the best candidate must reach
instead. A candidate the model has no column for (it cannot happen within one mixture
version, whose members are the columns) is not scored. Without a trained model in the
catalog, the embedding router decides, with reason ``no_learned_router``.

Stored as an .npz of plain numeric and string arrays, read with ``allow_pickle=False``: the
file is data, never code.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from routing.catalog import Catalog, ServedAdapter
from routing.router.decision import decide_embedding, ranking
from routing.router.learned_model import KINDS, LearnedRouterModel
from routing.router.registry import RouteRequest, register
from routing.router.types import RoutingDecision

LEARNED = "learned"
__all__ = ["KINDS", "LEARNED", "LearnedRouterModel", "route_learned_embedded"]
# --- The decision -------------------------------------------------------------------------------

_columns: weakref.WeakKeyDictionary[Catalog, dict[ServedAdapter, int]] = weakref.WeakKeyDictionary()
_columns_lock = threading.Lock()


def _column_index(catalog: Catalog, model: LearnedRouterModel) -> dict[ServedAdapter, int]:
    """{served adapter: its column}, once per catalog (the catalog holds its model)."""
    with _columns_lock:
        cached = _columns.get(catalog)
    if cached is None:
        of = model.column_of
        cached = {a: of[a.version_id] for a in catalog.adapters if a.version_id in of}
        with _columns_lock:
            cached = _columns.setdefault(catalog, cached)
    return cached


def route_learned_embedded(
    *,
    catalog: Catalog,
    query: np.ndarray,
    allowed: Sequence[ServedAdapter] | None = None,
    threshold: float | None = None,
) -> RoutingDecision:
    """The learned router's decision for a request already embedded (``query``, a unit
    vector), as serving makes it; for callers that embed many texts at once (the
    scoreboard). ``allowed`` defaults to every adapter of the catalog; ``threshold``, a
    P(correct), to the base model's prediction. Falls back to the embedding router (reason
    ``no_learned_router``) when the catalog has no trained model."""
    model = catalog.learned
    allowed = list(catalog.adapters) if allowed is None else list(allowed)
    if model is None:
        return _fallback(RouteRequest(catalog=catalog, text="", candidates=allowed, query=query))
    index = _column_index(catalog, model)
    scored = [adapter for adapter in allowed if adapter in index]
    if not scored:
        return _base_decision(reason="no_candidates", threshold=threshold)
    return _decide(model=model, index=index, scored=scored, query=query, threshold=threshold)


def _decide(
    *,
    model: LearnedRouterModel,
    index: dict[ServedAdapter, int],
    scored: list[ServedAdapter],
    query: np.ndarray,
    threshold: float | None,
) -> RoutingDecision:
    predicted = model.predict(np.asarray(query, dtype=np.float32).reshape(-1))
    columns = np.fromiter((index[a] for a in scored), dtype=np.intp, count=len(scored))
    values = predicted[columns].astype(np.float64)
    best, scores, ranked = ranking(scored, values)
    # Better than the base model by the model's margin: on a tie, or a gain too small for
    # cross-validation to trust, the base answers, the safe default.
    base = float(predicted[0]) + model.margin
    accepted = ranked[0][1] > base if threshold is None else ranked[0][1] >= threshold
    return RoutingDecision(
        router=LEARNED,
        adapter=scored[best] if accepted else None,
        scores=scores,
        threshold=base if threshold is None else float(threshold),
        reason="above_threshold" if accepted else "below_threshold",
        ranked=ranked,
    )


def _base_decision(*, reason: str, threshold: float | None) -> RoutingDecision:
    return RoutingDecision(
        router=LEARNED, adapter=None, scores=(), threshold=threshold, reason=reason
    )


def _fallback(request: RouteRequest) -> RoutingDecision:
    """The embedding router's decision under the mixture's embedding threshold (a request's
    threshold is a probability here, not a cosine), marked as such."""
    decision = decide_embedding(dataclasses.replace(request, threshold=None))
    return dataclasses.replace(decision, router=LEARNED, reason="no_learned_router")


def decide_learned(request: RouteRequest) -> RoutingDecision:
    model = request.catalog.learned
    if model is None:
        return _fallback(request)
    index = _column_index(request.catalog, model)
    # Checked before embedding: a request no candidate could win costs no model call.
    scored = [adapter for adapter in request.candidates if adapter in index]
    if not scored:
        return _base_decision(reason="no_candidates", threshold=request.threshold)
    return _decide(
        model=model,
        index=index,
        scored=scored,
        query=request.embedding(),
        threshold=request.threshold,
    )


register(
    LEARNED,
    decide_learned,
    description="each candidate's predicted P(correct), learned from measured outcomes",
)
