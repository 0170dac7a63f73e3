"""Arrow routing inside the serving process.

Arrow needs, per adapter, prototypes derived from its LoRA weights (computed once per
version, on first use, and kept), and, per request, the base model's input activations at
the adapted modules for the prompt. The activations come from a base-model forward that
must not overlap a decoding batch (the batch's LoRA binding lives on the shared modules), so
it runs on the scheduler thread between two batches; the rest runs in the routing thread.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch
from django.db import close_old_connections

from contributions.models import AdapterVersion
from multilora import tensors_from_safetensors
from routing.catalog import Catalog, ServedAdapter
from routing.router import ArrowPrototypeBank, arrow_prototypes, capture_module_inputs

# A routing thread waits at most this long for the engine thread to take its base pass.
ENGINE_WAIT_SECONDS = 120.0

_prototypes: dict[int, dict[str, torch.Tensor]] = {}
# One stacked bank per catalog (a catalog is immutable and replaced whole when the mixture
# changes): stacking 1,000 adapters' prototypes per request cost 3-4x the scoring itself.
_banks: weakref.WeakKeyDictionary[Catalog, tuple[ArrowPrototypeBank, dict[int, int]]]
_banks = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def prototypes_for(adapter: ServedAdapter) -> dict[str, torch.Tensor]:
    """The adapter version's Arrow prototypes, computed from its stored weights once."""
    with _lock:
        cached = _prototypes.get(adapter.version_id)
    if cached is not None:
        return cached
    try:
        version = AdapterVersion.objects.get(pk=adapter.version_id)
        with version.weights_file.open("rb") as weights:
            tensors = tensors_from_safetensors(weights.read())
    finally:
        close_old_connections()
    prototypes = arrow_prototypes(lora_config=version.adapter_config, tensors=tensors)
    with _lock:
        _prototypes[adapter.version_id] = prototypes
    return prototypes


def bank_for(catalog: Catalog) -> tuple[ArrowPrototypeBank, dict[int, int]]:
    """The catalog's stacked prototypes, and each version id's row in them."""
    with _lock:
        cached = _banks.get(catalog)
    if cached is not None:
        return cached
    adapters = list(catalog)
    bank = ArrowPrototypeBank([prototypes_for(adapter) for adapter in adapters])
    rows = {adapter.version_id: row for row, adapter in enumerate(adapters)}
    with _lock:
        _banks[catalog] = (bank, rows)
    return bank, rows


def scorer(
    rt, catalog: Catalog, prompt_ids: list[int]
) -> Callable[[list[ServedAdapter]], np.ndarray]:
    """The callback the router calls with the candidates when it routes by Arrow."""

    def scores(candidates: list[ServedAdapter]) -> np.ndarray:
        bank, rows = bank_for(catalog)
        names = bank.module_paths()
        ids = torch.tensor([prompt_ids], device=rt.engine.device)
        inputs = rt.scheduler.call(
            lambda engine: capture_module_inputs(engine.model, ids, names)
        ).result(timeout=ENGINE_WAIT_SECONDS)
        return bank.scores(inputs)[[rows[adapter.version_id] for adapter in candidates]]

    return scores
