"""What the learned router's decision costs, side by side with the embedding router's, with
10 and 1,000 admitted adapters, against one whole request (greedy generation of
``--new-tokens`` tokens on the base model, batch 1).

Measured, each as the median over many requests with varied prompts, all with the request
already embedded (embedding it is the same cost for both routers and is timed on its own):

- embedding router: ``route()`` (candidates, one product with the stacked signatures, top);
- learned router, ``knn`` and ``linear``: ``route(router="learned")`` (candidates, the
  model's columns for them, one product with the training prompts' matrix or the weights,
  the ranking);
- the whole request: our engine, the same prompts, exactly ``--new-tokens`` tokens.

The learned models are fitted on random data of the real size (the arithmetic does not
depend on the values): ``--public`` scored public examples with a score per candidate, and
``--prompts-per-adapter`` example prompts per adapter.

    .venv/bin/python benchmarks/bench_learned_router.py --model smollm2 --threads 1

``--threads 1`` limits torch and numpy's BLAS to one thread each: on a shared 2-core
machine, a multi-threaded BLAS contending with other processes made the knn product
(7,000 × 384) take 3 to 9 ms instead of 0.35 ms.

See benchmarks/README.md and benchmarks/bench_router.py, whose helpers this reuses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_router
import numpy as np
import torch
from bench_router import PROMPTS, Step, time_round_robin
from transformers import AutoTokenizer


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        # numpy's BLAS too: both routers' products run on it, and with more threads than
        # free cores a busy machine makes a 1,000-row product ten times slower.
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    warnings.simplefilter("ignore")
    counts = sorted({int(n) for n in args.adapters.split(",")})
    model_dir = bench_router.resolve_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = bench_router.load_model(model_dir, args)
    prompts = [bench_router.prompt_ids(tokenizer, text) for text in PROMPTS]

    steps = decision_steps(counts, args)
    whole = bench_router.whole_request_step(model, tokenizer, prompts, args)
    print(header(args, model_dir), flush=True)
    time_round_robin([*steps, whole], rounds=args.rounds)
    print(table(steps, whole), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--model-dir", type=Path, help="a local model directory")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--adapters", default="10,1000", help="adapter counts, comma-separated")
    parser.add_argument("--public", type=int, default=2000, help="scored public examples")
    parser.add_argument("--prompts-per-adapter", type=int, default=5)
    parser.add_argument("--k", type=int, default=20, help="the knn model's k")
    parser.add_argument("--rounds", type=int, default=8, help="round-robin rounds")
    parser.add_argument("--requests", type=int, default=25, help="decisions a round per step")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args()


def learned_models(count: int, args: argparse.Namespace, version_ids: list[int]):
    """A knn and a linear model of the real size for ``count`` adapters, on random data."""
    from evaluation.worker.signatures import DIMENSIONS
    from routing.router import LearnedRouterModel

    rng = np.random.default_rng(count)
    prompts = count * args.prompts_per_adapter
    points = rng.standard_normal((args.public + prompts, DIMENSIONS)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    columns = count + 1
    correct = (rng.random((args.public, columns)) < 0.3).astype(np.float32)
    common = dict(
        version_ids=np.asarray(version_ids, dtype=np.int64),
        prior=correct.mean(axis=0).astype(np.float32),
        mixture_number=1,
    )
    knn = LearnedRouterModel(
        kind="knn",
        points=points,
        correct=correct,
        known=np.ones_like(correct),
        owner=np.repeat(np.arange(1, columns), args.prompts_per_adapter),
        k=args.k,
        **common,
    )
    weights = (0.1 * rng.standard_normal((columns, DIMENSIONS))).astype(np.float32)
    linear = LearnedRouterModel(
        kind="linear", weights=weights, bias=np.zeros(columns, np.float32), **common
    )
    return knn, linear


def decision_steps(counts: list[int], args: argparse.Namespace) -> list[Step]:
    from dataclasses import replace

    from evaluation.worker.signatures import embed
    from routing.router import RoutingPolicy, route, signature_matrix

    queries = embed(PROMPTS)  # also loads the embedding model, outside any timing
    steps = [
        Step(
            "embed the request text (all-MiniLM-L6-v2, both routers)",
            "–",
            lambda i: embed([PROMPTS[i % len(PROMPTS)]]),
            args.requests,
        )
    ]

    def embedded(texts):
        return queries[PROMPTS.index(texts[0])][None]

    for count in counts:
        catalog = bench_router.random_catalog(count)
        signature_matrix(catalog)  # built once per catalog, when the mixture changes
        knn, linear = learned_models(count, args, [a.version_id for a in catalog.adapters])
        by_router = {
            "embedding": (catalog, "embedding"),
            "learned knn": (replace(catalog, learned=knn), "learned"),
            "learned linear": (replace(catalog, learned=linear), "learned"),
        }
        for label, (served, router) in by_router.items():

            def decide(i: int, served=served, router=router) -> None:
                with mock.patch("evaluation.worker.signatures.embed", side_effect=embedded):
                    route(
                        catalog=served,
                        model="tessera",
                        text=PROMPTS[i % len(PROMPTS)],
                        user_id=None,
                        policy=RoutingPolicy(),
                        router=router,
                    )

            decide(0)  # the per-catalog caches (signatures, the model's columns)
            steps.append(
                Step(f"{label} · route(), query embedded", str(count), decide, args.requests)
            )
    return steps


def header(args: argparse.Namespace, model_dir: Path) -> str:
    import os

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"model {args.model} ({model_dir.name}) · cpu · float32 · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · {args.rounds} rounds round-robin, "
        f"{args.requests} decisions a round per step · learned: {args.public} public examples,"
        f" {args.prompts_per_adapter} example prompts per adapter, knn k={args.k} · "
        f"load average at start {' '.join(f'{x:.2f}' for x in load)}\n"
    )


def table(steps: list[Step], whole: Step) -> str:
    whole_median = statistics.median(whole.seconds)
    embedding = {
        s.adapters: statistics.median(s.seconds) for s in steps if s.name.startswith("embedding")
    }
    lines = [
        "| step | adapters | median ms | range ms | × embedding router | % of whole request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step in [*steps, whole]:
        median = statistics.median(step.seconds)
        ratio = f"{median / embedding[step.adapters]:.2f}" if step.adapters in embedding else "–"
        lines.append(
            f"| {step.name} | {step.adapters} | {median * 1e3:.3f} | "
            f"{min(step.seconds) * 1e3:.3f}–{max(step.seconds) * 1e3:.3f} | {ratio} | "
            f"{100 * median / whole_median:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
