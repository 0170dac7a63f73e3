"""Plain, JSON-serialisable descriptions of evaluation work.

They cross the process boundary into the sandboxed child (as JSON on its stdin) and back
(per-example scores as JSON on its stdout), so they hold no ORM objects and no tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExampleSpec:
    fields: dict[str, Any]
    target: str
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskSpec:
    """A task split to score. ``key`` names it in the child's answer ("task:12:hidden")."""

    key: str
    metric: str  # exact_match | contains | multiple_choice | mean_loglik
    prompt_template: str
    max_new_tokens: int
    examples: list[ExampleSpec]
    score_base: bool = True  # False when the base model's scores are cached already

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        examples = [ExampleSpec(**example) for example in data["examples"]]
        return cls(**{**data, "examples": examples})


@dataclass(frozen=True)
class JobSpec:
    """Everything the child needs: where the base model and the adapter copy are, the
    validated LoRA config (never the contributor's file), and the task splits."""

    base_model_path: str
    adapter_dir: str
    lora_config: dict[str, Any]
    tasks: list[TaskSpec]
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        tasks = [TaskSpec.from_dict(task) for task in data["tasks"]]
        return cls(**{**data, "tasks": tasks})
