"""Every loaded LoRA adapter, stacked per target module so that one batched matmul applies a
different adapter to each row of a batch.

Layout (per target module path, e.g. ``model.layers.3.self_attn.q_proj``)::

    A_stack [capacity, R_max, in_features]    lora_A of every slot, rank-padded with zeros
    B_stack [capacity, out_features, R_max]   lora_B * (lora_alpha / r), rank-padded with zeros

This is PEFT's own weight layout with a slot dimension in front, so loading is a copy. Slot 0
is "no adapter" and stays zero forever. Zero padding is exact: the padded rank columns of A
meet padded rank rows of B, so they add nothing, and a module an adapter does not target is
all zeros in that adapter's slot. R_max is per module (an adapter of rank 64 on q_proj does
not make every down_proj stack 64 wide), and only modules some adapter targets get a stack.

The scaling is folded into B once at load time, so the hot path is two matmuls and no
multiply. Capacity grows by doubling (every module's stack reallocated together, because slot
numbers are shared across modules), so adding N adapters costs O(N) copies in total.

Adapters are built from our validated config fields and the safetensors tensors only: no
PEFT ``from_pretrained`` on a contributor's folder ever runs here (an uploaded
adapter_config.json can make PEFT import modules or fetch files). The checks below repeat
intake's on purpose: a registry that trusted its caller would turn a wrong tensor into a
silent shape broadcast in the middle of a forward pass.

Slots in use by a running batch are *pinned*: removing such an adapter unmaps its key at once
(no new request can name it) but zeroes and frees the slot only when the last batch using it
unpins it, so a running row never sees its weights change or another adapter move in.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multilora.arrow import top_right_singular_vector

# What PEFT's save_pretrained puts before each module path, and after it.
_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
# Config switches whose arithmetic is not plain LoRA; our normalised config never sets them,
# but a caller handing a raw dict must not get silently wrong results.
_UNSUPPORTED_FLAGS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias")

NO_ADAPTER = 0  # the slot of rows that run the base model alone


class AdapterLoadError(ValueError):
    """The config or tensors do not describe a plain LoRA for this base model."""


@dataclass(frozen=True)
class ParsedAdapter:
    """One adapter, checked and scaled: {module path: (A [r, in], B_scaled [out, r])}."""

    rank: int
    scaling: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


class ModuleStack:
    """The stacked weights of one target module across every slot."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        capacity: int,
        rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.A = torch.zeros(capacity, rank, in_features, device=device, dtype=dtype)
        self.B = torch.zeros(capacity, out_features, rank, device=device, dtype=dtype)
        # rank_of[slot]: the adapter's true rank on this module, 0 when it does not target it.
        # Read at bind time to trim the batch's rank and to skip modules nobody in it targets.
        self.rank_of = [0] * capacity

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    def resize(self, *, capacity: int | None = None, rank: int | None = None) -> None:
        """Reallocate to a larger capacity and/or rank, keeping every slot's weights."""
        capacity = capacity or self.capacity
        rank = max(rank or 0, self.rank)
        if (capacity, rank) == (self.capacity, self.rank):
            return
        old_a, old_b = self.A, self.B
        self.A = old_a.new_zeros(capacity, rank, self.in_features)
        self.B = old_b.new_zeros(capacity, self.out_features, rank)
        self.A[: old_a.shape[0], : old_a.shape[1]] = old_a
        self.B[: old_b.shape[0], :, : old_b.shape[2]] = old_b
        self.rank_of.extend([0] * (capacity - len(self.rank_of)))

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        self.resize(rank=rank)
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :rank] = a
        self.B[slot, :, :rank] = b
        self.rank_of[slot] = rank

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.rank_of[slot] = 0


class LoraRegistry:
    """Adapters by key, each in a slot of every target module's stack.

    Thread-safe: mutations and pinning take one lock. The engine serialises batches, and a
    batch copies what it needs (or pins what it reads lazily) while holding it.
    """

    def __init__(
        self,
        module_shapes: Mapping[str, tuple[int, int]],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = 8,
    ) -> None:
        if initial_capacity < 2:
            raise ValueError("initial_capacity must be at least 2 (slot 0 is reserved).")
        self.module_shapes = {path: (int(i), int(o)) for path, (i, o) in module_shapes.items()}
        self.device = torch.device(device)
        self.dtype = dtype
        self.stacks: dict[str, ModuleStack] = {}
        self._capacity = initial_capacity
        self._slots: dict[str, int] = {}
        self._free: list[int] = list(range(1, initial_capacity))  # a min-heap: reuse low slots
        self._pins: Counter[int] = Counter()
        self._retired: set[int] = set()  # removed while pinned: freed on the last unpin
        self._lock = threading.RLock()
        # Bumped on every change, so a caller can tell whether what it copied is current.
        self.version = 0
        # Arrow prototypes by (slot, module path), computed on first use, dropped on release.
        self._prototypes: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> LoraRegistry:
        """A registry for every nn.Linear of ``model`` except the output head (the modules
        contributions.architecture lists), on the model's device.

        The weights' dtype defaults to the model's, except under a half-precision base on
        the CPU: float32 there, as PEFT keeps them, because CPU half-precision batched
        matmuls of LoRA's tiny shapes are several times slower than float32 ones (see
        multilora.model).
        """
        parameter = next(model.parameters())
        kwargs.setdefault("device", parameter.device)
        dtype = parameter.dtype
        if parameter.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        kwargs.setdefault("dtype", dtype)
        return cls(linear_module_shapes(model), **kwargs)

    # --- Reading ----------------------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def slot_of(self, key: str) -> int:
        """The slot of a loaded adapter; KeyError when no adapter has that key."""
        with self._lock:
            try:
                return self._slots[key]
            except KeyError:
                raise KeyError(f"No adapter {key!r} is loaded.") from None

    def prototypes(self, path: str, slots: Sequence[int]) -> torch.Tensor:
        """[len(slots), in] Arrow prototypes of these slots on one module (multilora.arrow),
        in the registry's dtype; a zero row for a slot whose adapter does not target it.

        Each (slot, module) is computed once and kept until the slot is released.
        """
        with self._lock:
            stack = self.stacks[path]
            vectors = []
            for slot in slots:
                vector = self._prototypes.get((slot, path))
                if vector is None:
                    rank = stack.rank_of[slot]
                    if rank:
                        a, b = stack.A[slot, :rank], stack.B[slot, :, :rank]
                        vector = top_right_singular_vector(a, b).to(self.dtype)
                    else:
                        vector = stack.A.new_zeros(stack.in_features)
                    self._prototypes[(slot, path)] = vector
                vectors.append(vector)
            return torch.stack(vectors)

    # --- Changing ---------------------------------------------------------------------------

    def add(
        self, key: str, *, lora_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> int:
        """Load one adapter from its validated config and its safetensors tensors; return its
        slot. A key already loaded is refused: remove it first to replace it."""
        parsed = parse_adapter(lora_config, tensors, self.module_shapes)
        with self._lock:
            if key in self._slots:
                raise AdapterLoadError(f"An adapter {key!r} is already loaded.")
            slot = self._take_slot()
            for path, (a, b) in parsed.modules.items():
                stack = self.stacks.get(path)
                if stack is None:
                    in_features, out_features = self.module_shapes[path]
                    stack = self.stacks[path] = ModuleStack(
                        in_features,
                        out_features,
                        capacity=self._capacity,
                        rank=parsed.rank,
                        device=self.device,
                        dtype=self.dtype,
                    )
                stack.write(
                    slot,
                    a.to(device=self.device, dtype=self.dtype),
                    b.to(device=self.device, dtype=self.dtype),
                )
            self._slots[key] = slot
            self.version += 1
            return slot

    def remove(self, key: str) -> None:
        """Unload an adapter: its key is gone at once; its slot is zeroed and reused as soon as
        no running batch uses it. KeyError when no adapter has that key."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                raise KeyError(f"No adapter {key!r} is loaded.")
            if self._pins[slot]:
                self._retired.add(slot)
            else:
                self._release(slot)
            self.version += 1

    def pin(self, slots: Iterable[int]) -> None:
        with self._lock:
            self._pins.update(slot for slot in slots if slot != NO_ADAPTER)

    def unpin(self, slots: Iterable[int]) -> None:
        with self._lock:
            self._pins.subtract(slot for slot in slots if slot != NO_ADAPTER)
            for slot in [slot for slot in self._retired if self._pins[slot] <= 0]:
                self._retired.discard(slot)
                self._release(slot)
            self._pins = +self._pins  # drop the zero counts

    def _take_slot(self) -> int:
        if not self._free:
            self._grow()
        return heapq.heappop(self._free)

    def _grow(self) -> None:
        # Doubling keeps the total copying over N additions at O(N) slot copies.
        old, new = self._capacity, self._capacity * 2
        for stack in self.stacks.values():
            stack.resize(capacity=new)
        self._capacity = new
        for slot in range(old, new):
            heapq.heappush(self._free, slot)

    def _release(self, slot: int) -> None:
        for stack in self.stacks.values():
            stack.clear(slot)
        for path in self.stacks:
            self._prototypes.pop((slot, path), None)
        heapq.heappush(self._free, slot)


def linear_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of every nn.Linear except the output head."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def parse_adapter(
    lora_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    module_shapes: Mapping[str, tuple[int, int]],
) -> ParsedAdapter:
    """Check an adapter against the base's modules and return its weights, B pre-scaled.

    ``lora_config`` is our normalised config (contributions.intake.config.LoraSettings
    .normalised(), stored as AdapterVersion.adapter_config); ``tensors`` are the adapter's
    safetensors tensors named ``base_model.model.<module path>.lora_{A,B}.weight``.
    """
    if lora_config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"peft_type is {lora_config.get('peft_type')!r}, not 'LORA'.")
    for flag in _UNSUPPORTED_FLAGS:
        if lora_config.get(flag):
            raise AdapterLoadError(f"{flag} is set; the engine applies plain LoRA only.")
    if lora_config.get("bias", "none") != "none":
        raise AdapterLoadError("LoRA bias terms are not supported.")
    rank = lora_config.get("r")
    alpha = lora_config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterLoadError(f"r must be a positive integer, not {rank!r}.")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterLoadError(f"lora_alpha must be a finite number, not {alpha!r}.")
    targets = _target_names(lora_config.get("target_modules"))
    scaling = float(alpha) / rank  # PEFT's plain-LoRA scaling (no rslora)

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        path, half = _split_name(name)
        if path not in module_shapes:
            raise AdapterLoadError(f"The tensor {name!r} names no linear module of the base.")
        if path.rsplit(".", 1)[-1] not in targets:
            raise AdapterLoadError(f"The tensor {name!r} is for a module the config omits.")
        halves.setdefault(path, {})[half] = tensor
    if not halves:
        raise AdapterLoadError("The adapter has no LoRA tensors.")

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"The module {path!r} needs both lora_A and lora_B.")
        in_features, out_features = module_shapes[path]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise AdapterLoadError(
                f"The module {path!r} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected ({rank}, {in_features}) and "
                f"({out_features}, {rank})."
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterLoadError(f"The module {path!r} has non-floating-point weights.")
        # Scale in float32 whatever the stored dtype, then let the registry cast once.
        modules[path] = (a.detach().float(), b.detach().float() * scaling)
    return ParsedAdapter(rank=rank, scaling=scaling, modules=modules)


def _target_names(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return set(value)
    raise AdapterLoadError(f"target_modules must be a non-empty list of names, not {value!r}.")


def _split_name(name: str) -> tuple[str, str]:
    for suffix, half in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
        if name.startswith(_PREFIX) and name.endswith(suffix):
            return name[len(_PREFIX) : -len(suffix)], half
    raise AdapterLoadError(f"The tensor {name!r} is not a PEFT lora_A or lora_B weight.")
