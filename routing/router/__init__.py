"""The request router: which adapter of the live mixture answers a request, or the base model.

Why it is shaped like this:

- It reads an immutable ``routing.catalog.Catalog`` and nothing else, so a decision needs no
  database and no lock, and a request that started on one mixture finishes on it even if
  the mixture changes meanwhile.
- Visibility comes before everything: another contributor's private adapter is invisible,
  and naming it fails exactly like naming nothing (``model_not_found``).
- The embedding router embeds the request (all-MiniLM-L6-v2, offline) and compares it by
  cosine with each adapter's signature, the centroid of its example and benchmark prompts;
  the best adapter answers if it clears a threshold, else the base model does. An adapter is
  only admitted because it beats the base on its tasks, so sending off-topic requests to the
  base is the safe default. The signatures are stacked once per catalog, so a thousand
  adapters cost one matrix-vector product.
- ``arrow`` is PEFT's data-free Arrow routing reduced to one adapter per request (see
  ``routing.router.arrow``): it needs a base-model forward, which the serving process runs
  in its engine thread and hands in as a callback.
- ``learned`` predicts each candidate's chance of answering correctly from the request's
  embedding, with a model trained per mixture version on measured outcomes (see
  ``routing.router.learned``); until one is trained it answers as the embedding router.
- ``best`` hands each request to whichever of those scored best on the served mixture's
  scoreboard (``routing.router.best``), the embedding router until it is scored.
- Routers live in one registry (``routing.router.registry``): a new one is one
  ``register(name, decide)`` call, and ``ROUTERS`` is what is registered.
- Every decision carries its best scores and a machine-readable reason, so the API can say
  how sure the router was and why the base model answered when it did.

    decision = route(catalog=catalog, model="tessera", text=prompt, user_id=user.pk,
                     policy=RoutingPolicy(licenses=frozenset({"apache-2.0"})))
"""

from routing.router.arrow import (
    ArrowPrototypeBank,
    arrow_prototypes,
    arrow_request_scores,
    capture_module_inputs,
    top_right_singular_vector,
)
from routing.router.best import BEST
from routing.router.decision import ArrowScores, candidates, route, route_embedded
from routing.router.embedding import signature_matrix
from routing.router.learned import LearnedRouterModel, route_learned_embedded
from routing.router.registry import ROUTERS, Router, RouteRequest, register, unregister
from routing.router.types import (
    MAX_COMPOSE,
    MAX_SCORES,
    RouteScore,
    RoutingDecision,
    RoutingError,
    RoutingPolicy,
)

__all__ = [
    "BEST",
    "MAX_COMPOSE",
    "MAX_SCORES",
    "ROUTERS",
    "ArrowPrototypeBank",
    "ArrowScores",
    "LearnedRouterModel",
    "RouteRequest",
    "RouteScore",
    "Router",
    "RoutingDecision",
    "RoutingError",
    "RoutingPolicy",
    "arrow_prototypes",
    "arrow_request_scores",
    "candidates",
    "capture_module_inputs",
    "register",
    "route",
    "route_embedded",
    "route_learned_embedded",
    "signature_matrix",
    "top_right_singular_vector",
    "unregister",
]
