"""Does the number of loaded adapters slow decoding? The same batch composition with 5 and
with 1,000 adapters loaded, side by side in one run, and the memory the adapters hold.

Two engines over two copies of the base model: one with ``--loaded`` = 5 adapters in its
registry, one with 1,000 (rank ``--rank`` on ``--targets``). Both run the same batch: row i
uses the (i mod ``--distinct``)-th of ``--distinct`` adapters, picked evenly across each
registry (so in the large one they sit in slots far apart, up to the last). The base model
alone through transformers' ``generate`` runs in the same rounds, as the common reference.
Timing and ratios as in bench_multilora.py: interleaved rounds, the order rotating, ratios
paired within a round, medians.

Besides throughput it reports, for each engine: the bytes of the stacked LoRA weights (the
registry's tensors, counted exactly), the growth of the process's resident memory while
loading, the time to load one adapter, and the time to bind a batch (the once-per-batch
gather of the rows' weights out of the stacks).

    .venv/bin/python benchmarks/bench_adapters_loaded.py                # CPU: batch 16
    .venv/bin/python benchmarks/bench_adapters_loaded.py --device cuda  # GPU: batch 64, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from benchmarks.bench_multilora import (  # noqa: E402
    BASE_RUN,
    PROMPTS,
    add_common_arguments,
    build_engine,
    engine_generate,
    finish_arguments,
    header,
    hf_generate,
    iter_random_adapters,
    left_pad,
    load_model,
    lora_config,
    pad_id,
    paired_ratios,
    prompt_ids,
    ratio_cell,
    resolve_model,
    time_interleaved,
)

MIB = 1024 * 1024


@dataclass
class Loaded:
    """One engine with ``count`` adapters and what loading them cost."""

    count: int
    engine: Any
    keys: list[str]  # the batch's adapter per row
    stack_bytes: int
    capacity: int
    rss_growth: int
    load_seconds: float
    bind_seconds: list[float]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore")  # transformers' chatter, not ours to fix

    base_model = resolve_model(args)
    tokenizer = AutoTokenizer.from_pretrained(base_model.directory)
    prompts = [prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    base = load_model(base_model, device, dtype)
    input_ids, attention_mask = left_pad(prompts, pad_id(tokenizer), device)

    loaded = [
        load_engine(base_model, base, args, device, dtype, tokenizer, count)
        for count in sorted({int(n) for n in args.loaded.split(",")})
    ]
    for entry in loaded:
        entry.bind_seconds = time_binds(entry, repeats=args.bind_repeats)

    runs: dict[str, Callable[[], None]] = {
        BASE_RUN: lambda: hf_generate(base, input_ids, attention_mask, args.new_tokens),
    }
    for entry in loaded:
        runs[run_name(entry)] = lambda entry=entry: engine_generate(
            entry.engine, prompts, entry.keys, args.new_tokens
        )

    print(header(args, base_model, device, dtype, prompts), flush=True)
    seconds = time_interleaved(runs, warmup=args.warmup, repeats=args.repeats, device=device)
    print(report(seconds, loaded, args), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--loaded", default="5,1000", help="adapters loaded per engine, comma-separated"
    )
    parser.add_argument(
        "--distinct", type=int, default=5, help="distinct adapters in the batch (all engines)"
    )
    parser.add_argument(
        "--bind-repeats", type=int, default=20, help="batch bindings timed per engine"
    )
    args = finish_arguments(parser.parse_args())
    if args.distinct > min(int(n) for n in args.loaded.split(",")):
        parser.error("--distinct cannot exceed the smallest --loaded count.")
    return args


def run_name(entry: Loaded) -> str:
    return f"ours · {entry.count} loaded"


def load_engine(
    base_model: Any,
    base: torch.nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    count: int,
) -> Loaded:
    """An engine with ``count`` random adapters; the batch's ``--distinct`` adapters are
    spread evenly over them."""
    targets = tuple(args.targets.split(","))
    adapters = iter_random_adapters(base, count, rank=args.rank, targets=targets, seed=count)
    process = psutil.Process()
    # The engine's own base model copy is loaded first, so the memory growth measured
    # below is the adapters' alone.
    engine = build_engine(base_model, args, device, dtype, tokenizer, ())
    rss_before = process.memory_info().rss
    gpu_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    config = lora_config(args)
    load_seconds = 0.0  # the registry's work only, not making up the random tensors
    for i, tensors in enumerate(adapters):
        start = time.perf_counter()
        engine.add_adapter(f"a{i}", lora_config=config, tensors=tensors)
        load_seconds += time.perf_counter() - start
    if device.type == "cuda":
        rss_growth = torch.cuda.memory_allocated(device) - gpu_before
    else:
        rss_growth = process.memory_info().rss - rss_before
    registry = engine.registry
    stack_bytes = sum(stack.A.nbytes + stack.B.nbytes for stack in registry.stacks.values())
    step = count // args.distinct
    chosen = [f"a{j * step}" for j in range(args.distinct - 1)] + [f"a{count - 1}"]
    return Loaded(
        count=count,
        engine=engine,
        keys=[chosen[i % args.distinct] for i in range(args.batch)],
        stack_bytes=stack_bytes,
        capacity=registry.capacity,
        rss_growth=rss_growth,
        load_seconds=load_seconds,
        bind_seconds=[],
    )


def time_binds(entry: Loaded, *, repeats: int) -> list[float]:
    """Seconds to bind the batch's rows to their adapters (and unbind): the per-batch gather
    that makes each decoding step independent of how many adapters are loaded."""
    engine = entry.engine
    slots = [engine.registry.slot_of(key) for key in entry.keys]
    seconds = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with engine.lora.adapters(slots):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def report(seconds: dict[str, list[float]], loaded: list[Loaded], args: argparse.Namespace) -> str:
    tokens = args.batch * args.new_tokens
    smallest = run_name(loaded[0])
    memory = "GPU memory allocated" if args.device == "cuda" else "process RSS"
    lines = [
        f"| adapters loaded | distinct in batch | tokens/s (median) | × base (range) "
        f"| × {loaded[0].count} loaded (range) |",
        "|---:|---:|---:|---:|---:|",
        f"| base model alone | 0 | {tokens / statistics.median(seconds[BASE_RUN]):.1f} "
        f"| 1.00 | – |",
    ]
    for entry in loaded:
        name = run_name(entry)
        lines.append(
            f"| {entry.count} | {args.distinct} "
            f"| {tokens / statistics.median(seconds[name]):.1f} "
            f"| {ratio_cell(paired_ratios(seconds, name, BASE_RUN))} "
            f"| {ratio_cell(paired_ratios(seconds, name, smallest))} |"
        )
    lines += [
        "",
        f"| adapters loaded | registry capacity (slots) | stacked LoRA weights "
        f"| per slot | {memory} growth while loading | load time per adapter "
        f"| batch bind (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in loaded:
        lines.append(
            f"| {entry.count} | {entry.capacity} | {entry.stack_bytes / MIB:,.1f} MiB "
            f"| {entry.stack_bytes / entry.capacity / MIB:.2f} MiB "
            f"| {entry.rss_growth / MIB:,.1f} MiB "
            f"| {entry.load_seconds / entry.count * 1000:.1f} ms "
            f"| {statistics.median(entry.bind_seconds) * 1000:.2f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
