"""Arrow routing (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a
Library of LoRAs"; PEFT's ``ArrowLoraLinearLayer``), made request-level.

Arrow needs no data: for each adapter and each module it targets, the *prototype* is the top
right singular vector of ΔW = B·A, the input direction that adapter changes most. A token
whose input activation x at that module points along the prototype is one the adapter was
trained to act on; PEFT scores it by |⟨x, prototype⟩| (sign-free, since a singular vector's
sign is arbitrary).

PEFT uses those scores per token and per layer: top-k adapters, a softmax, and a weighted
mix of their outputs. Our engine serves one adapter per request row, so here the scores are
reduced to one number per adapter for the whole request:

    score(adapter) = mean over the modules it targets and the prompt's tokens of |cos(x, p)|

Where this differs from PEFT, and why:

- the prototype is the exact top singular vector (QR of Aᵀ, then the SVD of the small
  out×r matrix), not PEFT's 15 steps of power iteration from a random start: it is
  computed once per adapter load, costs about the same, and does not depend on the gap
  between the top two singular values or on a seed (``top_right_singular_vec_from_BA`` is a
  method of PEFT's layer module, not a function we could call on bare tensors anyway; the
  tests check the two agree where power iteration converges);
- each token's activation is divided by its norm (cosine instead of PEFT's raw dot product;
  PEFT's own docstring calls it cosine). Within one layer PEFT's softmax compares adapters on
  the same token, so the scale does not matter there; across layers it does, because
  activation norms differ by orders of magnitude from layer to layer, and a mean over
  layers of raw products would be decided by the loudest layer;
- no top-k and no softmax: they make mixing coefficients, and there is nothing to mix.
  Averaging the similarities themselves also keeps adapters comparable when they target
  different modules, which PEFT's Arrow refuses outright (it requires identical targets).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from multilora.arrow import top_right_singular_vector
from multilora.lora import AdapterLoadError, parse_adapter
from multilora.model import LoraLinear

__all__ = [
    "ArrowPrototypeBank",
    "arrow_prototypes",
    "arrow_request_scores",
    "capture_module_inputs",
    "top_right_singular_vector",  # multilora's, re-exported for existing callers
]

_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<half>[AB])\.weight$")


def arrow_prototypes(
    *,
    lora_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    module_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """{module path: unit prototype [in_features] float32} of one adapter.

    ``lora_config`` and ``tensors`` are what the engine's registry loads (our normalised
    config, the safetensors tensors in PEFT's naming). ``module_shapes`` (the registry's)
    checks the tensors against the base model; without it the shapes are taken from the
    tensors themselves, for adapters that were checked already.

    Computed once, when the adapter is loaded: for SmolLM2 at rank 8 on seven module kinds
    that is 210 small QR/SVD pairs, a few tens of milliseconds.
    """
    if module_shapes is None:
        module_shapes = _shapes_from_tensors(tensors)
    parsed = parse_adapter(lora_config, tensors, module_shapes)
    return {path: top_right_singular_vector(a, b) for path, (a, b) in parsed.modules.items()}


def _shapes_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, list[int]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None or tensor.dim() != 2:
            raise AdapterLoadError(f"The tensor {name!r} is not a PEFT lora_A or lora_B weight.")
        in_out = shapes.setdefault(match["path"], [0, 0])
        if match["half"] == "A":
            in_out[0] = tensor.shape[1]  # lora_A [r, in]
        else:
            in_out[1] = tensor.shape[0]  # lora_B [out, r]
    return {path: (in_out[0], in_out[1]) for path, in_out in shapes.items()}


class ArrowPrototypeBank:
    """The prototypes of many adapters, stacked per module: scoring a request is then one
    matmul per module, whatever the number of adapters.

    Build it once per set of loaded adapters (the serving process keeps one per catalog);
    ``arrow_request_scores`` builds a throwaway one per call.
    """

    def __init__(self, prototypes_by_adapter: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.size = len(prototypes_by_adapter)
        by_module: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for index, prototypes in enumerate(prototypes_by_adapter):
            for path, vector in prototypes.items():
                rows, vectors = by_module.setdefault(path, ([], []))
                rows.append(index)
                vectors.append(vector)
        # path -> (adapter indices [E_m], prototypes [E_m, in]). Reshaped and cast once per
        # module, not per vector: with 1,000 adapters on 120 modules the per-tensor calls
        # were most of the build time.
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            path: (
                torch.tensor(rows, dtype=torch.long),
                torch.stack(vectors).reshape(len(vectors), -1).to(torch.float32),
            )
            for path, (rows, vectors) in by_module.items()
        }
        self._device_copies: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def module_paths(self) -> list[str]:
        """The modules some adapter targets: the ones ``capture_module_inputs`` should hook."""
        return sorted(self.modules)

    def scores(self, hidden_inputs: Mapping[str, torch.Tensor]) -> np.ndarray:
        """[adapters] float64: each adapter's mean |cos(x, prototype)| over the modules it
        targets that are in ``hidden_inputs`` and over their tokens; 0.0 for an adapter none
        of whose modules are there (no evidence for it).

        Runs on the inputs' device (the prototypes are copied there once per device), and
        moves only the final scores back: no host round trip per module on a GPU.
        """
        device = next(iter(hidden_inputs.values())).device if hidden_inputs else torch.device("cpu")
        sums = torch.zeros(self.size, dtype=torch.float64, device=device)
        counts = torch.zeros(self.size, dtype=torch.float64, device=device)
        normalised: dict[int, torch.Tensor] = {}  # q, k and v share one input tensor
        with torch.inference_mode():
            for path, x in hidden_inputs.items():
                if path not in self.modules:
                    continue
                rows, prototypes = self._on(device, path)
                if id(x) not in normalised:
                    tokens = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
                    norms = tokens.norm(dim=1)
                    # A zero activation has no direction: leave such tokens out of the mean.
                    keep = norms > 0
                    normalised[id(x)] = tokens[keep] / norms[keep].unsqueeze(1)
                tokens = normalised[id(x)]
                if tokens.shape[1] != prototypes.shape[1]:
                    raise ValueError(
                        f"The input at {path!r} has {tokens.shape[1]} features; the prototypes "
                        f"there have {prototypes.shape[1]}."
                    )
                if tokens.shape[0] == 0:
                    continue
                similarity = (tokens @ prototypes.T).abs().mean(dim=0)
                sums.index_add_(0, rows, similarity.double())
                counts.index_add_(0, rows, torch.ones_like(similarity, dtype=torch.float64))
        scores = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
        return scores.cpu().numpy()

    def _on(self, device: torch.device, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.modules[path]
        key = (str(device), path)
        if key not in self._device_copies:
            rows, prototypes = self.modules[path]
            self._device_copies[key] = (rows.to(device), prototypes.to(device))
        return self._device_copies[key]


def arrow_request_scores(
    *,
    hidden_inputs: Mapping[str, torch.Tensor],
    prototypes_by_adapter: list[dict[str, torch.Tensor]],
) -> np.ndarray:
    """One Arrow score per adapter (in the list's order) for one request.

    ``hidden_inputs`` maps module path -> the prompt's input activations [tokens, in] at that
    module, from a forward of the base model alone (``capture_module_inputs``);
    ``prototypes_by_adapter`` holds each adapter's ``arrow_prototypes``. See the module
    docstring for the score and how it relates to PEFT's.
    """
    return ArrowPrototypeBank(prototypes_by_adapter).scores(hidden_inputs)


class _CaptureDone(Exception):
    """Raised from the last hook: every wanted input is in hand, the rest of the forward
    (later layers and the output head, about a fifth of SmolLM2's compute) is not needed."""


def capture_module_inputs(
    model: nn.Module, input_ids: torch.Tensor, module_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """{module name: its input activations [tokens, in_features]} for one prompt, from a
    forward of the base model with no adapter.

    ``model`` is a transformers causal LM, bare or wrapped by the engine (the paths name
    ``LoraLinear`` wrappers then, whose input is the base linear's input). ``input_ids`` is
    one prompt, [tokens] or [1, tokens]. The caller keeps the model to itself for the call
    (the engine thread between batches): a batch's bound LoRA would change every later
    layer's inputs, so a model with an adapter bound is refused rather than measured.
    """
    names = list(dict.fromkeys(module_names))
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] != 1:
        raise ValueError(f"capture_module_inputs takes one prompt, not a batch of {ids.shape[0]}.")
    for module in model.modules():
        if isinstance(module, LoraLinear) and module.lora is not None:
            raise RuntimeError("An adapter is bound to the model; capture needs the base alone.")
    modules = {name: model.get_submodule(name) for name in names}  # AttributeError: unknown
    captured: dict[str, torch.Tensor] = {}
    # One copy per distinct input tensor (q, k and v share one). The original is kept too,
    # so that its id cannot be reused by a later tensor while the forward runs.
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            # Copied because a model may reuse or modify its buffers in place later on.
            if id(x) not in copies:
                copies[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).clone())
            captured[name] = copies[id(x)][1]
            if len(captured) == len(names):
                raise _CaptureDone

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    except _CaptureDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in captured]
    if missing:
        raise ValueError(f"The forward never called {missing[:3]} (of {len(missing)}).")
    return {name: captured[name] for name in names}
