"""The sandboxed evaluation child: ``python -m evaluation.worker.child`` (started by
evaluation.worker.sandbox).

Reads a JobSpec as JSON on stdin; writes JSON lines on stdout: ``{"progress": done,
"total": n, "label": ...}`` as it goes and one final ``{"result": {...}}``; logs to stderr.

It imports no Django and sees no database: only the base model's folder (read-only), a
read-only copy of the adapter's safetensors file and the job. It scores with the serving
engine (multilora), so what was measured is what is served: the LoRA is loaded into the
engine's registry from our validated config only (``JobSpec.lora_config``, never the
contributor's adapter_config.json, which is not even copied) and the tensors read by
``safetensors.torch.load_file``, and the base model's rows and the adapter's rows share
batches (one forward per step for both). No ``from_pretrained`` on anything the
contributor sent, no pickle, no remote code.

Result::

    {"scores": {task key: {"base": [floats] | null, "adapters": {adapter key: [floats]}}},
     "composed": {composed task key: [floats]},
     "sketches": {adapter key: {module kind: [256 floats]}},
     "failed": {adapter key: reason},
     "stats": {"baseline_vm_bytes": …, "peak_vm_bytes": …, "peak_rss_bytes": …, "seconds": {…}}}

``base`` is null for tasks whose base scores the parent has cached (``score_base`` false).
An adapter the engine refuses (its tensors do not fit its config, a config it cannot
serve) is named in ``failed`` and scored nowhere; the job's other adapters go on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "adapter_model.safetensors"
# The exit status for "ran out of memory" (MemoryError, or torch's "can't allocate memory"),
# so the parent can say so without reading the log. No Django or tessera import here: the
# child stays light and never loads settings.
EXIT_MEMORY = 86


class _Protocol:
    """stdout belongs to the protocol: the real fd 1 is kept for it and fd 1 itself is
    pointed at stderr, so a library that prints cannot corrupt the JSON lines."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(message, allow_nan=False, separators=(",", ":")) + "\n")
        self.stream.flush()


class _Progress:
    def __init__(self, protocol: _Protocol, total: int) -> None:
        self.protocol, self.total, self.done, self.label = protocol, total, 0, ""

    def start(self, label: str) -> None:
        self.label = label
        self.protocol.send({"progress": self.done, "total": self.total, "label": label})

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        self.protocol.send({"progress": self.done, "total": self.total, "label": self.label})


def _log(message: str) -> None:
    print(f"[child {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _memory() -> dict[str, int]:
    """VmPeak, VmSize and VmHWM of this process, in bytes (Linux)."""
    found = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in {"VmPeak", "VmSize", "VmHWM", "VmRSS"}:
                found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def evaluate(spec, protocol: _Protocol) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    import torch

    from evaluation.worker.scoring import score_composed, score_task_variants
    from multilora import NO_ADAPTER

    torch.manual_seed(spec.seed)
    timings["import"] = time.monotonic() - started
    _log(f"torch {torch.__version__} imported; memory {_memory()}")

    mark = time.monotonic()
    model, tokenizer = _load_base(spec.base_model_path, spec.device)
    timings["load_base"] = time.monotonic() - mark
    baseline = _memory()
    _log(f"base model loaded from {spec.base_model_path}; memory {baseline}")

    mark = time.monotonic()
    engine, slots, sketches, failed = _load_adapters(model, tokenizer, spec)
    lora = engine.lora
    timings["load_adapters"] = time.monotonic() - mark

    plan = [(task, [k for k in spec.task_adapters(task) if k in slots]) for task in spec.tasks]
    total = sum(len(task.examples) * (len(keys) + task.score_base) for task, keys in plan)
    total += sum(len(task.examples) for task in spec.composed)
    progress = _Progress(protocol, total)
    scores: dict[str, dict[str, Any]] = {}
    mark = time.monotonic()
    for task, keys in plan:
        variants = ([NO_ADAPTER] if task.score_base else []) + [slots[k] for k in keys]
        progress.start(task.key)
        measured = score_task_variants(
            model,
            tokenizer,
            task,
            variants=variants,
            bind=lora.adapters,
            batch_size=spec.batch_size,
            progress=progress.advance,
        )
        base = measured.pop(0) if task.score_base else None
        scores[task.key] = {"base": base, "adapters": dict(zip(keys, measured, strict=True))}
    composed: dict[str, list[float]] = {}
    for task in spec.composed:
        progress.start(task.key)
        composed[task.key] = score_composed(
            engine, task, batch_size=spec.batch_size, progress=progress.advance
        )
    timings["score"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    peak = _memory()
    return {
        "scores": scores,
        "composed": composed,
        "sketches": sketches,
        "failed": failed,
        "stats": {
            "baseline_vm_bytes": baseline.get("VmSize", 0),
            "baseline_rss_bytes": baseline.get("VmRSS", 0),
            "peak_vm_bytes": peak.get("VmPeak", 0),
            "peak_rss_bytes": peak.get("VmHWM", 0),
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        },
    }


def _load_base(path: str, device: str):
    """The prepared base model: local files, safetensors only, never remote code (the same
    flags as contributions.base_models.base_model_load, which needs Django)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        # transformers would apply an adapter it finds beside a model; ours never has one.
        raise RuntimeError(f"{folder} holds an adapter_config.json; refusing to load it")
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
    )
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    return model, tokenizer


def _load_adapters(model, tokenizer, spec):
    """The serving engine over ``model`` with every adapter of the job in its registry,
    each from our validated config and its safetensors tensors, and each adapter's weight
    sketch. Returns (engine, {key: slot}, {key: sketch}, {key: reason it was refused}); the
    engine's ``lora`` binds the variant rows, its ``generate`` answers compositions."""
    from safetensors.torch import load_file

    from evaluation.worker.sketch import sketch_from_tensors
    from multilora import AdapterLoadError, Engine, LoraRegistry

    registry = LoraRegistry.for_model(model, initial_capacity=max(2, len(spec.adapters) + 1))
    engine = Engine(model, tokenizer, registry=registry)
    slots: dict[str, int] = {}
    sketches: dict[str, dict[str, list[float]]] = {}
    failed: dict[str, str] = {}
    for adapter in spec.adapters:
        config = adapter.lora_config
        try:
            tensors = load_file(str(Path(adapter.adapter_dir) / WEIGHTS_NAME), device="cpu")
            slots[adapter.key] = registry.add(adapter.key, lora_config=config, tensors=tensors)
        except (AdapterLoadError, OSError, ValueError) as exc:
            failed[adapter.key] = f"{type(exc).__name__}: {exc}"[:1000]
            _log(f"{adapter.key}: refused by the engine: {failed[adapter.key]}")
            continue
        scale = float(config["lora_alpha"]) / float(config["r"])
        sketches[adapter.key] = sketch_from_tensors(
            {name: t.detach().float().cpu().numpy() for name, t in tensors.items()}, scale=scale
        )
        _log(
            f"{adapter.key}: LoRA loaded, {len(tensors)} tensors, r={config['r']}, "
            f"alpha={config['lora_alpha']}"
        )
        del tensors
    return engine, slots, sketches, failed


def main() -> int:
    protocol = _Protocol()
    try:
        from evaluation.worker.specs import JobSpec

        spec = JobSpec.from_dict(json.loads(sys.stdin.buffer.read()))
        result = evaluate(spec, protocol)
    except MemoryError:
        _log("out of memory (MemoryError)")
        return EXIT_MEMORY
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            _log(f"out of memory: {exc}")
            return EXIT_MEMORY
        raise
    protocol.send({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
