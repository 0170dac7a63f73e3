"""Who answers a request: the base model, an adapter the request names, or the adapter the
mixture's router picks. Pure functions of an immutable Catalog and the request, so they run
on a request's path with no database and no lock beyond the signature cache's."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from routing.catalog import BASE_MODEL_ID, MIXTURE_MODEL_ID, Catalog, ServedAdapter
from routing.router.embedding import embedding_scores, signature_matrix
from routing.router.types import (
    MAX_SCORES,
    ROUTERS,
    RouteScore,
    RoutingDecision,
    RoutingError,
    RoutingPolicy,
)

# "<owner>/<slug>@v<N>": N as the portal prints it (no sign, no leading zero).
_VERSIONED = re.compile(r"^(?P<model_id>.+)@v(?P<number>[1-9][0-9]*)$")
# all-MiniLM-L6-v2 reads the first 256 word pieces only; cutting the text first keeps the
# tokenizer's cost bounded for a huge prompt without changing what the model sees.
MAX_EMBEDDED_CHARS = 8192

ArrowScores = Callable[[list[ServedAdapter]], np.ndarray]


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
    ``text`` is what the embedding router embeds (the caller picks it from the messages).
    ``router`` overrides the mixture's default router and ``threshold`` its threshold, in
    that router's score units. ``arrow_scores`` computes Arrow scores for a list of
    candidates; the serving process supplies it because the scores need a forward of the
    base model, which only its engine thread may run.

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
            router="explicit", adapter=adapter, scores=(), threshold=None, reason="explicit"
        )

    name = catalog.router if router is None else router
    if name not in ROUTERS:
        raise RoutingError(
            "invalid_router", f"Unknown router {name!r}; use one of {', '.join(sorted(ROUTERS))}."
        )
    _check_threshold(threshold, "threshold")
    if policy.base_only:
        return _base(router="base", reason="base_only")
    if name == "explicit":
        return _base(router="explicit", reason="no_candidates")
    if name == "embedding":
        return _route_by_embedding(
            catalog=catalog,
            text=text,
            allowed=candidates(catalog=catalog, user_id=user_id, policy=policy),
            threshold=_embedding_threshold(catalog, threshold),
        )
    # Arrow scores live on another scale than cosines: no threshold unless the mixture (or
    # the request) sets one for it.
    if threshold is None:
        threshold = _setting_threshold(catalog, "arrow_threshold")
    return _route_by_arrow(
        allowed=candidates(catalog=catalog, user_id=user_id, policy=policy),
        threshold=None if threshold is None else float(threshold),
        arrow_scores=arrow_scores,
    )


# --- The routers -------------------------------------------------------------------------------


def _route_by_embedding(
    *, catalog: Catalog, text: str, allowed: list[ServedAdapter], threshold: float
) -> RoutingDecision:
    # Checked before embedding: a request no adapter could win costs no model call.
    row_of = signature_matrix(catalog).row_of
    if not any(adapter in row_of for adapter in allowed):
        return _base(router="embedding", reason="no_candidates", threshold=threshold)
    from evaluation.worker.signatures import embed  # loads sentence-transformers on first use

    query = embed([str(text)[:MAX_EMBEDDED_CHARS]])[0]
    return route_embedded(catalog=catalog, query=query, allowed=allowed, threshold=threshold)


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


def _route_by_arrow(
    *, allowed: list[ServedAdapter], threshold: float | None, arrow_scores: ArrowScores | None
) -> RoutingDecision:
    # Checked before the candidates: a process that cannot score Arrow should fail the
    # same way on every request, not only on those that happen to have candidates.
    if arrow_scores is None:
        raise RoutingError(
            "arrow_unavailable", "The arrow router is not available in this process."
        )
    if not allowed:
        return _base(router="arrow", reason="no_candidates", threshold=threshold)
    values = np.asarray(arrow_scores(list(allowed)), dtype=np.float64).reshape(-1)
    if values.shape[0] != len(allowed) or not np.isfinite(values).all():
        raise RoutingError(
            "arrow_failed",
            f"The arrow scores came back as {values.shape[0]} values for {len(allowed)} "
            "candidates, or not all finite.",
        )
    return _pick(router="arrow", scored=allowed, values=values, threshold=threshold)


def _pick(
    *, router: str, scored: Sequence[ServedAdapter], values: np.ndarray, threshold: float | None
) -> RoutingDecision:
    """Top-1 if it meets the threshold (or there is none), else the base model; the best
    scores go with the decision either way, so a caller sees how close it was."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    # Stable: among equal scores the adapter earlier in the catalog wins, every time.
    order = np.argsort(-values, kind="stable")[:MAX_SCORES]
    scores = tuple(RouteScore(model_id=scored[i].model_id, score=float(values[i])) for i in order)
    best = int(order[0])
    if threshold is None or values[best] >= threshold:
        return RoutingDecision(
            router=router,
            adapter=scored[best],
            scores=scores,
            threshold=threshold,
            reason="above_threshold",
        )
    return _base(router=router, reason="below_threshold", threshold=threshold, scores=scores)


# --- Helpers -----------------------------------------------------------------------------------


def _base(
    *,
    router: str,
    reason: str,
    threshold: float | None = None,
    scores: tuple[RouteScore, ...] = (),
) -> RoutingDecision:
    return RoutingDecision(
        router=router, adapter=None, scores=scores, threshold=threshold, reason=reason
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
