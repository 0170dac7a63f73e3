"""The intake's public types (its one error, its limits, its input and output) and the one
JSON reader both hostile-file parsers share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from tessera.errors import DomainError

MiB = 1024 * 1024


class IntakeError(DomainError):
    """A refused upload. ``code`` is stable snake_case, grouped by where the problem lies:
    ``upload_*`` (the parts), ``archive_*``, ``config_*`` (adapter_config.json) and
    ``weights_*`` (adapter_model.safetensors); ``message`` is one sentence for people."""


@dataclass(frozen=True)
class IntakeLimits:
    max_upload_bytes: int = 64 * MiB
    max_rank: int = 64
    max_header_bytes: int = MiB
    max_tensors: int = 4096

    @classmethod
    def from_settings(cls) -> IntakeLimits:
        # Read at call time, not import time, so tests can override settings per test.
        return cls(
            max_upload_bytes=settings.TESSERA_MAX_UPLOAD_BYTES,
            max_rank=settings.TESSERA_MAX_LORA_RANK,
            max_header_bytes=settings.TESSERA_MAX_SAFETENSORS_HEADER_BYTES,
            max_tensors=settings.TESSERA_MAX_TENSORS,
        )


@dataclass(frozen=True)
class UploadPart:
    name: str  # the client's file name, e.g. "adapter_config.json" or "adapter.zip"
    data: bytes


@dataclass(frozen=True)
class ValidatedAdapter:
    config_bytes: bytes
    weights_bytes: bytes
    card_bytes: bytes | None
    config_sha256: str
    weights_sha256: str
    card_sha256: str  # "" when there is no card
    size_bytes: int  # the three files together
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]  # sorted short names, e.g. ["q_proj", "v_proj"]
    dtype: str  # "float16" | "bfloat16" | "float32": the dtype holding most parameters
    tensor_count: int
    parameter_count: int
    normalised_config: dict[str, Any]  # only our allow-listed keys, canonical values


def load_json_strictly(data: bytes) -> Any:
    """Parse UTF-8 JSON the way no other reader could read differently: a repeated key is
    refused (json keeps the last one silently, another parser may keep the first), and so are
    NaN/Infinity, which are not JSON. Raises ValueError for anything it refuses."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("a key is repeated")
        return obj

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=refuse_duplicates,
            parse_constant=refuse_constant,
        )
    except RecursionError as exc:  # deeply nested arrays exhaust the C scanner's stack
        raise ValueError("nested too deeply") from exc
