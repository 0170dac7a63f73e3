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
    target: str  # for the parts metric: one part a line
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskSpec:
    """A task split to score. ``key`` names it in the child's answer ("task:12:hidden")."""

    key: str
    metric: str  # exact_match | contains | multiple_choice | mean_loglik | parts
    prompt_template: str
    max_new_tokens: int
    examples: list[ExampleSpec]
    score_base: bool = True  # False when the base model's scores are cached already
    # The keys of the job's adapters to score on this task; None: every adapter of the job.
    adapters: list[str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        examples = [ExampleSpec(**example) for example in data["examples"]]
        return cls(**{**data, "examples": examples})


@dataclass(frozen=True)
class ComposedTaskSpec:
    """A task split answered by compositions of the job's adapters, one per example (the
    router's choice for that prompt differs from example to example). Each composition is
    a plain dict of multilora.Composition's fields (method, adapters as job adapter keys,
    weights, k, temperature); the child answers with the serving engine's own rows, so a
    composition is measured exactly as it is served."""

    key: str  # names it in the child's answer ("task:12:hidden|embedding/topk")
    metric: str  # any task metric (evaluation.worker.scoring.METRICS)
    prompt_template: str
    max_new_tokens: int
    examples: list[ExampleSpec]
    compositions: list[dict[str, Any]]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComposedTaskSpec:
        examples = [ExampleSpec(**example) for example in data["examples"]]
        return cls(**{**data, "examples": examples})


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a job: ``key`` names it in the child's answer ("run:12"); its weights
    are a read-only copy in ``adapter_dir``; ``lora_config`` is our validated, normalised
    config (never the contributor's file)."""

    key: str
    adapter_dir: str
    lora_config: dict[str, Any]


@dataclass(frozen=True)
class JobSpec:
    """Everything the child needs: where the base model is, the adapters (all loaded into
    one engine, their rows and the base model's sharing batches) and the task splits."""

    base_model_path: str
    adapters: list[AdapterSpec]
    tasks: list[TaskSpec]
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    composed: list[ComposedTaskSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        tasks = [TaskSpec.from_dict(task) for task in data["tasks"]]
        adapters = [AdapterSpec(**adapter) for adapter in data["adapters"]]
        composed = [ComposedTaskSpec.from_dict(task) for task in data.get("composed") or []]
        return cls(**{**data, "tasks": tasks, "adapters": adapters, "composed": composed})

    def task_adapters(self, task: TaskSpec) -> list[str]:
        """The keys of the adapters scored on ``task``, in the job's order."""
        keys = [adapter.key for adapter in self.adapters]
        return keys if task.adapters is None else [k for k in keys if k in set(task.adapters)]
