"""What LoRA may target in a base model: every nn.Linear inside the decoder layers.

The architecture is read from the model's config alone, by building the model on the
``meta`` device (no weights, no memory), so intake never has to load the base model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


def architecture_from_config(config: PretrainedConfig) -> dict[str, Any]:
    """Return ``{"model_type", "num_hidden_layers", "hidden_size", "vocab_size",
    "linear_modules": {path: [in_features, out_features]}}`` for a causal LM config.

    The output head (lm_head) is left out: in tied-embedding models such as SmolLM2 a LoRA on
    it would change the input embeddings too, and it is not a target PEFT recommends.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear_modules = {
        name: [module.in_features, module.out_features]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }
    return {
        "model_type": config.model_type,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "linear_modules": linear_modules,
    }


def target_module_names(architecture: dict[str, Any]) -> set[str]:
    """The short names (q_proj, up_proj, …) a LoRA config may list in target_modules."""
    return {path.rsplit(".", 1)[-1] for path in architecture["linear_modules"]}
