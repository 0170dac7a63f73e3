"""Merging LoRA adapters into one with PEFT's ``add_weighted_adapter``: no database, no files.

Each adapter enters as our normalised config (AdapterVersion.adapter_config) and its
safetensors tensors, checked against the base model's modules by multilora.parse_adapter
(the engine's own check), and is injected into an in-memory PeftModel built from a
LoraConfig made of those fields alone: no PEFT ``from_pretrained`` on a contributor's
folder ever runs (an uploaded adapter_config.json can make PEFT import modules).

PEFT's ``ties`` and ``dare_ties`` work on lora_A and lora_B separately (each adapter's
scaling folded in as ``sqrt(weight * alpha / r)`` on both sides), so the merged adapter
keeps the members' rank, with ``lora_alpha = r`` (scaling 1), and targets the union of
their modules; a module only some members target is merged from those. PEFT refuses
members of different ranks for these methods; that refusal is a MergeRefused here.

The base model is changed while merging (PEFT wraps its linear layers) and restored
before returning, so the caller may keep using it. Everything runs on the model's device;
DARE's random drops draw from a generator seeded with MERGE_SEED (the CPU's, forked for
the call), so rebuilding the same mixture gives the same tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multilora.lora import AdapterLoadError, linear_module_shapes, parse_adapter

METHODS = ("ties", "dare_ties")
MERGE_SEED = 0
MERGED_NAME = "merged"
# Equal weights: TIES averages the agreeing entries of the members (the "disjoint merge"),
# so 1.0 each is the plain mean; any other common value would only rescale the result.
EQUAL_WEIGHT = 1.0


class MergeRefused(ValueError):
    """These adapters cannot be merged (a config, a tensor, or a mix PEFT refuses)."""


@dataclass(frozen=True)
class LoraInput:
    """One member: a name for error messages, our normalised config, its tensors (named
    ``base_model.model.<module path>.lora_{A,B}.weight``, as PEFT saves them)."""

    name: str
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MergedLora:
    config: dict[str, Any]  # our normalised config shape (LoraSettings.normalised())
    tensors: dict[str, torch.Tensor]  # float32, contiguous, PEFT's names
    rank: int


def lora_config(config: Mapping[str, Any]):
    """A PEFT LoraConfig from our normalised config's fields only."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=sorted(_targets(config["target_modules"])),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _targets(value: Any) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


def merge_loras(
    model: nn.Module,
    adapters: Sequence[LoraInput],
    *,
    method: str = "ties",
    density: float = 0.5,
    seed: int = MERGE_SEED,
) -> MergedLora:
    """Merge ``adapters`` (at least one) on ``model`` with PEFT's ``add_weighted_adapter``
    at equal weights; see the module docstring for what comes out."""
    if method not in METHODS:
        raise MergeRefused(f"Unknown merge method {method!r}; expected one of {METHODS}.")
    if not 0 < density <= 1:
        raise MergeRefused(f"density must be in (0, 1], not {density!r}.")
    if not adapters:
        raise MergeRefused("There is no adapter to merge.")
    shapes = linear_module_shapes(model)
    for adapter in adapters:
        try:
            parse_adapter(adapter.config, adapter.tensors, shapes)
        except AdapterLoadError as error:
            raise MergeRefused(f"{adapter.name}: {error}") from error

    peft_model = _peft_model(model, adapters)
    try:
        return _merge(peft_model, adapters, method=method, density=density, seed=seed)
    finally:
        # Take PEFT's layers out again: the caller's model is the plain base model after.
        peft_model.base_model.unload()


def _names(adapters: Sequence[LoraInput]) -> list[str]:
    # PEFT adapter names are module attribute keys: ours are positional, never the user's.
    return [f"m{index}" for index in range(len(adapters))]


def _peft_model(model: nn.Module, adapters: Sequence[LoraInput]):
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = None
    try:
        for name, adapter in zip(_names(adapters), adapters, strict=True):
            config = lora_config(adapter.config)
            with warnings.catch_warnings():
                # PEFT warns about a model that already has adapters; we add them on purpose.
                warnings.simplefilter("ignore")
                if peft_model is None:
                    peft_model = get_peft_model(model, config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, config)
            tensors = {key: tensor.detach().float() for key, tensor in adapter.tensors.items()}
            result = set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
            # Every lora weight of this adapter must have come from its tensors: a weight
            # left at PEFT's initial values would merge noise into the result.
            missing = [key for key in result.missing_keys if f".{name}." in key]
            if missing or result.unexpected_keys:
                raise MergeRefused(
                    f"{adapter.name}: tensors do not match its config "
                    f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})."
                )
    except MergeRefused:
        if peft_model is not None:
            peft_model.base_model.unload()
        raise
    except (ValueError, TypeError, RuntimeError) as error:
        if peft_model is not None:
            peft_model.base_model.unload()
        raise MergeRefused(f"PEFT could not load the adapters: {error}") from error
    return peft_model


def _merge(peft_model, adapters, *, method: str, density: float, seed: int) -> MergedLora:
    from peft import get_peft_model_state_dict

    names = _names(adapters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model.add_weighted_adapter(
                adapters=names,
                weights=[EQUAL_WEIGHT] * len(names),
                adapter_name=MERGED_NAME,
                combination_type=method,
                density=density,
            )
        except (ValueError, TypeError, RuntimeError) as error:
            raise MergeRefused(f"PEFT refused to merge them with {method}: {error}") from error
    merged = peft_model.peft_config[MERGED_NAME]
    state = get_peft_model_state_dict(peft_model, adapter_name=MERGED_NAME)
    tensors = {
        key: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for key, tensor in state.items()
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(merged.r),
        "lora_alpha": float(merged.lora_alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted(_targets(merged.target_modules)),
        "bias": "none",
    }
    return MergedLora(config=config, tensors=tensors, rank=int(merged.r))
