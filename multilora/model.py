"""The base model's linear layers, wrapped so that one forward applies a different LoRA to
each row of the batch: ``y = base(x) + (x @ A[row]ᵀ) @ B[row]ᵀ``.

How a batch runs: the engine enters ``multi_lora.adapters(slots)`` with one registry slot
per row. That *binds* each wrapped module once for the whole generation, choosing the
cheapest exact form for that batch and module:

- nobody in the batch targets the module (or every row is slot 0): no LoRA work at all;
- every row shares one adapter: two plain matmuls on the 2-D weights, no gather;
- rows differ: the rows' weights are gathered from the stacks once, trimmed to the largest
  rank among them and laid out as ``A_t [B, in, r]`` / ``B_t [B, r, out]`` so that each
  decoding step is exactly one ``bmm`` (shrink) and one ``baddbmm`` (expand and add) per
  module, whatever the number of distinct adapters, with no Python loop over adapters;
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from multilora.lora import NO_ADAPTER, LoraRegistry, ModuleStack

DEFAULT_MAX_BOUND_BYTES = 512 * 1024 * 1024


class _SharedLora:
    """Every row uses the same adapter: 2-D weights, works for any input shape."""

    __slots__ = ("A_t", "B_t")

    def __init__(self, A_t: torch.Tensor, B_t: torch.Tensor) -> None:
        self.A_t = A_t  # [in, r]
        self.B_t = B_t  # [r, out]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.A_t.dtype:  # a half-precision base with float32 LoRA (see below)
            delta = (x.reshape(-1, x.shape[-1]).to(self.A_t.dtype) @ self.A_t) @ self.B_t
            return (y + delta.view(y.shape)).to(y.dtype)  # added in float32, as PEFT does
        shrunk = x.reshape(-1, x.shape[-1]) @ self.A_t
        return torch.addmm(y.reshape(-1, y.shape[-1]), shrunk, self.B_t).view_as(y)


class _GatheredLora:
    """Rows differ; each row's weights were copied out of the stacks when the batch bound."""

    __slots__ = ("A_t", "B_t")

    def __init__(self, A_t: torch.Tensor, B_t: torch.Tensor) -> None:
        self.A_t = A_t  # [B, in, r]
        self.B_t = B_t  # [B, r, out]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x [B, T, in] -> [B, T, r] -> y + [B, T, out]; out-of-place, so nothing aliases y.
        if x.dtype != self.A_t.dtype:  # a half-precision base with float32 LoRA (see below)
            delta = torch.bmm(torch.bmm(x.to(self.A_t.dtype), self.A_t), self.B_t)
            return (y + delta).to(y.dtype)  # added in float32, as PEFT does
        return torch.baddbmm(y, torch.bmm(x, self.A_t), self.B_t)


class _LazyLora:
    """Rows differ and their gathered copies would be too big to keep: gather every call."""

    __slots__ = ("A", "B", "index")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor) -> None:
        self.A = A  # [capacity, r, in], a view trimmed to the batch's rank
        self.B = B  # [capacity, out, r]
        self.index = index  # [B] slots

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A = self.A.index_select(0, self.index).transpose(1, 2)
        B = self.B.index_select(0, self.index).transpose(1, 2)
        # bmm reads the transposed views directly (BLAS transpose flags), no extra copy.
        if x.dtype != A.dtype:  # a half-precision base with float32 LoRA (see below)
            return (y + torch.bmm(torch.bmm(x.to(A.dtype), A), B)).to(y.dtype)
        return torch.baddbmm(y, torch.bmm(x, A), B)


_Bound = _SharedLora | _GatheredLora | _LazyLora


class LoraLinear(nn.Module):
    """An nn.Linear plus whatever LoRA the current batch bound to it (None: base only)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora: _Bound | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.lora
        if lora is None:  # base-only batch, or no row's adapter targets this module
            return y
        return lora(x, y)


@dataclass
class Binding:
    """The per-row slots a batch runs with; ``select_rows`` follows the batch as rows leave."""

    owner: MultiLoraModel
    slots: list[int]
    pinned: list[int]

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the current batch), in this order."""
        self.slots = [self.slots[row] for row in rows]
        self.owner._bind(self.slots)


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

    @contextlib.contextmanager
    def adapters(self, slots: Sequence[int] | torch.Tensor) -> Iterator[Binding]:
        """Run the model's forwards inside with row ``i`` using registry slot ``slots[i]``
        (0: the base alone). Not reentrant: one batch at a time per model."""
        slot_list = [int(s) for s in (slots.tolist() if torch.is_tensor(slots) else slots)]
        with self.registry.lock:
            self.registry.pin(slot_list)
            try:
                self._bind(slot_list)
            except BaseException:
                self.registry.unpin(slot_list)
                raise
        try:
            yield Binding(owner=self, slots=slot_list, pinned=slot_list)
        finally:
            self._unbind()
            self.registry.unpin(slot_list)

    def _unbind(self) -> None:
        for module in self.modules.values():
            module.lora = None

    def _bind(self, slots: list[int]) -> None:
        """Choose and build each module's LoRA form for these rows (see the module docstring).

        The caller holds the batch's pins, so the slots' weights cannot change underneath.
        """
        self._unbind()
        adapters = set(slots) - {NO_ADAPTER}
        if not adapters:
            return
        with self.registry.lock:
            stacks = dict(self.registry.stacks)
            device = self.registry.device
            plan: list[tuple[str, ModuleStack, int]] = []
            for path, stack in stacks.items():
                rank = max(stack.rank_of[slot] for slot in slots)
                if rank:  # otherwise no row's adapter targets this module: skip it entirely
                    plan.append((path, stack, rank))
            if len(adapters) == 1 and NO_ADAPTER not in slots:
                (slot,) = adapters
                for path, stack, rank in plan:
                    self.modules[path].lora = _SharedLora(
                        stack.A[slot, :rank].t().contiguous(),
                        stack.B[slot, :, :rank].t().contiguous(),
                    )
                return
            index = torch.tensor(slots, device=device)
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
                    self.modules[path].lora = _LazyLora(A, B, index)
                else:
                    self.modules[path].lora = _GatheredLora(
                        A.index_select(0, index).transpose(1, 2).contiguous(),
                        B.index_select(0, index).transpose(1, 2).contiguous(),
                    )
