"""The router's values: what a request allows, what the router decided, and why it refused."""

from __future__ import annotations

from dataclasses import dataclass

from routing.catalog import ServedAdapter

# How many scores a decision carries: enough to show how close the runner-up was, few enough
# to put in every response.
MAX_SCORES = 5
# How many ranked candidates a decision carries for composing an answer from several
# adapters (TESSERA_COMPOSITION_K is at most this).
MAX_COMPOSE = 16


@dataclass(frozen=True)
class RoutingPolicy:
    """Per-request filters on which adapters may answer; every field is optional.

    The filters compose with AND: an adapter is a candidate only when every filter allows it.
    They narrow what the router may pick and what a request may name explicitly; they never
    widen visibility (a private adapter stays its owner's whatever the policy says).
    """

    licenses: frozenset[str] | None = None  # allowed license codes (None: any)
    include_contributors: frozenset[str] | None = None  # owner usernames allowed (None: any)
    exclude_contributors: frozenset[str] = frozenset()
    include_adapters: frozenset[str] | None = None  # model ids "<owner>/<slug>" (None: any)
    exclude_adapters: frozenset[str] = frozenset()
    # No adapter at all: the mixture answers with the base model, and naming an adapter
    # explicitly is refused as filtered out (the caller's own rule forbids it).
    base_only: bool = False

    def allows(self, adapter: ServedAdapter) -> bool:
        """Whether the filters let ``adapter`` answer (visibility is checked separately)."""
        if self.base_only:
            return False
        if self.licenses is not None and adapter.license not in self.licenses:
            return False
        owner = adapter.owner_username
        if self.include_contributors is not None and owner not in self.include_contributors:
            return False
        if owner in self.exclude_contributors:
            return False
        if self.include_adapters is not None and adapter.model_id not in self.include_adapters:
            return False
        return adapter.model_id not in self.exclude_adapters

    @property
    def is_open(self) -> bool:
        """True when the policy filters nothing (the router can skip checking each adapter)."""
        return self == _OPEN


_OPEN = RoutingPolicy()


@dataclass(frozen=True)
class RouteScore:
    model_id: str
    # In the router's own units: cosine for embedding, mean |cos| for arrow, the predicted
    # chance of answering correctly for learned.
    score: float


@dataclass(frozen=True)
class RoutingDecision:
    """Who answers a request, and how sure the router was.

    ``reason`` is machine-readable, one of:

    - ``explicit``: the request named an adapter and it answers;
    - ``above_threshold``: the router's best candidate scored at least ``threshold``
      (or there was no threshold to meet);
    - ``below_threshold``: the best candidate fell short, so the base model answers;
    - ``no_candidates``: nothing the router could pick (no admitted adapter visible to the
      caller passed the policy, none had what the router needs, or the router is
      ``explicit``, which never picks on its own), so the base model answers;
    - ``base_only``: the policy asked for the base model;
    - ``base_requested``: the request named the base model;
    - ``no_learned_router``: the ``learned`` router was asked for but the mixture has no
      trained one (yet): the embedding router decided instead, and ``adapter``, ``scores``,
      ``ranked`` and ``threshold`` are its (``router`` still says ``learned``).

    ``ranked`` is what a composition of several adapters reads: the candidates the router
    scored, best first, at most MAX_COMPOSE, each with its score in the router's units
    (whatever the reason, so a caller may weigh the top k even when the base model
    answers alone); an explicitly named adapter is ranked alone, at 1.0. ``scores`` is the
    first MAX_SCORES of the router's ranking as model ids, for responses.
    """

    router: str  # a registered router's name (routing.router.registry), or "base"
    adapter: ServedAdapter | None  # None: the base model answers
    scores: tuple[RouteScore, ...]  # best first, at most MAX_SCORES, candidates only
    threshold: float | None
    reason: str
    ranked: tuple[tuple[ServedAdapter, float], ...] = ()


class RoutingError(ValueError):
    """A request the router refuses; ``code`` is stable and machine-readable.

    Codes: ``model_not_found`` (no such model, or one the caller may not see: the two read
    the same so that private adapters are never revealed), ``adapter_filtered_out`` (the
    named adapter exists for the caller but the request's policy excludes it),
    ``invalid_router``, ``invalid_threshold``, ``arrow_unavailable`` (the arrow router
    was asked for in a process that cannot compute arrow scores) and ``arrow_failed`` (the
    arrow scores did not come back as one finite number per candidate).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
