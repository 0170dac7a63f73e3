"""The multi-LoRA engine: one base model, every loaded LoRA adapter stacked per module, and
batched generation where each request of a batch may use a different composition of
adapters (one adapter, a weighted sum, Arrow's per-token routing, or logit fusion), all in
one forward per decoding step.

Pure PyTorch (with transformers models and safetensors files): no Django, no app of the
project. evaluation scores with it in the sandboxed child and routing serves with it, so
what was measured is what is served.

    engine = Engine(model, tokenizer)
    engine.add_adapter("math-v3", lora_config=version.adapter_config, tensors=tensors)
    engine.add_adapter("code-v1", lora_config=..., tensors=...)
    engine.generate([
        GenerationRequest(messages=[...], composition=Composition.single("math-v3")),
        GenerationRequest(messages=[...], composition=Composition.topk(("math-v3", "code-v1"),
                                                                       (0.7, 0.3))),
        GenerationRequest(messages=[...], composition=Composition.arrow(("math-v3", "code-v1"),
                                                                        k=1)),
        GenerationRequest(messages=[...], composition=Composition.logit(("math-v3", "code-v1"))),
        GenerationRequest(messages=[...]),  # BASE: the base model alone
    ])  # each result carries its composition and each adapter's share of the answer

Callers that run the forwards themselves (``model.generate``) bind one composition per row
with ``engine.lora.compositions([...])`` (top1, topk and arrow).
"""

from multilora.bound import ArrowRow, BoundRow, WeightedRow
from multilora.composition import BASE, METHODS, Composition, CompositionError
from multilora.generate import Engine
from multilora.loading import tensors_from_safetensors
from multilora.lora import NO_ADAPTER, AdapterLoadError, LoraRegistry, parse_adapter
from multilora.model import LoraLinear, MultiLoraModel
from multilora.requests import (
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
)

__all__ = [
    "BASE",
    "METHODS",
    "NO_ADAPTER",
    "AdapterLoadError",
    "ArrowRow",
    "BoundRow",
    "Composition",
    "CompositionError",
    "Engine",
    "FinishReason",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "LoraLinear",
    "LoraRegistry",
    "MultiLoraModel",
    "StreamEvent",
    "WeightedRow",
    "parse_adapter",
    "tensors_from_safetensors",
]
