"""Reading a stored adapter version into the registry: our validated config plus the
safetensors tensors, nothing else (never PEFT's from_pretrained on a contributor's folder)."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load

from routing.engine.lora import LoraRegistry


def tensors_from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors file (intake already checked its header)."""
    return load(data)


def add_adapter_version(registry: LoraRegistry, version: Any, *, key: str) -> int:
    """Load a contributions AdapterVersion (its ``adapter_config`` and ``weights_file``) under
    ``key``; return its slot."""
    with version.weights_file.open("rb") as weights:
        data = weights.read()
    return registry.add(
        key, lora_config=version.adapter_config, tensors=tensors_from_safetensors(data)
    )
