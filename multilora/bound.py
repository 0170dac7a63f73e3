"""What a bound batch row is, and the per-module LoRA forms a batch binds (multilora.model
chooses among them).

A row of a batch is one of:

- a registry slot (``int``; 0: the base model alone): one adapter;
- a ``WeightedRow``: a weighted sum of adapters (``topk``), ``y = base(x) + Σ wᵢ Bᵢ Aᵢ x``;
- an ``ArrowRow``: Arrow's per-token mix of candidate adapters (multilora.arrow).

Every form computes ``y + expand(shrink(x))`` with one LoRA per row. A weighted or Arrow row
is bound as ONE LoRA of rank Σrᵢ: its adapters' As concatenated along the rank axis, and
their Bs (scaled by wᵢ for a weighted row) concatenated likewise; rows are padded with zeros
to the batch's largest rank. So a step is one ``bmm`` shrink and one ``baddbmm`` expand per
module whatever the mix, and for Arrow rows the per-token routing weights multiply the
shrink's output, one weight per rank segment, before the expand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightedRow:
    """Adapters (registry slots) whose deltas are summed with these weights."""

    slots: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class ArrowRow:
    """Arrow over candidate slots: per token, the ``k`` best-aligned, softmax at
    ``temperature``."""

    slots: tuple[int, ...]
    k: int
    temperature: float = 1.0


BoundRow = int | WeightedRow | ArrowRow


def row_slots(row: BoundRow) -> tuple[int, ...]:
    return (row,) if isinstance(row, int) else row.slots


def row_segments(row: BoundRow) -> list[tuple[int, float]]:
    """(slot, weight) of each rank segment of a row, in the row's candidate order."""
    if isinstance(row, int):
        return [(row, 1.0)]
    if isinstance(row, WeightedRow):
        return list(zip(row.slots, row.weights, strict=True))
    return [(slot, 1.0) for slot in row.slots]


class ArrowRouter:
    """Per token, the routing weights of a batch's Arrow rows on one module, spread over the
    rank columns. Rows that are not Arrow rows get weight exactly 1 on every column (a single
    finite score in their softmax), so they are unchanged by it.

    ``shares`` [B, K] (shared by every module of the binding) accumulates each row's weights
    at the last position of every forward: what the row's next token was made with.
    """

    __slots__ = ("P", "bias", "kmax", "kth", "row_mask", "seg", "shares", "temperature")

    def __init__(
        self,
        P: torch.Tensor,
        bias: torch.Tensor,
        seg: torch.Tensor,
        kth: torch.Tensor | None,
        kmax: int,
        temperature: torch.Tensor,
        shares: torch.Tensor,
        row_mask: torch.Tensor | None,
    ) -> None:
        self.P = P  # [B, in, K] the candidates' prototypes (zero columns for padding)
        self.bias = bias  # [B, 1, K] 0 for a candidate of the row, -inf otherwise
        self.seg = seg  # [B, 1, R] the candidate of each rank column
        self.kth = kth  # [B, 1, 1] k - 1 per row; None: every row keeps all its candidates
        self.kmax = kmax
        self.temperature = temperature  # [B, 1, 1]
        self.shares = shares  # [B, K] float32
        self.row_mask = row_mask  # [B, 1]: 0 for a row none of whose candidates is here

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, in] -> the multiplier [B, T, R] of the shrink's output."""
        batch, tokens, _ = x.shape
        scores = torch.bmm(x, self.P).abs_().add_(self.bias)  # |⟨x, p⟩|, -inf off the row
        if self.kth is not None:
            top = scores.topk(self.kmax, dim=-1).values
            threshold = top.gather(-1, self.kth.expand(batch, tokens, 1))
            scores = scores.masked_fill(scores < threshold, -math.inf)
        weights = torch.softmax(scores / self.temperature, dim=-1)
        last = weights[:, -1]
        self.shares.add_(last if self.row_mask is None else last * self.row_mask)
        return weights.gather(-1, self.seg.expand(batch, tokens, self.seg.shape[-1]))


class SharedLora:
    """Every row uses the same LoRA: 2-D weights, works for any input shape."""

    __slots__ = ("A_t", "B_t")

    def __init__(self, A_t: torch.Tensor, B_t: torch.Tensor) -> None:
        self.A_t = A_t  # [in, r]
        self.B_t = B_t  # [r, out]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.A_t.dtype:  # a half-precision base with float32 LoRA
            delta = (x.reshape(-1, x.shape[-1]).to(self.A_t.dtype) @ self.A_t) @ self.B_t
            return (y + delta.view(y.shape)).to(y.dtype)  # added in float32, as PEFT does
        shrunk = x.reshape(-1, x.shape[-1]) @ self.A_t
        return torch.addmm(y.reshape(-1, y.shape[-1]), shrunk, self.B_t).view_as(y)


class GatheredLora:
    """Rows differ; each row's (concatenated) weights were copied out of the stacks when the
    batch bound. ``router``: the batch has Arrow rows."""

    __slots__ = ("A_t", "B_t", "router")

    def __init__(
        self, A_t: torch.Tensor, B_t: torch.Tensor, router: ArrowRouter | None = None
    ) -> None:
        self.A_t = A_t  # [B, in, R]
        self.B_t = B_t  # [B, R, out]
        self.router = router

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _apply(x, y, self.A_t, self.B_t, self.router)


class LazyLora:
    """Rows are single slots and their gathered copies would be too big to keep: gather
    every call."""

    __slots__ = ("A", "B", "index")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor) -> None:
        self.A = A  # [capacity, r, in], a view trimmed to the batch's rank
        self.B = B  # [capacity, out, r]
        self.index = index  # [B] slots

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # bmm reads the transposed views directly (BLAS transpose flags), no extra copy.
        A = self.A.index_select(0, self.index).transpose(1, 2)
        B = self.B.index_select(0, self.index).transpose(1, 2)
        return _apply(x, y, A, B, None)


class LazyConcatLora:
    """Weighted or Arrow rows whose concatenated copies would be too big to keep: the rank
    columns are gathered from the stacks every call (slot and rank position per column)."""

    __slots__ = ("A", "B", "rank_index", "router", "scale", "slot_index")

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        slot_index: torch.Tensor,
        rank_index: torch.Tensor,
        scale: torch.Tensor,
        router: ArrowRouter | None,
    ) -> None:
        self.A = A  # [capacity, r_max, in] (the stack's own tensors)
        self.B = B  # [capacity, out, r_max]
        self.slot_index = slot_index  # [B, R]
        self.rank_index = rank_index  # [B, R]
        self.scale = scale  # [B, R, 1]: the weight of each column
        self.router = router

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A = self.A[self.slot_index, self.rank_index].transpose(1, 2)  # [B, in, R]
        B = self.B[self.slot_index, :, self.rank_index] * self.scale  # [B, R, out]
        return _apply(x, y, A, B, self.router)


def _apply(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router: ArrowRouter | None,
) -> torch.Tensor:
    """y + ((x @ A) [* routing weights]) @ B, batched; out-of-place, so nothing aliases y."""
    cast = x.dtype != A.dtype  # a half-precision base with float32 LoRA
    if cast:
        x = x.to(A.dtype)
    shrunk = torch.bmm(x, A)
    if router is not None:
        shrunk = shrunk * router(x)
    if cast:
        return (y + torch.bmm(shrunk, B)).to(y.dtype)  # added in float32, as PEFT does
    return torch.baddbmm(y, shrunk, B)


Bound = SharedLora | GatheredLora | LazyLora | LazyConcatLora
