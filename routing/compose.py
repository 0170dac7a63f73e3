"""From a routing decision to a composition: which adapters answer a request, with which
weights, and how the engine applies them.

The router ranks candidates; the composition method decides how many of them take part:

- ``top1``: the router's pick alone (or the base model, when the router chose it);
- ``topk``: the ``k`` best candidates that clear the router's threshold, weighted by a
  softmax of their router scores at ``temperature``, summed into one LoRA per row;
- ``arrow``: the router's ranked candidates (at most ``MAX_CANDIDATES``) handed to the
  engine, which mixes the ``k`` best per token and per layer by Arrow alignment;
- ``logit``: like ``topk``, but each adapter decodes its own row and their next-token
  log-probabilities are combined by weight;
- ``merged``: the mixture's merged adapter (one LoRA built from every public admitted
  adapter), when one has been built for the served mixture.

A deployment whose TESSERA_COMPOSITION is ``best`` (the default) serves, for each router,
the method that scored best with it on the served mixture's scoreboard (hidden union), and
``top1`` until that mixture is scored.

Two rules hold for every method. A request the router sends to the base model (no
candidate, or none above the threshold) is answered by the base model whatever the method:
an adapter is admitted for what it was measured to do, and mixing in ones that the router
found off-topic would only dilute the base model's answer. And a request that names one
adapter gets that adapter alone: mixing is the mixture's job, so a composition other than
``top1`` is refused there rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.conf import settings

from multilora.composition import Composition
from routing.catalog import Catalog, ServedAdapter
from routing.router import RoutingDecision

METHODS = ("top1", "topk", "arrow", "logit", "merged")
# TESSERA_COMPOSITION=best: whichever method scored best on the served mixture's scoreboard.
BEST = "best"
MAX_K = 16
# Arrow hands the engine this many of the router's ranked candidates: every one costs its
# rank in each adapted module's shrink, and the per-token top-k seldom reaches past them.
MAX_CANDIDATES = 16


class CompositionRefused(ValueError):
    """A composition the request cannot have; ``code`` is stable and machine-readable:
    ``invalid_composition``, ``composition_needs_mixture`` or ``merged_unavailable``."""

    def __init__(self, code: str, message: str, *, param: str = "tessera.composition") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Composed:
    """Who answers: the method, the adapters taking part with their weights (for arrow,
    the router's weights over the candidates; the engine reports per-token shares at the
    end), and the engine's value for it."""

    method: str
    parts: tuple[tuple[ServedAdapter, float], ...]
    engine: Composition
    k: int | None = None
    temperature: float | None = None

    @property
    def adapters(self) -> tuple[ServedAdapter, ...]:
        return tuple(adapter for adapter, _ in self.parts)

    @property
    def primary(self) -> ServedAdapter | None:
        """The adapter with the largest weight (None: the base model answers)."""
        return max(self.parts, key=lambda part: part[1])[0] if self.parts else None


BASE = Composed(method="top1", parts=(), engine=Composition.base())


def softmax_weights(scores: list[float], temperature: float) -> list[float]:
    """softmax(score / temperature), computed from the largest score down so that it
    cannot overflow; the weights sum to 1."""
    top = max(scores)
    exps = [math.exp((score - top) / temperature) for score in scores]
    total = sum(exps)
    return [value / total for value in exps]


def compose(
    *,
    catalog: Catalog,
    decision: RoutingDecision,
    method: str | None = None,
    k: int | None = None,
    temperature: float | None = None,
    named: bool = False,
) -> Composed:
    """The composition for one routed request. ``method``, ``k`` and ``temperature`` default
    to the deployment's TESSERA_COMPOSITION* settings; ``named`` says the request named an
    adapter (or the base model) rather than the mixture."""
    if method is None:
        method = settings.TESSERA_COMPOSITION
        if method == BEST:
            method = best_available(catalog, decision.router)
    if method not in METHODS:
        raise CompositionRefused(
            "invalid_composition",
            f"Unknown composition {method!r}; use one of {', '.join(METHODS)}.",
        )
    k = settings.TESSERA_COMPOSITION_K if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise CompositionRefused(
            "invalid_composition", f"k must be an integer from 1 to {MAX_K}.", param="tessera.k"
        )
    if temperature is None:
        temperature = (
            settings.TESSERA_ARROW_TEMPERATURE
            if method == "arrow"
            else settings.TESSERA_COMPOSITION_TEMPERATURE
        )
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not (number and math.isfinite(temperature) and temperature > 0):
        raise CompositionRefused(
            "invalid_composition",
            "temperature must be a positive number.",
            param="tessera.temperature",
        )
    if named:
        if method != "top1" and decision.adapter is not None:
            raise CompositionRefused(
                "composition_needs_mixture",
                f"The {method} composition mixes the mixture's adapters; ask for the model "
                "'tessera' to use it, or leave composition out to ask this adapter alone.",
            )
        return single(decision.adapter)
    if method == "merged":
        merged = getattr(catalog, "merged", None)
        if merged is None:
            raise CompositionRefused(
                "merged_unavailable",
                "No merged adapter has been built for the served mixture yet; try another "
                "composition.",
            )
        return Composed(
            method="merged", parts=((merged, 1.0),), engine=Composition.single(merged.key)
        )
    if decision.adapter is None:  # the router chose the base model: it answers alone
        return Composed(method=method, parts=(), engine=Composition.base())
    if method == "top1":
        return single(decision.adapter)
    ranked = _eligible(decision)
    if method == "arrow":
        candidates = [adapter for adapter, _ in ranked[:MAX_CANDIDATES]]
        # Until the engine reports the per-token shares, the router's view of the mix.
        weights = softmax_weights(
            [score for _, score in ranked[:MAX_CANDIDATES]],
            settings.TESSERA_COMPOSITION_TEMPERATURE,
        )
        return Composed(
            method="arrow",
            parts=tuple(zip(candidates, weights, strict=True)),
            engine=Composition.arrow(
                [adapter.key for adapter in candidates],
                k=min(k, len(candidates)),
                temperature=float(temperature),
            ),
            k=k,
            temperature=float(temperature),
        )
    chosen = ranked[:k]
    weights = softmax_weights([score for _, score in chosen], temperature)
    keys = [adapter.key for adapter, _ in chosen]
    build = Composition.topk if method == "topk" else Composition.logit
    engine = build(keys, weights)
    if len(chosen) == 1:
        engine = Composition.single(keys[0])  # one adapter: the same answer, the fast path
    return Composed(
        method=method,
        parts=tuple(zip([adapter for adapter, _ in chosen], weights, strict=True)),
        engine=engine,
        k=k,
        temperature=float(temperature),
    )


def best_available(catalog: Catalog, router: str) -> str:
    """The method that scored best with ``router`` on the served mixture's scoreboard, or
    ``top1`` until the mixture is scored (and instead of ``merged`` while the merged adapter
    is not loaded)."""
    method = catalog.best_compositions.get(router, "top1")
    if method == "merged" and catalog.merged is None:
        return "top1"
    return method if method in METHODS else "top1"


def single(adapter: ServedAdapter | None) -> Composed:
    if adapter is None:
        return BASE
    return Composed(method="top1", parts=((adapter, 1.0),), engine=Composition.single(adapter.key))


def _eligible(decision: RoutingDecision) -> list[tuple[ServedAdapter, float]]:
    """The ranked candidates that may take part: those clearing the router's threshold
    (all of them when it has none), the router's pick first."""
    ranked = list(decision.ranked)
    if decision.threshold is not None:
        ranked = [(a, s) for a, s in ranked if s >= decision.threshold]
    if not any(adapter is decision.adapter for adapter, _ in ranked):
        ranked.insert(0, (decision.adapter, ranked[0][1] if ranked else 1.0))
    return ranked
