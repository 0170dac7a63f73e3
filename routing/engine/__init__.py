"""The inference engine: one base model, every loaded LoRA adapter stacked per module, and
batched generation where each row of a batch may use a different adapter in one forward.

    engine = Engine(model, tokenizer)
    engine.add_adapter("math-v3", lora_config=version.adapter_config, tensors=tensors)
    engine.generate([GenerationRequest(messages=[...], adapter="math-v3"), ...])
"""

from routing.engine.generate import (
    Engine,
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
)
from routing.engine.loading import add_adapter_version, tensors_from_safetensors
from routing.engine.lora import NO_ADAPTER, AdapterLoadError, LoraRegistry, parse_adapter
from routing.engine.model import LoraLinear, MultiLoraModel

__all__ = [
    "NO_ADAPTER",
    "AdapterLoadError",
    "Engine",
    "FinishReason",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "LoraLinear",
    "LoraRegistry",
    "MultiLoraModel",
    "StreamEvent",
    "add_adapter_version",
    "parse_adapter",
    "tensors_from_safetensors",
]
