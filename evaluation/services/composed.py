"""Measuring compositions: answers that several adapters make together, per example.

A single adapter's outcome on an example never changes (greedy decoding), so it is stored
once (evaluation.services.outcomes). A composition's outcome depends on the whole mixture
(which adapters the router ranks, with which weights), so it is measured for the caller's
compositions and handed back, not stored here: the caller (the scoreboard) keeps the
aggregates it derives. Everything is measured in one sandboxed child, with the serving
engine's own generation, so a composition is scored exactly as it is served.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from contributions.models import AdapterVersion, BaseModel
from evaluation.services.outcomes import UnionSplit, adapter_copies, child_run
from evaluation.services.plans import adapter_key
from evaluation.worker.sandbox import workdir_add_readonly
from evaluation.worker.specs import AdapterSpec, ComposedTaskSpec, JobSpec

WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class ExtraAdapter:
    """An adapter that is no contributor's version (a mixture's merged adapter): its
    safetensors bytes and our normalised config, named ``key`` in compositions."""

    key: str
    weights: bytes
    lora_config: dict[str, Any]


@dataclass(frozen=True)
class ComposedPart:
    """One split answered by one method: a composition per example of ``split`` (in its
    order), each naming adapters by version id."""

    label: str  # the caller's name for the method, e.g. "embedding/topk"
    split: UnionSplit
    # multilora.Composition fields; adapters named by version pk, or by an extra's key
    compositions: Sequence[dict[str, Any]]

    @property
    def key(self) -> str:
        return f"{self.split.key}|{self.label}"


def composed_measure(
    *,
    base_model: BaseModel,
    versions: list[AdapterVersion],
    parts: list[ComposedPart],
    extra: Sequence[ExtraAdapter] = (),
) -> dict[str, list[float]]:
    """{part key: per-example scores} for every part: greedy answers on a generative
    metric, log-likelihoods under the composed model on a multiple-choice one. An example
    whose composition names a version that could not be copied scores 0.0. Raises
    RunFailure when the child fails as a whole."""
    if not parts:
        return {}
    wanted = {pk for part in parts for c in part.compositions for pk in c.get("adapters", ())}
    needed = [version for version in versions if version.pk in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="tessera-composed-"))
    try:
        adapters, _failures = adapter_copies(workdir, needed)
        for index, adapter in enumerate(extra):
            folder = workdir_add_readonly(
                workdir, f"extra-{index}", files={WEIGHTS_NAME: adapter.weights}
            )
            adapters.append(
                AdapterSpec(
                    key=adapter.key, adapter_dir=str(folder), lora_config=adapter.lora_config
                )
            )
        job = JobSpec(
            base_model_path=base_model.local_path,
            adapters=adapters,
            tasks=[],
            composed=[
                ComposedTaskSpec(
                    key=part.key,
                    metric=part.split.task.metric,
                    prompt_template=part.split.template,
                    max_new_tokens=part.split.task.max_new_tokens,
                    examples=part.split.examples,
                    compositions=[_by_key(c) for c in part.compositions],
                )
                for part in parts
            ],
            batch_size=settings.TESSERA_EVAL_BATCH_SIZE,
            device="cuda" if settings.TESSERA_EVAL_GPU_WORKERS else "cpu",
        )
        result = child_run(job, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    measured = result.get("composed") or {}
    return {part.key: [float(x) for x in measured.get(part.key, [])] for part in parts}


def _by_key(composition: dict[str, Any]) -> dict[str, Any]:
    """The composition with its version ids turned into the job's adapter keys (an extra
    adapter is named by its own key already)."""
    names = composition.get("adapters", ())
    keys = [name if isinstance(name, str) else adapter_key(name) for name in names]
    return {**composition, "adapters": keys}
