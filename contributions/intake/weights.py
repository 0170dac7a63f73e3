"""adapter_model.safetensors: the header checked by hand before any library parses it, then
the tensors checked against the config and the base model's architecture.

safetensors has no code path, but its header is attacker-chosen JSON of up to 100 MB whose
shapes and offsets drive allocation; the library checks the format, not our limits (header
size, tensor count) nor the errors we want to name. So we read the header ourselves first.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from contributions.intake.base import IntakeError, IntakeLimits, load_json_strictly
from contributions.intake.config import LoraSettings

# safetensors dtype -> (our name, bytes per element)
_DTYPES = {"F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4)}
_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before each module path
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_METADATA_MAX_CHARS = 64 * 1024


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: list[int]
    begin: int
    end: int


@dataclass(frozen=True)
class WeightsSummary:
    dtype: str  # our name of the dtype that holds the most parameters
    tensor_count: int
    parameter_count: int


def check_weights(
    data: bytes, *, lora: LoraSettings, architecture: dict[str, Any], limits: IntakeLimits
) -> WeightsSummary:
    entries = _read_header(data, limits)
    _check_tensors(entries, lora, architecture)
    try:
        tensors = load(data)
    except SafetensorError as exc:  # our checks passed but the library still refused it
        raise _invalid_header(f"the safetensors library refused it ({exc})") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise IntakeError(
                "weights_not_finite",
                f"The tensor {name!r} contains NaN or infinite values.",
                details={"tensor": name},
            )
    parameters: Counter[str] = Counter()
    for entry in entries.values():
        parameters[_DTYPES[entry.dtype][0]] += math.prod(entry.shape)
    return WeightsSummary(
        dtype=max(parameters, key=lambda dtype: (parameters[dtype], dtype)),
        tensor_count=len(entries),
        parameter_count=sum(parameters.values()),
    )


def _read_header(data: bytes, limits: IntakeLimits) -> dict[str, _Entry]:
    if len(data) < 8:
        raise _invalid_header("it is shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", data[:8])  # little-endian u64, per the format
    if header_length > limits.max_header_bytes:
        raise IntakeError(
            "weights_header_too_large",
            f"The safetensors header declares {header_length} bytes; the limit is "
            f"{limits.max_header_bytes} bytes.",
            details={"header_bytes": header_length, "max_bytes": limits.max_header_bytes},
        )
    if 8 + header_length > len(data):
        raise _invalid_header("its header runs past the end of the file")
    try:
        header = load_json_strictly(data[8 : 8 + header_length])
    except ValueError as exc:
        raise _invalid_header(f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _invalid_header("its header is not a JSON object")
    _check_metadata(header.pop("__metadata__", {}))
    if len(header) > limits.max_tensors:
        raise IntakeError(
            "weights_too_many_tensors",
            f"The file holds {len(header)} tensors; the limit is {limits.max_tensors}.",
            details={"tensor_count": len(header), "max_tensors": limits.max_tensors},
        )
    data_length = len(data) - 8 - header_length
    entries = {name: _entry(name, info, data_length) for name, info in header.items()}
    _check_offsets(entries, data_length)
    return entries


def _check_metadata(metadata: Any) -> None:
    # The format allows only a string-to-string map here; nothing reads it, so keep it small.
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _invalid_header("its __metadata__ is not a map of strings to strings")
    if sum(len(k) + len(v) for k, v in metadata.items()) > _METADATA_MAX_CHARS:
        raise _invalid_header(f"its __metadata__ is over {_METADATA_MAX_CHARS} characters")


def _entry(name: str, info: Any, data_length: int) -> _Entry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _invalid_header(f"the entry for {name!r} is not dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise IntakeError(
            "weights_dtype",
            f"The tensor {name!r} has dtype {dtype!r}; only F16, BF16 and F32 are accepted.",
            details={"tensor": name, "dtype": dtype},
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _invalid_header(f"the shape of {name!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _offsets_invalid(f"the data_offsets of {name!r} are not two non-negative integers")
    begin, end = offsets
    if end < begin or end - begin != _byte_size(shape, _DTYPES[dtype][1], data_length):
        raise _offsets_invalid(f"the byte range of {name!r} does not match its shape and dtype")
    return _Entry(dtype, shape, begin, end)


def _byte_size(shape: list[int], itemsize: int, cap: int) -> int | None:
    """The tensor's size in bytes, or None once it passes ``cap``. Python ints do not overflow,
    but the full product of a hostile shape could have millions of digits: stop early."""
    if 0 in shape:
        return 0
    size = itemsize
    for dim in shape:
        size *= dim
        if size > cap:
            return None
    return size


def _check_offsets(entries: dict[str, _Entry], data_length: int) -> None:
    # Sorted by start, each tensor must begin where the previous one ended: no overlap (two
    # tensors sharing bytes), no gap (bytes nobody accounts for), and the last ends at the end.
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise _offsets_invalid("tensors overlap or leave gaps between them")
        position = entry.end
    if position != data_length:
        raise _offsets_invalid(
            f"the tensors cover {position} bytes but the file holds {data_length} bytes of data"
        )


def _check_tensors(entries: dict[str, _Entry], lora: LoraSettings, architecture: dict) -> None:
    """Every tensor is the A or B of a targeted module, every targeted module in every layer
    has both, and each has the shape the base module and rank call for."""
    targets = {
        path: dims
        for path, dims in architecture["linear_modules"].items()
        if path.rsplit(".", 1)[-1] in lora.target_modules
    }
    for name, entry in entries.items():
        module, suffix = _split(name)
        if module not in targets:
            raise IntakeError(
                "weights_unexpected_tensor",
                f"The tensor {name!r} is not the lora_A or lora_B weight of a module the config "
                "targets.",
                details={"tensor": name},
            )
        in_features, out_features = targets[module]
        if suffix == ".lora_A.weight":
            expected = [lora.rank, in_features]
        else:
            expected = [out_features, lora.rank]
        if entry.shape != expected:
            raise IntakeError(
                "weights_shape_mismatch",
                f"The tensor {name!r} has shape {entry.shape}; the base model and rank "
                f"{lora.rank} need {expected}.",
                details={"tensor": name, "shape": entry.shape, "expected": expected},
            )
    for module in targets:
        for suffix in _LORA_SUFFIXES:
            name = f"{_PREFIX}{module}{suffix}"
            if name not in entries:
                raise IntakeError(
                    "weights_missing_tensor",
                    f"The tensor {name!r} is missing: every layer of every targeted module "
                    "needs its lora_A and lora_B.",
                    details={"tensor": name},
                )


def _split(name: str) -> tuple[str | None, str | None]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, suffix); (None, None) otherwise."""
    for suffix in _LORA_SUFFIXES:
        if name.startswith(_PREFIX) and name.endswith(suffix):
            return name[len(_PREFIX) : -len(suffix)], suffix
    return None, None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _invalid_header(problem: str) -> IntakeError:
    return IntakeError(
        "weights_invalid_header", f"The file adapter_model.safetensors is not valid: {problem}."
    )


def _offsets_invalid(problem: str) -> IntakeError:
    return IntakeError(
        "weights_offsets_invalid", f"The file adapter_model.safetensors is not valid: {problem}."
    )
