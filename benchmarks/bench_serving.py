"""Serving latency under load: continuous batching against waiting for the next batch, side
by side in one run, through the scheduler the inference server uses (routing.serving).

(a) **A short request while long ones decode.** ``--long`` requests of ``--long-tokens``
tokens each are decoding when a short request (``--short-tokens`` tokens) arrives; its time
to first token (TTFT) and to its last token are taken with the scheduler that lets it join
the running batch at the next step (continuous) and with the one that makes it wait for the
next batch. The reference figures, measured in the same run: the short request alone (its
own prefill and first token), and one decoding step of the long batch.

(b) **Poisson arrivals at rising rates.** For each rate, requests arrive at exponential
intervals for ``--seconds`` seconds, each asking for a number of tokens drawn from
``--lengths``; completed requests per second, p50/p99 TTFT and p50/p99 total latency, for
both schedulers at the same arrival times.

The two schedulers share one engine (the same model, tokenizer and threads) and run one
after the other within each measurement; arrival times and lengths come from ``--seed``.

    .venv/bin/python benchmarks/bench_serving.py                       # SmolLM2, CPU
    .venv/bin/python benchmarks/bench_serving.py --model tiny --seconds 5   # a smoke test

See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_multilora as bm  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

POLICIES = {"continuous": True, "next batch": False}


@dataclass
class Timing:
    ttft: float  # seconds from submission to the first token
    total: float  # to the last token
    tokens: int


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    base_model = bm.resolve_model(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_model.directory)
    from multilora import Engine

    engine = Engine(bm.load_model(base_model, device, dtype), tokenizer)
    print(
        f"{base_model.description} · {args.device} {args.dtype} · torch threads "
        f"{torch.get_num_threads()} · batch bound {args.max_batch}",
        flush=True,
    )
    engine.generate([request(tokenizer, 0, 4)])  # warm-up
    if "a" in args.parts:
        print(short_while_long(engine, tokenizer, args), flush=True)
    if "b" in args.parts:
        print(poisson_table(engine, tokenizer, args), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bm.add_common_arguments(parser)
    parser.add_argument("--parts", default="ab", help="a: short while long; b: Poisson load")
    parser.add_argument("--long", type=int, default=4, help="(a) long requests decoding")
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--after", type=float, default=2.0, help="(a) seconds before the short one")
    parser.add_argument("--rates", default="0.5,1,2,4", help="(b) arrivals per second")
    parser.add_argument("--seconds", type=float, default=40.0, help="(b) arrivals per rate")
    parser.add_argument("--lengths", default="8,32,128", help="(b) tokens asked, drawn evenly")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = bm.finish_arguments(parser.parse_args())
    args.repeats = max(1, args.repeats)
    return args


PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "List five fruits and their colours.",
    "What is 17 plus 25?",
]


def request(tokenizer: Any, i: int, tokens: int) -> Any:
    from multilora import GenerationRequest

    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return GenerationRequest(messages=messages, max_new_tokens=tokens, ignore_eos=True)


def scheduler_for(engine: Any, continuous: bool, args: argparse.Namespace) -> Any:
    from routing.serving.scheduler import Scheduler

    scheduler = Scheduler(
        engine, max_batch_size=args.max_batch, max_queue=10_000, continuous=continuous
    )
    scheduler.start()
    return scheduler


async def follow(job: Any) -> Timing:
    """Wait for a job's events: its time to first token and to the end."""
    first = None
    tokens = 0
    while True:
        item = await job.events.get()
        if item is None:
            break
        if not hasattr(item, "token_id"):
            raise RuntimeError(f"request failed: {item}")
        if item.token_id is not None:
            tokens += 1
            if first is None:
                first = time.monotonic()
    end = time.monotonic()
    assert first is not None
    return Timing(ttft=first - job.submitted_at, total=end - job.submitted_at, tokens=tokens)


# --- (a) --------------------------------------------------------------------------------------


def short_while_long(engine: Any, tokenizer: Any, args: argparse.Namespace) -> str:
    results: dict[str, list[Timing]] = {name: [] for name in POLICIES}
    alone: list[Timing] = []
    steps: list[float] = []
    for round_ in range(args.repeats):
        order = list(POLICIES) if round_ % 2 == 0 else list(reversed(POLICIES))
        alone.append(run_alone(engine, tokenizer, args))
        steps.append(step_seconds(engine, tokenizer, args))
        for name in order:
            results[name].append(asyncio.run(one_short(engine, tokenizer, args, POLICIES[name])))
    step = statistics.median(steps)
    own = statistics.median(t.ttft for t in alone)
    lines = [
        f"(a) a {args.short_tokens}-token request arriving {args.after:g} s after "
        f"{args.long} requests of {args.long_tokens} tokens started; median of "
        f"{args.repeats} rounds (range)",
        "",
        "| scheduler | short request's TTFT | its last token | TTFT ÷ (one step + its own "
        "prefill) |",
        "|---|---:|---:|---:|",
    ]
    for name, timings in results.items():
        ttft = [t.ttft for t in timings]
        total = [t.total for t in timings]
        goal = statistics.median(ttft) / (step + own)
        lines.append(f"| {name} | {cell(ttft)} | {cell(total)} | {goal:.2f} |")
    lines += [
        f"| short request alone | {cell([t.ttft for t in alone])} "
        f"| {cell([t.total for t in alone])} | |",
        "",
        f"One decoding step of the {args.long} long requests: {step * 1000:.0f} ms "
        f"(range {min(steps) * 1000:.0f}–{max(steps) * 1000:.0f}).",
    ]
    return "\n".join(lines)


def run_alone(engine: Any, tokenizer: Any, args: argparse.Namespace) -> Timing:
    async def go() -> Timing:
        scheduler = scheduler_for(engine, True, args)
        try:
            job = scheduler.submit(
                request(tokenizer, 3, args.short_tokens), loop=asyncio.get_running_loop()
            )
            return await follow(job)
        finally:
            scheduler.stop()

    return asyncio.run(go())


def step_seconds(engine: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    """One decoding step of the long requests, timed over 16 steps after their prefill."""
    requests = [request(tokenizer, i, args.long_tokens) for i in range(args.long)]
    with engine.running() as batch:
        batch.join(requests)
        batch.sample()
        batch.forward()
        started = time.perf_counter()
        for _ in range(16):
            batch.sample()
            batch.forward()
        return (time.perf_counter() - started) / 16


async def one_short(
    engine: Any, tokenizer: Any, args: argparse.Namespace, continuous: bool
) -> Timing:
    scheduler = scheduler_for(engine, continuous, args)
    loop = asyncio.get_running_loop()
    try:
        longs = [
            scheduler.submit(request(tokenizer, i, args.long_tokens), loop=loop)
            for i in range(args.long)
        ]
        followers = [asyncio.ensure_future(follow(job)) for job in longs]
        await asyncio.sleep(args.after)
        short = scheduler.submit(request(tokenizer, 3, args.short_tokens), loop=loop)
        timing = await follow(short)
        await asyncio.gather(*followers)
        return timing
    finally:
        scheduler.stop()


# --- (b) --------------------------------------------------------------------------------------


def poisson_table(engine: Any, tokenizer: Any, args: argparse.Namespace) -> str:
    rates = [float(rate) for rate in args.rates.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    lines = [
        f"(b) Poisson arrivals for {args.seconds:g} s a rate, tokens asked drawn from "
        f"{lengths}, batch bound {args.max_batch}",
        "",
        "| arrivals/s | scheduler | completed/s | TTFT p50 | TTFT p99 | latency p50 "
        "| latency p99 |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        rng = random.Random(f"{args.seed}-{rate}")
        arrivals, at = [], 0.0
        while True:
            at += rng.expovariate(rate)
            if at > args.seconds:
                break
            arrivals.append((at, rng.choice(lengths)))
        for name, continuous in POLICIES.items():
            timings, wall = asyncio.run(load(engine, tokenizer, args, continuous, arrivals))
            ttft = [t.ttft for t in timings]
            total = [t.total for t in timings]
            lines.append(
                f"| {rate:g} | {name} | {len(timings) / wall:.2f} | {seconds(ttft, 50)} "
                f"| {seconds(ttft, 99)} | {seconds(total, 50)} | {seconds(total, 99)} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


async def load(
    engine: Any,
    tokenizer: Any,
    args: argparse.Namespace,
    continuous: bool,
    arrivals: Sequence[tuple[float, int]],
) -> tuple[list[Timing], float]:
    scheduler = scheduler_for(engine, continuous, args)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    followers = []
    try:
        for i, (at, tokens) in enumerate(arrivals):
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            job = scheduler.submit(request(tokenizer, i, tokens), loop=loop)
            followers.append(asyncio.ensure_future(follow(job)))
        timings = await asyncio.gather(*followers)
        return list(timings), time.monotonic() - started
    finally:
        scheduler.stop()


# --- Cells ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def seconds(values: Sequence[float], q: float) -> str:
    return f"{percentile(values, q):.2f} s"


def cell(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


if __name__ == "__main__":
    main()
