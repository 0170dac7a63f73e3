"""The base model's linear layers, wrapped so that one forward applies a different LoRA to
each row of the batch: ``y = base(x) + (x @ A[row]ᵀ) @ B[row]ᵀ``.

How a batch runs: the engine enters ``multi_lora.adapters(rows)`` with one bound row per
batch row: a registry slot (an int, as the evaluation child passes them), a ``WeightedRow``
(topk) or an ``ArrowRow`` (multilora.bound); ``compositions([...])`` does the same from
``Composition`` values by registry key, for callers that run ``model.generate`` themselves.
That *binds* each wrapped module once for the whole generation, choosing the cheapest exact
form for that batch and module:

- nobody in the batch targets the module (or every row is slot 0): no LoRA work at all;
- every row is the same adapter, or the same weighted sum: two plain matmuls on 2-D weights
  (a weighted sum's As and scaled Bs concatenated along the rank), no gather;
- rows are plain slots that differ: the rows' weights are gathered from the stacks once,
  trimmed to the largest rank among them and laid out as ``A_t [B, in, r]`` /
  ``B_t [B, r, out]`` so that each decoding step is exactly one ``bmm`` (shrink) and one
  ``baddbmm`` (expand and add) per module, whatever the number of distinct adapters, with no
  Python loop over adapters;
- some rows are weighted sums or Arrow rows: every row becomes ONE LoRA of rank Σrᵢ (its
  adapters' As concatenated along the rank axis, the Bs scaled by wᵢ and concatenated),
  padded with zeros to the batch's largest Σr, so a step is still one ``bmm`` + one
  ``baddbmm`` per module; with Arrow rows in the batch, an ``ArrowRouter`` computes each
  token's routing weights from the rows' prototypes and multiplies the shrink's output by
  them, one weight per rank segment (other rows get exactly 1);
- when those gathered copies would exceed ``max_bound_bytes`` (large batch × rank), the
  module keeps the stacks and gathers per call instead: more work per step, bounded memory.

Gathering once per batch instead of per step matters on CPU: for SmolLM2's q_proj at batch
16 the two ``index_select`` copies cost more than the two matmuls themselves.

The LoRA weights may be kept in float32 under a bfloat16/float16 base (the registry's dtype,
float32 on CPU by default): the input is cast up, the delta computed and added in float32 and
the sum cast back. That is what PEFT does too (it keeps adapter weights in float32), and on CPU
it is also faster: measured on this machine's AVX-512 cores (1 thread, batch 16, q_proj of
SmolLM2), a bfloat16 bmm + baddbmm costs 76 µs against 29 µs for the float32 path casts
included, while the bfloat16 base linear itself costs 86 µs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from multilora.bound import (
    ArrowRouter,
    ArrowRow,
    Bound,
    BoundRow,
    GatheredLora,
    LazyConcatLora,
    LazyLora,
    SharedLora,
    WeightedRow,
    row_segments,
    row_slots,
)
from multilora.composition import Composition, CompositionError
from multilora.lora import NO_ADAPTER, LoraRegistry, ModuleStack

# The forms under their former names, which tests and tools import.
_SharedLora, _GatheredLora, _LazyLora = SharedLora, GatheredLora, LazyLora

DEFAULT_MAX_BOUND_BYTES = 512 * 1024 * 1024


class LoraLinear(nn.Module):
    """An nn.Linear plus whatever LoRA the current batch bound to it (None: base only)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora: Bound | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.lora
        if lora is None:  # base-only batch, or no row's adapter targets this module
            return y
        return lora(x, y)


@dataclass
class Binding:
    """The rows a batch runs with; ``select_rows`` follows the batch as rows leave and
    ``joining`` as rows join (each row's adapters are pinned while it is bound).

    ``shares`` [rows, candidates] (float32, on the model's device; None without Arrow rows):
    each Arrow row's routing weights summed over the adapted modules and the forwards so far,
    in the row's candidate order (normalise a row by its sum for its shares).
    """

    owner: MultiLoraModel
    rows: list[BoundRow]
    shares: torch.Tensor | None = None

    @property
    def slots(self) -> list[BoundRow]:
        return self.rows

    @property
    def pinned(self) -> list[int]:
        return [slot for row in self.rows for slot in row_slots(row)]

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the current batch), in this order; the rows
        left out are unpinned."""
        kept = set(rows)
        dropped = [
            slot for i, row in enumerate(self.rows) if i not in kept for slot in row_slots(row)
        ]
        self.rows = [self.rows[row] for row in rows]
        if self.shares is not None:
            index = torch.tensor(list(rows), device=self.shares.device, dtype=torch.long)
            self.shares = self.shares.index_select(0, index)
            if not any(isinstance(row, ArrowRow) for row in self.rows):
                self.shares = None  # the other rows need no routing
        self.owner._bind(self.rows, self.shares)
        self.owner.registry.unpin(dropped)

    @contextlib.contextmanager
    def joining(self, rows: Sequence[BoundRow]) -> Iterator[None]:
        """Add rows at the end of the batch: inside, the modules are bound to the newcomers
        alone (for their prefill, whose Arrow routing weights start their shares); on leaving,
        to every row. If the block raises, the newcomers are not added."""
        new = _rows_of(rows)
        slots = [slot for row in new for slot in row_slots(row)]
        new_shares = _shares_for(new, self.owner.registry.device)
        registry = self.owner.registry
        with registry.lock:
            registry.pin(slots)
            try:
                self.owner._bind(new, new_shares)
            except BaseException:
                registry.unpin(slots)
                self.owner._bind(self.rows, self.shares)
                raise
        try:
            yield
        except BaseException:
            self.owner._bind(self.rows, self.shares)
            registry.unpin(slots)
            raise
        self.shares = _joined_shares(self.shares, len(self.rows), new_shares, len(new))
        self.rows = self.rows + new
        self.owner._bind(self.rows, self.shares)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The base model alone inside (no LoRA bound), the batch's binding again after."""
        self.owner._unbind()
        try:
            yield
        finally:
            self.owner._bind(self.rows, self.shares)


def _rows_of(rows: Sequence[BoundRow] | torch.Tensor) -> list[BoundRow]:
    if torch.is_tensor(rows):
        rows = rows.tolist()
    return [row if isinstance(row, WeightedRow | ArrowRow) else int(row) for row in rows]


def _shares_for(rows: list[BoundRow], device: torch.device) -> torch.Tensor | None:
    if not any(isinstance(row, ArrowRow) for row in rows):
        return None
    width = max(len(row.slots) if isinstance(row, ArrowRow) else 1 for row in rows)
    return torch.zeros(len(rows), width, device=device)


def _joined_shares(
    old: torch.Tensor | None, old_rows: int, new: torch.Tensor | None, new_rows: int
) -> torch.Tensor | None:
    """The shares of a batch and its newcomers stacked (zeros for rows without Arrow)."""
    if old is None and new is None:
        return None
    like = old if old is not None else new
    assert like is not None
    width = max(part.shape[1] for part in (old, new) if part is not None)
    parts = []
    for part, count in ((old, old_rows), (new, new_rows)):
        padded = like.new_zeros(count, width)
        if part is not None:
            padded[:, : part.shape[1]] = part
        parts.append(padded)
    return torch.cat(parts)


class MultiLoraModel:
    """Wraps every linear module the registry knows (in place) and binds batches to them."""

    def __init__(
        self,
        model: nn.Module,
        registry: LoraRegistry,
        *,
        max_bound_bytes: int = DEFAULT_MAX_BOUND_BYTES,
    ) -> None:
        self.model = model
        self.registry = registry
        self.max_bound_bytes = max_bound_bytes
        self.modules: dict[str, LoraLinear] = {}
        for path in registry.module_shapes:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            linear = getattr(parent, name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{path} is a {type(linear).__name__}, not an nn.Linear.")
            wrapped = LoraLinear(linear)
            setattr(parent, name, wrapped)
            self.modules[path] = wrapped

    def detach(self) -> None:
        """Put the original nn.Linear modules back."""
        for path, wrapped in self.modules.items():
            parent_path, _, name = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), name, wrapped.base)
        self.modules = {}

    def bound_row(self, composition: Composition) -> BoundRow:
        """The row that runs ``composition`` (registry keys to slots). KeyError for a key not
        loaded; CompositionError for ``logit``, which is several rows whose next-token
        distributions are combined: only the engine's own loop does that."""
        slots = tuple(self.registry.slot_of(key) for key in composition.adapters)
        if composition.method == "logit":
            raise CompositionError("logit is several rows combined per step; use the Engine.")
        if composition.method == "arrow":
            k = composition.k if composition.k is not None else len(slots)
            return ArrowRow(slots=slots, k=k, temperature=composition.temperature)
        if composition.method == "topk" and len(slots) > 1:
            return WeightedRow(slots=slots, weights=composition.weights)
        return slots[0] if slots else NO_ADAPTER

    @contextlib.contextmanager
    def compositions(self, compositions: Sequence[Composition]) -> Iterator[Binding]:
        """``adapters`` for one composition per row, by registry key (top1, topk or arrow),
        for callers that run the model's forwards themselves (e.g. ``model.generate``)."""
        with self.adapters([self.bound_row(c) for c in compositions]) as binding:
            yield binding

    @contextlib.contextmanager
    def adapters(self, rows: Sequence[BoundRow] | torch.Tensor) -> Iterator[Binding]:
        """Run the model's forwards inside with row ``i`` bound to ``rows[i]``: a registry
        slot (0: the base alone), a ``WeightedRow`` or an ``ArrowRow`` (multilora.bound).
        Not reentrant: one batch at a time per model."""
        row_list = _rows_of(rows)
        pinned = [slot for row in row_list for slot in row_slots(row)]
        shares = _shares_for(row_list, self.registry.device)
        with self.registry.lock:
            self.registry.pin(pinned)
            try:
                self._bind(row_list, shares)
            except BaseException:
                self.registry.unpin(pinned)
                raise
        binding = Binding(owner=self, rows=row_list, shares=shares)
        try:
            yield binding
        finally:
            self._unbind()
            self.registry.unpin(binding.pinned)

    def _unbind(self) -> None:
        for module in self.modules.values():
            module.lora = None

    def _bind(self, rows: list[BoundRow], shares: torch.Tensor | None = None) -> None:
        """Choose and build each module's LoRA form for these rows (see the module docstring).

        The caller holds the batch's pins, so the slots' weights cannot change underneath.
        """
        self._unbind()
        used = {slot for row in rows for slot in row_slots(row)} - {NO_ADAPTER}
        if not used:
            return
        with self.registry.lock:
            plan: list[tuple[str, ModuleStack, int]] = []
            for path, stack in self.registry.stacks.items():
                rank = max(stack.rank_of[slot] for slot in used)
                if rank:  # otherwise no row's adapter targets this module: skip it entirely
                    plan.append((path, stack, rank))
            if all(row == rows[0] for row in rows) and not isinstance(rows[0], ArrowRow):
                self._bind_shared(rows[0], plan)
            elif all(isinstance(row, int) for row in rows):
                self._bind_slots(rows, plan)  # type: ignore[arg-type]
            else:
                _ConcatBinder(self, rows, shares).bind(plan)

    def _bind_shared(self, row: BoundRow, plan: list[tuple[str, ModuleStack, int]]) -> None:
        segments = row_segments(row)
        for path, stack, _ in plan:
            a_parts, b_parts = [], []
            for slot, weight in segments:
                rank = stack.rank_of[slot]
                if rank:
                    a_parts.append(stack.A[slot, :rank])
                    b = stack.B[slot, :, :rank]
                    b_parts.append(b if weight == 1.0 else b * weight)
            self.modules[path].lora = SharedLora(
                torch.cat(a_parts).t().contiguous(), torch.cat(b_parts, dim=1).t().contiguous()
            )

    def _bind_slots(self, slots: list[int], plan: list[tuple[str, ModuleStack, int]]) -> None:
        index = torch.tensor(slots, device=self.registry.device)
        itemsize = torch.empty((), dtype=self.registry.dtype).element_size()
        gathered_bytes = sum(
            len(slots) * rank * (stack.in_features + stack.out_features) * itemsize
            for _, stack, rank in plan
        )
        lazy = gathered_bytes > self.max_bound_bytes
        for path, stack, rank in plan:
            A, B = stack.A[:, :rank], stack.B[:, :, :rank]
            if lazy:
                # Keeps references to this stack's tensors: a later capacity growth
                # allocates new ones and the pinned slots are unchanged in these.
                self.modules[path].lora = LazyLora(A, B, index)
            else:
                self.modules[path].lora = GatheredLora(
                    A.index_select(0, index).transpose(1, 2).contiguous(),
                    B.index_select(0, index).transpose(1, 2).contiguous(),
                )


class _ConcatBinder:
    """Binds a batch with weighted or Arrow rows: every row one LoRA of concatenated rank.

    Modules on which the used adapters have the same ranks share one column layout (its index
    tensors are built once), so binding costs a few small tensors per distinct rank pattern
    plus the gathers per module.
    """

    def __init__(self, owner: MultiLoraModel, rows: list[BoundRow], shares: torch.Tensor | None):
        self.owner = owner
        self.rows = rows
        self.shares = shares
        self.device = owner.registry.device
        self.dtype = owner.registry.dtype
        self.used = sorted({slot for row in rows for slot in row_slots(row)} - {NO_ADAPTER})
        self.layouts: dict[tuple[int, ...], dict[str, object]] = {}

    def bind(self, plan: list[tuple[str, ModuleStack, int]]) -> None:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        layouts = [self._layout(stack) for _, stack, _ in plan]
        gathered_bytes = sum(
            len(self.rows) * layout["width"] * (stack.in_features + stack.out_features) * itemsize
            for (_, stack, _), layout in zip(plan, layouts, strict=True)
        )
        lazy = gathered_bytes > self.owner.max_bound_bytes
        for (path, stack, _), layout in zip(plan, layouts, strict=True):
            slot_index, rank_index, scale = layout["slot"], layout["rank"], layout["scale"]
            router = self._router(path, layout) if self.shares is not None else None
            if lazy:
                lora: Bound = LazyConcatLora(
                    stack.A, stack.B, slot_index, rank_index, scale.unsqueeze(-1), router
                )
            else:
                A_t = stack.A[slot_index, rank_index].transpose(1, 2).contiguous()
                B_t = stack.B[slot_index, :, rank_index] * scale.unsqueeze(-1)
                lora = GatheredLora(A_t, B_t, router)
            self.owner.modules[path].lora = lora

    def _layout(self, stack: ModuleStack) -> dict[str, object]:
        ranks = tuple(stack.rank_of[slot] for slot in self.used)
        layout = self.layouts.get(ranks)
        if layout is not None:
            return layout
        columns = []  # per row: (slot, rank position, weight, candidate) of each rank column
        for row in self.rows:
            row_columns = []
            arrow = isinstance(row, ArrowRow)  # other rows' routing weight is 1 at candidate 0
            for candidate, (slot, weight) in enumerate(row_segments(row)):
                for position in range(stack.rank_of[slot]):
                    row_columns.append((slot, position, weight, candidate if arrow else 0))
            columns.append(row_columns)
        width = max(len(row_columns) for row_columns in columns)
        pad = (NO_ADAPTER, 0, 0.0, 0)  # slot 0 is all zeros
        table = [row_columns + [pad] * (width - len(row_columns)) for row_columns in columns]
        layout = {
            "width": width,
            "slot": torch.tensor([[c[0] for c in r] for r in table], device=self.device),
            "rank": torch.tensor([[c[1] for c in r] for r in table], device=self.device),
            "scale": torch.tensor(
                [[c[2] for c in r] for r in table], device=self.device, dtype=self.dtype
            ),
            "seg": torch.tensor([[c[3] for c in r] for r in table], device=self.device),
        }
        if self.shares is not None:
            layout.update(self._routing(stack))
        self.layouts[ranks] = layout
        return layout

    def _routing(self, stack: ModuleStack) -> dict[str, object]:
        """The rank-pattern part of an ArrowRouter: which candidates count, k, temperature."""
        assert self.shares is not None
        width = self.shares.shape[1]
        bias, kth, temperature, mask, candidates = [], [], [], [], []
        for row in self.rows:
            row_bias = [-math.inf] * width
            if isinstance(row, ArrowRow):
                present = [j for j, slot in enumerate(row.slots) if stack.rank_of[slot]]
                for j in present or [0]:  # none here: one finite score, all-zero weights
                    row_bias[j] = 0.0
                kth.append(row.k - 1)
                temperature.append(row.temperature)
                mask.append(1.0 if present else 0.0)
                candidates.append(list(row.slots) + [NO_ADAPTER] * (width - len(row.slots)))
            else:
                row_bias[0] = 0.0  # one candidate: its weight is exactly 1
                kth.append(0)
                temperature.append(1.0)
                mask.append(1.0)
                candidates.append([NO_ADAPTER] * width)
            bias.append(row_bias)
        needs_top_k = any(isinstance(row, ArrowRow) and row.k < len(row.slots) for row in self.rows)
        device, dtype = self.device, self.dtype
        return {
            "bias": torch.tensor(bias, device=device, dtype=dtype).unsqueeze(1),
            "kth": torch.tensor(kth, device=device).view(-1, 1, 1) if needs_top_k else None,
            "kmax": max(kth) + 1,
            "temperature": torch.tensor(temperature, device=device, dtype=dtype).view(-1, 1, 1),
            "mask": None if all(mask) else torch.tensor(mask, device=device).unsqueeze(1),
            "candidates": candidates,
        }

    def _router(self, path: str, layout: dict[str, object]) -> ArrowRouter:
        assert self.shares is not None
        candidates: list[list[int]] = layout["candidates"]  # type: ignore[assignment]
        distinct = sorted({slot for row in candidates for slot in row})
        table = self.owner.registry.prototypes(path, distinct)  # [n, in]
        where = {slot: i for i, slot in enumerate(distinct)}
        index = torch.tensor([[where[s] for s in row] for row in candidates], device=self.device)
        P = table[index].transpose(1, 2).contiguous()  # [B, in, K]
        return ArrowRouter(
            P=P,
            bias=layout["bias"],  # type: ignore[arg-type]
            seg=layout["seg"].unsqueeze(1),  # type: ignore[union-attr]
            kth=layout["kth"],  # type: ignore[arg-type]
            kmax=layout["kmax"],  # type: ignore[arg-type]
            temperature=layout["temperature"],  # type: ignore[arg-type]
            shares=self.shares,
            row_mask=layout["mask"],  # type: ignore[arg-type]
        )
