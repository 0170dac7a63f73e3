"""The multi-LoRA engine: one base model, every loaded LoRA adapter stacked per module, and
batched generation where each row of a batch may use a different adapter in one forward.

Pure PyTorch (with transformers models and safetensors files): no Django, no app of the
project. evaluation scores with it in the sandboxed child and routing serves with it, so
what was measured is what is served.

    engine = Engine(model, tokenizer)
    engine.add_adapter("math-v3", lora_config=version.adapter_config, tensors=tensors)
    engine.generate([GenerationRequest(messages=[...], adapter="math-v3"), ...])
"""

from multilora.generate import (
    Engine,
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
)
from multilora.loading import tensors_from_safetensors
from multilora.lora import NO_ADAPTER, AdapterLoadError, LoraRegistry, parse_adapter
from multilora.model import LoraLinear, MultiLoraModel

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
    "parse_adapter",
    "tensors_from_safetensors",
]
