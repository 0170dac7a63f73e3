"""Measure the demo adapters on the HIDDEN splits of the built-in suites, as admission would.

    python demo/measure.py --base-model var/test-models/SmolLM2-135M-Instruct \
        [--out var/demo-measure.json] [--adapters unit-conversion date-formatting ...]

For each adapter in demo/adapters/: its targeted tasks (the skill suites whose task tags
meet the adapter's metadata task_tags) and the general suite, base vs base + adapter, with
the paired bootstrap 95% CI of the difference, and the admission policy's verdict (gain
>= 0.10 with CI low > 0 on every targeted task; general mean drop <= 0.05). The base model's
per-example scores are cached in the output file, so a second run only scores adapters.

This reads the suite files directly (no database) and loads the adapter with PEFT from its
own folder: fine for our own demo adapters, never for an upload (an uploaded
adapter_config.json can make PEFT import modules or fetch files; intake never lets PEFT read one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_GAIN = 0.10
MAX_GENERAL_DROP = 0.05
BOOTSTRAP_SAMPLES = 2000


def load_tasks(split: str):
    from evaluation.suite_io import parse_suite_jsonl
    from evaluation.suites import complete_suite
    from evaluation.training import _spec
    from evaluation.worker.specs import TaskSpec

    tasks = {}
    for path in sorted((ROOT / "evaluation" / "suites").glob("*.jsonl")):
        # The hidden splits are not committed: drawn from TESSERA_SUITE_SEED (else the
        # development seed in var/suite-seed), as load_suites draws them.
        suite = parse_suite_jsonl(complete_suite(path))
        for task in suite.tasks:
            spec = TaskSpec(
                key=f"{suite.slug}/{task.slug}",
                metric=task.metric,
                prompt_template=task.prompt_template,
                max_new_tokens=task.max_new_tokens,
                examples=[_spec(e) for e in task.split(split)],
            )
            tasks[spec.key] = (suite.purpose, task.tags, spec)
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "demo-measure.json")
    parser.add_argument("--adapters", nargs="*", default=None)
    parser.add_argument("--split", default="hidden")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-only", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.suites import complete_suite
    from evaluation.worker.scoring import bootstrap_delta_ci, score_task

    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("base", {})
    results.setdefault("adapters", {})
    results.setdefault("adapter_scores", {})  # name -> task key -> per-example scores
    results.setdefault("suite_sha256", {})
    # A suite file that changed invalidates its cached scores.
    for path in sorted((ROOT / "evaluation" / "suites").glob("*.jsonl")):
        digest = hashlib.sha256(complete_suite(path)).hexdigest()
        if results["suite_sha256"].get(path.stem) != digest:
            prefix = f"{path.stem}/"
            for cache in (results["base"], *results["adapter_scores"].values()):
                for key in [k for k in cache if k.startswith(prefix)]:
                    del cache[key]
            results["suite_sha256"][path.stem] = digest
    tasks = load_tasks(args.split)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    def fresh_base():
        model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
        return model.eval()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    base = fresh_base()
    for key, (_purpose, _tags, spec) in tasks.items():
        if key in results["base"]:
            continue
        started = time.monotonic()
        scores = score_task(base, tokenizer, spec, batch_size=args.batch_size)
        results["base"][key] = scores
        save()
        mean = sum(scores) / len(scores)
        print(f"base {key}: {mean:.3f} (n={len(scores)}, {time.monotonic() - started:.0f}s)")
    if args.base_only:
        return

    from peft import PeftModel

    adapters_dir = ROOT / "demo" / "adapters"
    names = args.adapters or sorted(p.name for p in adapters_dir.iterdir() if p.is_dir())
    for name in names:
        folder = adapters_dir / name
        metadata = json.loads((folder / "metadata.json").read_text())
        wanted = set(metadata["task_tags"])
        model = None
        cached = results["adapter_scores"].setdefault(name, {})
        weights = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        if cached.get("_weights") != weights:
            cached.clear()
            cached["_weights"] = weights
        report = {"targeted": {}, "general": {}}
        for key, (purpose, tags, spec) in tasks.items():
            targeted = purpose == "skill" and wanted & set(tags)
            if not targeted and purpose != "general":
                continue
            started = time.monotonic()
            if key in cached:
                scores = cached[key]
            else:
                if model is None:
                    model = PeftModel.from_pretrained(fresh_base(), folder).eval()
                scores = score_task(model, tokenizer, spec, batch_size=args.batch_size)
                cached[key] = scores
                save()
            base_scores = results["base"][key]
            delta, low, high = bootstrap_delta_ci(
                base_scores, scores, samples=BOOTSTRAP_SAMPLES, seed=0
            )
            entry = {
                "n": len(scores),
                "base": sum(base_scores) / len(base_scores),
                "adapter": sum(scores) / len(scores),
                "delta": delta,
                "ci_low": low,
                "ci_high": high,
            }
            report["targeted" if targeted else "general"][key] = entry
            print(
                f"{name} {key}: base {entry['base']:.3f} adapter {entry['adapter']:.3f} "
                f"delta {delta:+.3f} CI [{low:+.3f}, {high:+.3f}] "
                f"({time.monotonic() - started:.0f}s)",
                flush=True,
            )
        general = report["general"].values()
        drop = -sum(e["delta"] for e in general) / len(general) if general else 0.0
        targeted_ok = bool(report["targeted"]) and all(
            e["delta"] >= MIN_GAIN - 1e-9 and e["ci_low"] > 0 for e in report["targeted"].values()
        )
        report["general_drop"] = drop
        report["passes"] = targeted_ok and drop <= MAX_GENERAL_DROP + 1e-9
        results["adapters"][name] = report
        save()
        print(f"{name}: general drop {drop:+.3f}; passes: {report['passes']}", flush=True)


if __name__ == "__main__":
    main()
