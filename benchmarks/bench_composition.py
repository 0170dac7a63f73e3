"""Compositions in one engine batch: tokens/s of top1, topk (k=2 and k=4), arrow (k=2 of
every loaded adapter) and logit (k=2) batches, and of a mixed batch whose rows cycle through
those five, side by side against the base model in one run, as ratios.

16 random adapters (rank ``--rank`` on ``--targets``) are loaded. Every configuration is one
batch of ``--batch`` requests generating exactly ``--new-tokens`` tokens each (greedy,
end-of-sequence ignored) from the same prompts; a logit request is two rows of the batch,
and its tokens count once. Timing is bench_multilora's: every configuration runs once per
round, the order rotating, and each ratio is paired within a round (base seconds / its
seconds), shown as the median over the rounds with the range.

The references: transformers' ``generate`` on the bare base model, and our engine's own
loop with no adapter.

    .venv/bin/python benchmarks/bench_composition.py --threads 1   # tiny model, then SmolLM2
    .venv/bin/python benchmarks/bench_composition.py --models smollm2 --device cuda

SmolLM2-135M-Instruct is used when var/test-models/SmolLM2-135M-Instruct* exists (as
bench_multilora finds it), and skipped otherwise. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_multilora as bm  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

LOADED = 16


def compositions(kind: str, batch: int) -> list[Any]:
    """One composition per request of a ``kind`` batch (row i starts at adapter i)."""
    from multilora import BASE, Composition

    def keys(i: int, k: int) -> tuple[str, ...]:
        return tuple(f"a{(i + j) % LOADED}" for j in range(k))

    def one(kind: str, i: int) -> Composition:
        if kind == "base":
            return BASE
        if kind == "top1":
            return Composition.single(keys(i, 1)[0])
        if kind == "topk k=2":
            return Composition.topk(keys(i, 2))
        if kind == "topk k=4":
            return Composition.topk(keys(i, 4))
        if kind == "arrow k=2 of 16":
            return Composition.arrow(keys(i, LOADED), k=2)
        if kind == "logit k=2":
            return Composition.logit(keys(i, 2))
        raise ValueError(kind)

    if kind == "mixed":
        cycle = ["top1", "topk k=2", "topk k=4", "arrow k=2 of 16", "logit k=2"]
        return [one(cycle[i % len(cycle)], i) for i in range(batch)]
    return [one(kind, i) for i in range(batch)]


KINDS = ["base", "top1", "topk k=2", "topk k=4", "arrow k=2 of 16", "logit k=2", "mixed"]


def run_model(base_model: bm.BaseModel, args: argparse.Namespace) -> str:
    from multilora import GenerationRequest

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_model.directory)
    prompts = [bm.prompt_ids(tokenizer, bm.PROMPTS[i % len(bm.PROMPTS)]) for i in range(args.batch)]
    targets = tuple(args.targets.split(","))
    base = bm.load_model(base_model, device, dtype)
    adapters = bm.random_adapters(base, LOADED, rank=args.rank, targets=targets, seed=0)
    engine = bm.build_engine(base_model, args, device, dtype, tokenizer, adapters)
    input_ids, attention_mask = bm.left_pad(prompts, bm.pad_id(tokenizer), device)

    def engine_run(kind: str) -> Callable[[], None]:
        requests = [
            GenerationRequest(
                prompt_ids=ids,
                composition=composition,
                max_new_tokens=args.new_tokens,
                ignore_eos=True,
            )
            for ids, composition in zip(prompts, compositions(kind, args.batch), strict=True)
        ]

        def run() -> None:
            results = engine.generate(requests)
            if any(r.completion_tokens != args.new_tokens for r in results):
                raise RuntimeError("The engine stopped a request early.")

        return run

    runs: dict[str, Callable[[], None]] = {
        bm.BASE_RUN: lambda: bm.hf_generate(base, input_ids, attention_mask, args.new_tokens)
    }
    for kind in KINDS:
        runs[kind if kind != "base" else bm.ENGINE_BASE_RUN] = engine_run(kind)
    header = bm.header(args, base_model, device, dtype, prompts).rstrip("\n")
    print(header, flush=True)
    seconds = bm.time_interleaved(runs, warmup=args.warmup, repeats=args.repeats, device=device)
    tokens = args.batch * args.new_tokens
    lines = [
        header + f" · {LOADED} adapters loaded",
        "",
        "| batch (every request) | batch rows | tokens/s (median) | × base (range) "
        "| × our engine, no adapter (range) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in runs:
        rows = args.batch
        if name == "logit k=2":
            rows = 2 * args.batch
        elif name == "mixed":
            rows = args.batch + len(compositions("mixed", args.batch)[4::5])
        rate = tokens / statistics.median(seconds[name])
        lines.append(
            f"| {name} | {rows} | {rate:.1f} "
            f"| {bm.ratio_cell(bm.paired_ratios(seconds, name, bm.BASE_RUN))} "
            f"| {bm.ratio_cell(bm.paired_ratios(seconds, name, bm.ENGINE_BASE_RUN))} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # transformers' chatter, not ours to fix
    tables = []
    for name in args.models.split(","):
        if name == "tiny":
            args.model = "tiny"
        elif name == "smollm2":
            models = ROOT / "var" / "test-models"
            found = sorted(models.glob("SmolLM2-135M-Instruct*/config.json"))
            if not found:
                print("No SmolLM2 under var/test-models: skipped.", file=sys.stderr)
                continue
            args.model, args.model_dir = "smollm2", found[0].parent
        else:
            sys.exit(f"Unknown model {name!r}: use tiny and/or smollm2.")
        tables.append(run_model(bm.resolve_model(args), args))
    print("\n\n".join(tables), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="tiny and/or smollm2")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, help="requests per batch (64 on cuda, 16 on cpu)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    args.model_dir, args.random_weights, args.model = None, False, "tiny"
    return bm.finish_arguments(args)


if __name__ == "__main__":
    main()
