"""Synchronous intake validation of an uploaded LoRA adapter: pure Python, in memory.

Nothing here touches the database or the disk, and nothing unsafe is ever parsed by code
that could run it: archives are unpacked in memory with caps, the config is read into our own
schema, and the weights' header is checked by hand before the safetensors library reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import Any

from contributions.architecture import target_module_names
from contributions.intake.base import IntakeError, IntakeLimits, UploadPart, ValidatedAdapter
from contributions.intake.config import parse_config
from contributions.intake.files import collect_files
from contributions.intake.weights import check_weights

__all__ = ["IntakeError", "IntakeLimits", "UploadPart", "ValidatedAdapter", "validate_upload"]


def validate_upload(
    parts: Sequence[UploadPart],
    *,
    base_model_names: Collection[str],
    architecture: dict[str, Any],
    limits: IntakeLimits,
) -> ValidatedAdapter:
    """Check an upload end to end; raise IntakeError naming the first problem found.

    ``base_model_names`` are the names adapter_config.json's base_model_name_or_path may
    carry; ``architecture`` is the base model's, as contributions.architecture describes it.
    """
    files = collect_files(parts, limits)
    lora = parse_config(
        files.config,
        base_model_names=base_model_names,
        target_names=target_module_names(architecture),
        max_rank=limits.max_rank,
    )
    weights = check_weights(files.weights, lora=lora, architecture=architecture, limits=limits)
    return ValidatedAdapter(
        config_bytes=files.config,
        weights_bytes=files.weights,
        card_bytes=files.card,
        config_sha256=hashlib.sha256(files.config).hexdigest(),
        weights_sha256=hashlib.sha256(files.weights).hexdigest(),
        card_sha256=hashlib.sha256(files.card).hexdigest() if files.card is not None else "",
        size_bytes=len(files.config) + len(files.weights) + len(files.card or b""),
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        dtype=weights.dtype,
        tensor_count=weights.tensor_count,
        parameter_count=weights.parameter_count,
        normalised_config=lora.normalised(),
    )
