"""Reading adapter weights: safetensors bytes to tensors, nothing else (never PEFT's
from_pretrained on a contributor's folder, never pickle)."""

from __future__ import annotations

import torch
from safetensors.torch import load


def tensors_from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors file (intake already checked its header)."""
    return load(data)
