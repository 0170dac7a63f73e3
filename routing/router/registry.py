"""The routers a mixture or a request may name, registered in one place.

A router is a function of one ``RouteRequest`` (the catalog snapshot, the request's text,
the candidates it may pick from, the threshold the request asked for) to a
``RoutingDecision``. Adding one is one ``register`` call in the module that defines it:
``route()`` looks it up here, ``ROUTERS`` lists what is here, and the API accepts any name
that is. What stays in ``route()`` is what every router shares: the base model or an adapter
named explicitly, the policy's ``base_only``, and checking the threshold is a number.

    register("mine", lambda request: ...)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from routing.catalog import Catalog, ServedAdapter

if TYPE_CHECKING:
    from routing.router.types import RoutingDecision

ArrowScores = Callable[[list[ServedAdapter]], np.ndarray]

# all-MiniLM-L6-v2 reads the first 256 word pieces only; cutting the text first keeps the
# tokenizer's cost bounded for a huge prompt without changing what the model sees.
MAX_EMBEDDED_CHARS = 8192


@dataclass(frozen=True, eq=False)
class RouteRequest:
    """What a router decides from. ``candidates`` are the catalog's adapters the caller may
    see and the policy allows, in catalog order; ``threshold`` is the request's own (already
    checked finite) or None, in the router's units; the router applies its default."""

    catalog: Catalog
    text: str
    candidates: list[ServedAdapter]
    threshold: float | None = None
    arrow_scores: ArrowScores | None = None
    # The request text's unit embedding when the caller has it already (the scoreboard
    # embeds many texts at once); otherwise ``embedding()`` makes it on first use.
    query: np.ndarray | None = field(default=None)

    def embedding(self) -> np.ndarray:
        """The text's all-MiniLM-L6-v2 unit embedding, made once per request."""
        if self.query is None:
            from evaluation.worker.signatures import embed  # loads the model on first use

            object.__setattr__(self, "query", embed([str(self.text)[:MAX_EMBEDDED_CHARS]])[0])
        return self.query


RouterFunction = Callable[[RouteRequest], "RoutingDecision"]


@dataclass(frozen=True)
class Router:
    name: str
    decide: RouterFunction
    description: str = ""


_routers: dict[str, Router] = {}
_lock = threading.Lock()


def register(name: str, decide: RouterFunction, *, description: str = "") -> Router:
    """Make ``name`` a router a mixture or a request may name. A name registered twice is
    refused: two modules silently fighting over one name would route by import order."""
    if not name or name == "base":
        raise ValueError("'base' marks decisions no router made; it cannot be a router's name")
    router = Router(name=name, decide=decide, description=description)
    with _lock:
        if name in _routers:
            raise ValueError(f"a router named {name!r} is registered already")
        _routers[name] = router
    return router


def unregister(name: str) -> None:
    """Take a router out (a test's own, a plugin switched off); unknown names are ignored."""
    with _lock:
        _routers.pop(name, None)


def router_get(name: str) -> Router | None:
    return _routers.get(name)


class _RouterNames(Set):
    """The registered names, read live: a router registered later is in it at once."""

    def __contains__(self, name: object) -> bool:
        return name in _routers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_routers))

    def __len__(self) -> int:
        return len(_routers)

    def __repr__(self) -> str:
        return f"ROUTERS({', '.join(self)})"


# Routers a mixture or a request may name. "base" appears only in decisions: it marks a
# request the base model answers without any router having been consulted.
ROUTERS: Set[str] = _RouterNames()
