"""adapter_config.json, read into our own allow-list schema.

The file is not inert: PEFT imports modules it names (`auto_mapping.parent_library`,
`megatron_core`) and fetches what it points at (`base_model_name_or_path`, `revision`).
So no PEFT or transformers code ever sees it; we read the few fields plain LoRA needs,
check every other key against what PEFT 0.21 writes by default, and hand on a clean dict
of our own.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from contributions.intake.base import IntakeError, load_json_strictly

CONFIG_MAX_BYTES = 64 * 1024
# What real LoRA adapters use, with room to spare: alpha is usually r to 4r (16 to 256 at the
# ranks we take), so the scale alpha/r the engine folds into B is about 0.25 to 4; dropout
# is 0 to 0.1, sometimes 0.3. A scale far outside this is no adapter anyone trained: it
# multiplies B into float16 overflow, or nothing at all.
MAX_LORA_ALPHA = 1024.0
LORA_SCALE_RANGE = (1 / 128, 64.0)
MAX_LORA_DROPOUT = 0.5
_REQUIRED = ("peft_type", "task_type", "r", "lora_alpha", "target_modules")
# Keys that import code, fetch files, smuggle full layers or tokens, or replace the weights'
# initialisation with a recipe of their own. Refused whenever they hold a value; PEFT writes
# most of them as null or {} and that is fine.
_FORBIDDEN = frozenset(
    {
        "auto_map",  # transformers' remote-code mapping
        "auto_mapping",  # AutoPeftModel imports auto_mapping["parent_library"]
        "megatron_config",
        "megatron_core",  # a module name PEFT imports when megatron_config is set
        "revision",  # names what to download
        "modules_to_save",
        "trainable_token_indices",
        "layer_replication",
        "target_parameters",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
# PEFT writes megatron_core with this value whatever the adapter; it is only ever imported
# together with megatron_config, which is forbidden.
_MEGATRON_CORE_DEFAULT = "megatron.core"
# Variants of LoRA whose arithmetic differs from plain LoRA, which is all the engine applies.
# Refused unless unset (null, false, empty).
_UNSUPPORTED = frozenset(
    {
        "use_dora",
        "use_rslora",  # scales by alpha/sqrt(r) instead of alpha/r
        "fan_in_fan_out",
        "lora_bias",
        "use_qalora",
        "use_bdlora",
        "alora_invocation_tokens",
        "arrow_config",
        "kasa_config",
        "monteclora_config",
        "velora_config",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "ensure_weight_tying",
    }
)
# Harmless keys PEFT writes, ignored once their type is right.
_IGNORED_TYPES: dict[str, tuple[type, ...]] = {
    "inference_mode": (bool,),
    "init_lora_weights": (bool, str),  # how training started; irrelevant to trained weights
    "peft_version": (str,),
    "qalora_group_size": (int,),  # used only with use_qalora, which must be false
}
_ALLOWED = (
    frozenset(_REQUIRED)
    | {"lora_dropout", "bias", "base_model_name_or_path"}
    | _FORBIDDEN
    | _UNSUPPORTED
    | _IGNORED_TYPES.keys()
)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]  # sorted

    def normalised(self) -> dict[str, Any]:
        """Our clean config: keys LoraConfig accepts, with canonical values."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
        }


def parse_config(
    data: bytes, *, base_model_names: Collection[str], target_names: Collection[str], max_rank: int
) -> LoraSettings:
    """Read adapter_config.json. ``target_names`` are the base's linear module short names."""
    config = _load(data)
    _check_keys(config)
    if config["peft_type"] != "LORA":
        raise IntakeError(
            "config_not_lora",
            f"The adapter's peft_type is {config['peft_type']!r}; only LoRA adapters "
            '("LORA") are accepted.',
        )
    if config["task_type"] != "CAUSAL_LM":
        raise IntakeError(
            "config_wrong_task_type",
            f"The adapter's task_type is {config['task_type']!r}; the base model needs "
            '"CAUSAL_LM".',
        )
    _check_base_model(config.get("base_model_name_or_path"), base_model_names)
    for key, types in _IGNORED_TYPES.items():
        if key in config and not _is_a(config[key], types):
            raise _invalid(key, f"must be {' or '.join(t.__name__ for t in types)}")
    rank = _rank(config["r"], max_rank)
    alpha = _alpha(config["lora_alpha"])
    _check_scale(alpha, rank)
    return LoraSettings(
        rank=rank,
        alpha=alpha,
        dropout=_dropout(config.get("lora_dropout", 0.0)),
        target_modules=_target_modules(config["target_modules"], target_names),
    )


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > CONFIG_MAX_BYTES:
        raise IntakeError(
            "config_too_large",
            f"The file adapter_config.json is {len(data)} bytes; the limit is {CONFIG_MAX_BYTES}.",
        )
    try:
        config = load_json_strictly(data)
    except ValueError as exc:
        raise IntakeError(
            "config_invalid_json", f"The file adapter_config.json is not valid UTF-8 JSON ({exc})."
        ) from exc
    if not isinstance(config, dict):
        raise IntakeError(
            "config_invalid_json", "The file adapter_config.json must hold a JSON object."
        )
    return config


def _check_keys(config: dict[str, Any]) -> None:
    for key, value in config.items():
        # A key with the word "code" (trust_remote_code, code_revision, …) is about running
        # someone's code: refused whatever its value, PEFT never writes such a key.
        names_code = "code" in key.lower().split("_")
        if names_code or (key in _FORBIDDEN and not _is_unset(key, value)):
            raise IntakeError(
                "config_forbidden_key",
                f"The adapter config sets {key!r}, which Tessera never accepts.",
                details={"key": key},
            )
    unknown = sorted(set(config) - _ALLOWED)
    if unknown:
        raise IntakeError(
            "config_unknown_key",
            f"The adapter config has keys we do not know: {', '.join(unknown)}.",
            details={"keys": unknown},
        )
    for key in _REQUIRED:
        if config.get(key) is None:
            raise IntakeError(
                "config_missing_key",
                f"The adapter config does not set {key!r}.",
                details={"key": key},
            )
    for key in sorted(_UNSUPPORTED & config.keys()):
        if not _is_unset(key, config[key]):
            raise _unsupported(key, "Tessera serves plain LoRA only")
    if config.get("bias", "none") != "none":
        raise _unsupported("bias", 'LoRA bias terms are not supported; use "none"')


def _is_unset(key: str, value: Any) -> bool:
    if key == "megatron_core" and value == _MEGATRON_CORE_DEFAULT:
        return True
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


def _check_base_model(name: Any, base_model_names: Collection[str]) -> None:
    # Absent or null is fine: the tensor shapes decide compatibility.
    if name is None or name == "":
        return
    if not isinstance(name, str):
        raise _invalid("base_model_name_or_path", "must be a string")
    # A contributor who trained from a local copy has a path ending in the model's name.
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if name not in base_model_names and last not in base_model_names:
        raise IntakeError(
            "config_base_model_mismatch",
            f"The adapter was trained for {name!r}, not for this platform's base model.",
            details={"base_model_name_or_path": name},
        )


def _rank(value: Any, max_rank: int) -> int:
    if not _is_a(value, (int,)):
        raise _invalid("r", "must be an integer")
    if not 1 <= value <= max_rank:
        raise IntakeError(
            "config_rank_out_of_range",
            f"The LoRA rank r is {value}; it must be between 1 and {max_rank}.",
            details={"r": value, "max_rank": max_rank},
        )
    return value


def _alpha(value: Any) -> float:
    if not _is_a(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _invalid("lora_alpha", "must be a positive number")
    if value > MAX_LORA_ALPHA:
        raise IntakeError(
            "config_alpha_out_of_range",
            f"The LoRA alpha is {value}; it must be at most {MAX_LORA_ALPHA:g}.",
            details={"lora_alpha": value, "max_alpha": MAX_LORA_ALPHA},
        )
    return float(value)


def _check_scale(alpha: float, rank: int) -> None:
    low, high = LORA_SCALE_RANGE
    scale = alpha / rank
    if not low <= scale <= high:
        raise IntakeError(
            "config_scale_out_of_range",
            f"The LoRA scale lora_alpha / r is {scale:g} ({alpha:g} / {rank}); it must be "
            f"between {low:g} and {high:g}.",
            details={"scale": scale, "min_scale": low, "max_scale": high},
        )


def _dropout(value: Any) -> float:
    if not _is_a(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _invalid("lora_dropout", "must be a number at least 0")
    if value > MAX_LORA_DROPOUT:
        raise IntakeError(
            "config_dropout_out_of_range",
            f"The LoRA dropout is {value}; it must be at most {MAX_LORA_DROPOUT:g}.",
            details={"lora_dropout": value, "max_dropout": MAX_LORA_DROPOUT},
        )
    return float(value)


def _target_modules(value: Any, target_names: Collection[str]) -> list[str]:
    if isinstance(value, str):
        # PEFT reads a string as a regular expression (or "all-linear"): a regex decides
        # silently which modules it matches, so we ask for the names themselves.
        raise IntakeError(
            "config_target_modules_regex",
            "The adapter config's target_modules is a string (a regular expression); list the "
            'module names instead, e.g. ["q_proj", "v_proj"].',
        )
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _invalid("target_modules", "must be a non-empty list of module names")
    unknown = sorted(set(value) - set(target_names))
    if unknown:
        raise IntakeError(
            "config_unknown_target_module",
            "The adapter config's target_modules names modules the base model lacks: "
            f"{', '.join(unknown)}; choose among {', '.join(sorted(target_names))}.",
            details={"unknown": unknown},
        )
    return sorted(set(value))


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int to Python, never to us (unless asked for).
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _invalid(key: str, problem: str) -> IntakeError:
    return IntakeError(
        "config_invalid_value",
        f"In adapter_config.json, {key} {problem}.",
        details={"key": key},
    )


def _unsupported(key: str, why: str) -> IntakeError:
    return IntakeError(
        "config_unsupported_option",
        f"The adapter config sets {key!r}; {why}.",
        details={"key": key},
    )
