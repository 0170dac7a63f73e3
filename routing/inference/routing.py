"""From a validated request to a routing decision and its composition, off the event loop.

The embedding router embeds the request (about 14 ms of one CPU core for all-MiniLM-L6-v2,
more on a busy machine), so it runs in a worker thread; the Arrow router needs the base
model's activations for the prompt, so its scoring runs on the scheduler thread between two
batches (see routing.serving.arrow).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from routing.catalog import MERGED_MODEL_ID, MIXTURE_MODEL_ID, Catalog
from routing.compose import Composed, CompositionRefused, compose
from routing.inference.errors import ApiError
from routing.router import RoutingDecision, RoutingError, RoutingPolicy, route
from routing.serving import arrow
from routing.serving.runtime import Runtime

# Routing errors are the request's fault (400) except these.
ERROR_STATUS = {"model_not_found": 404, "arrow_failed": 500}


@dataclass(frozen=True)
class RoutedRequest:
    catalog: Catalog  # the snapshot the decision was made on
    decision: RoutingDecision  # what the router ranked and picked
    composed: Composed  # who answers, with which weights, and how
    routing_seconds: float


def policy_of(body) -> RoutingPolicy:
    policy = body.tessera.policy

    def optional(values: list[str] | None) -> frozenset[str] | None:
        return None if values is None else frozenset(values)

    return RoutingPolicy(
        licenses=optional(policy.licenses),
        include_contributors=optional(policy.include_contributors),
        exclude_contributors=frozenset(policy.exclude_contributors),
        include_adapters=optional(policy.include_adapters),
        exclude_adapters=frozenset(policy.exclude_adapters),
        base_only=policy.base_only,
    )


async def route_request(rt: Runtime, *, body, user_id: int, prompt_ids: list[int]) -> RoutedRequest:
    catalog = rt.catalog
    started = time.monotonic()

    def decide() -> RoutingDecision:
        if body.model == MERGED_MODEL_ID:
            # The merged adapter is the whole mixture in one LoRA: no router picks it.
            return RoutingDecision(
                router="merged", adapter=None, scores=(), threshold=None, reason="merged"
            )
        return route(
            catalog=catalog,
            model=body.model,
            text=body.routing_text(),
            user_id=user_id,
            policy=policy_of(body),
            router=body.tessera.router,
            threshold=body.tessera.threshold,
            arrow_scores=arrow.scorer(rt, catalog, prompt_ids),
        )

    try:
        decision = await asyncio.to_thread(decide)
        extension = body.tessera
        merged = body.model == MERGED_MODEL_ID
        if merged and extension.composition not in (None, "merged"):
            raise CompositionRefused(
                "composition_needs_mixture",
                f"The model {MERGED_MODEL_ID!r} is one merged adapter; ask for 'tessera' to "
                f"use the {extension.composition} composition.",
            )
        composed = compose(
            catalog=catalog,
            decision=decision,
            method="merged" if merged else extension.composition,
            k=extension.k,
            temperature=extension.temperature,
            named=body.model not in (MIXTURE_MODEL_ID, MERGED_MODEL_ID),
        )
    except CompositionRefused as error:
        if error.code == "merged_unavailable" and body.model == MERGED_MODEL_ID:
            # As /v1/models says: until a merge is built and loaded, there is no such model
            # (no retryable 5xx for a state that may never change: merging may be off, or
            # the build may have failed).
            raise ApiError(
                404,
                f"The model '{MERGED_MODEL_ID}' does not exist yet: the served mixture has no "
                "merged adapter built; ask for 'tessera'.",
                code="model_not_found",
                param="model",
            ) from None
        raise ApiError(400, str(error), code=error.code, param=error.param) from None
    except RoutingError as error:
        status = ERROR_STATUS.get(error.code, 400)
        raise ApiError(
            status,
            str(error),
            code=error.code,
            type="server_error" if status >= 500 else "invalid_request_error",
            param="model" if status == 404 else None if status >= 500 else "tessera",
        ) from None
    return RoutedRequest(
        catalog=catalog,
        decision=decision,
        composed=composed,
        routing_seconds=time.monotonic() - started,
    )
