"""The ``best`` router: each request is decided by whichever router scored best on the
served mixture's scoreboard (hidden union, with its best composition method), so a
deployment serves what was measured to work best on its own mixture, without anyone
reading the board and switching a setting.

Until the mixture is scored, and whenever the board's choice cannot serve (the learned
router's model is not loaded yet), the embedding router decides: it needs no training, and
the learned router would fall back to it anyway. The decision names the router that made
it (``embedding`` or ``learned``), never ``best``, so attribution, usage and
TESSERA_COMPOSITION=best all see the router that actually decided; a request's own
threshold is in that router's units.
"""

from __future__ import annotations

from routing.router.decision import decide_embedding
from routing.router.learned import LEARNED, decide_learned
from routing.router.registry import RouteRequest, register
from routing.router.types import RoutingDecision

BEST = "best"


def decide_best(request: RouteRequest) -> RoutingDecision:
    catalog = request.catalog
    if catalog.best_router == LEARNED and catalog.learned is not None:
        return decide_learned(request)
    return decide_embedding(request)


register(
    BEST,
    decide_best,
    description="whichever router scored best on the served mixture's scoreboard",
)
