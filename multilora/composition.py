"""How one request's answer is composed from the loaded adapters: which adapters, with which
weights, and how they are applied.

A composition is a plain, immutable value: the router builds it, the generation request
carries it, the engine binds it, and the result hands it back, so every layer agrees on who
answered. The methods, all exact and all inside the engine's one forward per step:

- ``top1``: at most one adapter (none: the base model alone). A merged adapter is served
  this way too: it is one more adapter in the registry.
- ``topk``: several adapters, their deltas summed with the given weights:
  ``y = base(x) + Σ wᵢ Bᵢ Aᵢ x``. That is one LoRA of rank Σrᵢ whose A stacks the adapters'
  As along the rank axis and whose B stacks the wᵢ-scaled Bs, so a step still costs one
  shrink and one expand per module.
- ``arrow``: per token and per module, the ``k`` adapters whose Arrow prototype is most
  aligned with the token's input (|⟨x, prototype⟩|) are mixed with a softmax (at
  ``temperature``) of those alignments, as PEFT's Arrow does. ``adapters`` lists the
  candidates; ``weights`` is unused.
- ``logit``: one row per adapter, each row a plain ``top1`` of its adapter; at every step
  their next-token log-probabilities are combined with the weights and the one token chosen
  is fed to every row.

    Composition.single("v12")                       # one adapter
    Composition.topk(("v12", "v7"), (0.7, 0.3))      # a weighted sum of two
    Composition.arrow(("v12", "v7", "v3"), k=2, temperature=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("top1", "topk", "arrow", "logit")


class CompositionError(ValueError):
    """A composition that does not describe a valid way to answer."""


@dataclass(frozen=True)
class Composition:
    method: str = "top1"
    adapters: tuple[str, ...] = ()  # registry keys, in the router's order (best first)
    weights: tuple[float, ...] = ()  # one per adapter for top1, topk and logit; sum 1
    k: int | None = None  # arrow: adapters mixed per token (None: all of them)
    temperature: float = 1.0  # arrow: the softmax temperature of the per-token alignments

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CompositionError(
                f"Unknown composition method {self.method!r}; use one of {', '.join(METHODS)}."
            )
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if any(not isinstance(key, str) or not key for key in self.adapters):
            raise CompositionError("Adapter keys must be non-empty strings.")
        if len(set(self.adapters)) != len(self.adapters):
            raise CompositionError("An adapter may appear only once in a composition.")
        if self.method == "top1" and len(self.adapters) > 1:
            raise CompositionError("top1 takes at most one adapter.")
        if self.method != "top1" and not self.adapters:
            raise CompositionError(f"{self.method} needs at least one adapter.")
        if self.method == "arrow":
            if self.weights:
                raise CompositionError("arrow weighs its adapters per token; give no weights.")
            if self.k is not None and not 1 <= self.k <= len(self.adapters):
                raise CompositionError("arrow's k must be between 1 and the number of adapters.")
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise CompositionError("arrow's temperature must be a positive number.")
            return
        if self.k is not None:
            raise CompositionError(f"k applies to arrow only, not to {self.method}.")
        if not self.adapters:  # the base model alone
            if self.weights:
                raise CompositionError("The base model alone takes no weights.")
            return
        if not self.weights:  # equal weights by default
            count = len(self.adapters)
            object.__setattr__(self, "weights", tuple(1.0 / count for _ in range(count)))
        if len(self.weights) != len(self.adapters):
            raise CompositionError("Give one weight per adapter.")
        if any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise CompositionError("Weights must be finite and not negative.")
        if not math.isclose(sum(self.weights), 1.0, rel_tol=0, abs_tol=1e-6):
            raise CompositionError("Weights must sum to 1.")

    # --- Constructors ---------------------------------------------------------------------

    @classmethod
    def base(cls) -> Composition:
        return cls()

    @classmethod
    def single(cls, key: str | None) -> Composition:
        """One adapter, or the base model alone when ``key`` is None."""
        return cls() if key is None else cls(adapters=(key,), weights=(1.0,))

    @classmethod
    def topk(cls, keys: Sequence[str], weights: Sequence[float] | None = None) -> Composition:
        return cls(method="topk", adapters=tuple(keys), weights=tuple(weights or ()))

    @classmethod
    def arrow(
        cls, keys: Sequence[str], *, k: int | None = None, temperature: float = 1.0
    ) -> Composition:
        return cls(method="arrow", adapters=tuple(keys), k=k, temperature=temperature)

    @classmethod
    def logit(cls, keys: Sequence[str], weights: Sequence[float] | None = None) -> Composition:
        return cls(method="logit", adapters=tuple(keys), weights=tuple(weights or ()))

    # --- Reading --------------------------------------------------------------------------

    @property
    def is_base(self) -> bool:
        return not self.adapters

    @property
    def adapter(self) -> str | None:
        """The one adapter of a ``top1`` composition (None: the base model)."""
        return self.adapters[0] if self.method == "top1" and self.adapters else None


BASE = Composition()
