"""Who answers a request: the base model, an adapter the request names, or the adapter the
mixture's router picks. Pure functions of an immutable Catalog and the request, so they run
on a request's path with no database and no lock beyond the signature cache's."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from routing.catalog import BASE_MODEL_ID, MIXTURE_MODEL_ID, Catalog, ServedAdapter
from routing.router.embedding import embedding_scores, signature_matrix
from routing.router.registry import (
    MAX_EMBEDDED_CHARS,
    ROUTERS,
    ArrowScores,
    RouteRequest,
    register,
    router_get,
)
from routing.router.types import (
    MAX_COMPOSE,
    MAX_SCORES,
    RouteScore,
    RoutingDecision,
    RoutingError,
    RoutingPolicy,
)

__all__ = [
    "MAX_EMBEDDED_CHARS",
    "ArrowScores",
    "candidates",
    "decide_arrow",
    "decide_embedding",
    "decide_explicit",
    "ranking",
    "route",
    "route_embedded",
]

# "<owner>/<slug>@v<N>": N as the portal prints it (no sign, no leading zero).
_VERSIONED = re.compile(r"^(?P<model_id>.+)@v(?P<number>[1-9][0-9]*)$")


def candidates(
    *, catalog: Catalog, user_id: int | None, policy: RoutingPolicy
) -> list[ServedAdapter]:
    """The catalog's adapters this request may be routed to, in catalog order: private ones
    only for their owner, then the policy's filters."""
    if policy.base_only:
        return []
    check_policy = not policy.is_open  # the common case: skip the per-adapter filter calls
    return [
        adapter
        for adapter in catalog.adapters
        if adapter.visible_to(user_id) and (not check_policy or policy.allows(adapter))
    ]


def route(
    *,
    catalog: Catalog,
    model: str,
    text: str,
    user_id: int | None,
    policy: RoutingPolicy,
    router: str | None = None,
    threshold: float | None = None,
    arrow_scores: ArrowScores | None = None,
) -> RoutingDecision:
    """Decide who answers one request.

    ``model`` is the request's OpenAI "model" field: ``"base"`` (the base model alone),
    ``"tessera"`` (the mixture: the router picks), or an adapter's model id
    ``"<owner>/<slug>"`` (optionally ``@v<N>``, accepted only when N is the version served).
    ``text`` is what the embedding and learned routers embed (the caller picks it from the
    messages). ``router`` overrides the mixture's default router (any name in the registry,
    routing.router.registry) and ``threshold`` its threshold, in that router's score units.
    ``arrow_scores`` computes Arrow scores for a list of candidates; the serving process
    supplies it because the scores need a forward of the base model, which only its engine
    thread may run.

    Raises RoutingError (see its codes). Under the ``explicit`` router the mixture picks
    nothing by itself, so a request for ``"tessera"`` gets the base model with reason
    ``no_candidates``: a client that always sends "tessera" keeps working on a deployment
    that routes only by name.
    """
    if model == BASE_MODEL_ID:
        return _base(router="base", reason="base_requested")
    if model != MIXTURE_MODEL_ID:
        adapter = _named_adapter(catalog=catalog, model=model, user_id=user_id)
        if not policy.allows(adapter):
            raise RoutingError(
                "adapter_filtered_out",
                f"The model {model!r} is excluded by this request's routing policy.",
            )
        return RoutingDecision(
            router="explicit",
            adapter=adapter,
            scores=(),
            threshold=None,
            reason="explicit",
            ranked=((adapter, 1.0),),
        )

    name = catalog.router if router is None else router
    chosen = router_get(name)
    if chosen is None:
        raise RoutingError(
            "invalid_router", f"Unknown router {name!r}; use one of {', '.join(sorted(ROUTERS))}."
        )
    _check_threshold(threshold, "threshold")
    if policy.base_only:
        return _base(router="base", reason="base_only")
    return chosen.decide(
        RouteRequest(
            catalog=catalog,
            text=text,
            candidates=candidates(catalog=catalog, user_id=user_id, policy=policy),
            threshold=None if threshold is None else float(threshold),
            arrow_scores=arrow_scores,
        )
    )


# --- The routers -------------------------------------------------------------------------------


def decide_explicit(request: RouteRequest) -> RoutingDecision:
    return _base(router="explicit", reason="no_candidates")


def decide_embedding(request: RouteRequest) -> RoutingDecision:
    catalog = request.catalog
    threshold = _embedding_threshold(catalog, request.threshold)
    # Checked before embedding: a request no adapter could win costs no model call.
    row_of = signature_matrix(catalog).row_of
    if not any(adapter in row_of for adapter in request.candidates):
        return _base(router="embedding", reason="no_candidates", threshold=threshold)
    return route_embedded(
        catalog=catalog,
        query=request.embedding(),
        allowed=request.candidates,
        threshold=threshold,
    )


def route_embedded(
    *,
    catalog: Catalog,
    query: np.ndarray,
    allowed: Sequence[ServedAdapter] | None = None,
    threshold: float | None = None,
) -> RoutingDecision:
    """The embedding router's decision for a request already embedded (``query``, a unit
    vector): what serving decides for that text, for callers that embed many texts at once
    (the scoreboard). ``allowed`` defaults to every adapter, ``threshold`` to the mixture's."""
    allowed = list(catalog.adapters) if allowed is None else list(allowed)
    threshold = _embedding_threshold(catalog, threshold)
    scored, cosines = embedding_scores(catalog=catalog, candidates=allowed, query=query)
    if not scored:
        return _base(router="embedding", reason="no_candidates", threshold=threshold)
    return _pick(router="embedding", scored=scored, values=cosines, threshold=threshold)


def decide_arrow(request: RouteRequest) -> RoutingDecision:
    # Checked before the candidates: a process that cannot score Arrow should fail the
    # same way on every request, not only on those that happen to have candidates.
    if request.arrow_scores is None:
        raise RoutingError(
            "arrow_unavailable", "The arrow router is not available in this process."
        )
    # Arrow scores live on another scale than cosines: no threshold unless the mixture (or
    # the request) sets one for it.
    threshold = request.threshold
    if threshold is None:
        threshold = _setting_threshold(request.catalog, "arrow_threshold")
    allowed = request.candidates
    if not allowed:
        return _base(router="arrow", reason="no_candidates", threshold=threshold)
    values = np.asarray(request.arrow_scores(list(allowed)), dtype=np.float64).reshape(-1)
    if values.shape[0] != len(allowed) or not np.isfinite(values).all():
        raise RoutingError(
            "arrow_failed",
            f"The arrow scores came back as {values.shape[0]} values for {len(allowed)} "
            "candidates, or not all finite.",
        )
    return _pick(router="arrow", scored=allowed, values=values, threshold=threshold)


def ranking(
    scored: Sequence[ServedAdapter], values: np.ndarray
) -> tuple[int, tuple[RouteScore, ...], tuple[tuple[ServedAdapter, float], ...]]:
    """(the best one's index, the best MAX_SCORES as RouteScores, the best MAX_COMPOSE with
    their values); NaN ranks last. Stable: among equal scores the adapter earlier in the
    catalog wins, every time."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-values, kind="stable")[:MAX_COMPOSE].tolist()
    ranked = tuple((scored[i], float(values[i])) for i in order)
    scores = tuple(
        RouteScore(model_id=adapter.model_id, score=value) for adapter, value in ranked[:MAX_SCORES]
    )
    return order[0], scores, ranked


def _pick(
    *, router: str, scored: Sequence[ServedAdapter], values: np.ndarray, threshold: float | None
) -> RoutingDecision:
    """Top-1 if it meets the threshold (or there is none), else the base model; the best
    scores go with the decision either way, so a caller sees how close it was."""
    best, scores, ranked = ranking(scored, values)
    if threshold is None or ranked[0][1] >= threshold:
        return RoutingDecision(
            router=router,
            adapter=scored[best],
            scores=scores,
            threshold=threshold,
            reason="above_threshold",
            ranked=ranked,
        )
    return _base(
        router=router, reason="below_threshold", threshold=threshold, scores=scores, ranked=ranked
    )


register(
    "embedding",
    decide_embedding,
    description="cosine of the request's embedding with each adapter's signature",
)
register(
    "arrow", decide_arrow, description="request-level Arrow: the prompt's base-model activations"
)
register("explicit", decide_explicit, description="only adapters a request names; none by itself")


# --- Helpers -----------------------------------------------------------------------------------


def _base(
    *,
    router: str,
    reason: str,
    threshold: float | None = None,
    scores: tuple[RouteScore, ...] = (),
    ranked: tuple[tuple[ServedAdapter, float], ...] = (),
) -> RoutingDecision:
    return RoutingDecision(
        router=router,
        adapter=None,
        scores=scores,
        threshold=threshold,
        reason=reason,
        ranked=ranked,
    )


def _named_adapter(*, catalog: Catalog, model: str, user_id: int | None) -> ServedAdapter:
    """The adapter a model id names, if the caller may see it. An unknown id and another
    contributor's private adapter raise the same error with the same message, so that a
    private adapter's existence never leaks."""
    not_found = RoutingError(
        "model_not_found",
        f"The model {model!r} does not exist or you do not have access to it.",
    )
    adapter = catalog.by_model_id(model)
    wanted_version: int | None = None
    if adapter is None:
        match = _VERSIONED.match(model)
        if match is not None:
            adapter = catalog.by_model_id(match["model_id"])
            wanted_version = int(match["number"])
    if adapter is None or not adapter.visible_to(user_id):
        raise not_found
    if wanted_version is not None and wanted_version != adapter.version_number:
        # The caller may see this adapter, so naming the version it serves reveals nothing.
        raise RoutingError(
            "model_not_found",
            f"The model {model!r} is not served; {adapter.model_id!r} serves "
            f"v{adapter.version_number}.",
        )
    return adapter


def _embedding_threshold(catalog: Catalog, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    configured = _setting_threshold(catalog, "threshold")
    if configured is not None:
        return configured
    from django.conf import settings

    return float(settings.TESSERA_ROUTER_THRESHOLD)


def _setting_threshold(catalog: Catalog, key: str) -> float | None:
    """A threshold from the mixture's router settings (set when it was published)."""
    value: Any = (catalog.router_settings or {}).get(key)
    if value is None:
        return None
    _check_threshold(value, f"mixture's router_settings[{key!r}]")
    return float(value)


def _check_threshold(value: Any, label: str) -> None:
    if value is None:
        return
    try:
        finite = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise RoutingError("invalid_threshold", f"The {label} must be a finite number.")
