"""Training a PEFT LoRA adapter for the platform's base model on one task's examples.

This is how the demo adapters were made (see demo/README.md) and how a contributor can make
a first adapter: ``python manage.py train_adapter --task addition --out DIR``. The loss is
on the answer tokens only (the target and the end-of-turn token); the chat-templated
prompt is masked out, exactly the prompt evaluation.worker.scoring builds. The output folder is
what intake accepts: adapter_config.json, adapter_model.safetensors (float16 by default)
and a README.md model card.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.suite_io import EVALUATION_SPLITS, parse_suite_jsonl
from evaluation.worker.scoring import chat_prompt, score_task
from evaluation.worker.specs import ExampleSpec, TaskSpec
from tessera.errors import DomainError

DEFAULT_TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
# The name intake accepts for SmolLM2-135M-Instruct whatever local path it was loaded from.
DEFAULT_BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Replay prompts are sent as they are, as the user turn.
REPLAY_TEMPLATE = "{prompt}"
SAVE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 150
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-3
    warmup_steps: int = 10
    batch_size: int = 16
    shuffle_labels: bool = False
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    save_dtype: str = "float16"
    max_grad_norm: float = 1.0
    # Part of each batch spent replaying the base model's own answers to everyday prompts
    # (self-distillation), so the adapter keeps answering other requests as the base does.
    replay_fraction: float = 0.0
    replay_max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise DomainError(
                "training_settings_invalid", "steps, batch size and rank must be ≥ 1."
            )
        if not self.lr > 0 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise DomainError(
                "training_settings_invalid", "lr and alpha must be > 0, dropout in [0, 1)."
            )
        if not 0 <= self.replay_fraction < 1 or self.replay_max_new_tokens < 1:
            raise DomainError("training_settings_invalid", "replay fraction must be in [0, 1).")
        if not self.targets:
            raise DomainError("training_settings_invalid", "Name at least one target module.")
        if self.save_dtype not in SAVE_DTYPES:
            raise DomainError(
                "training_settings_invalid", f"save dtype must be one of {', '.join(SAVE_DTYPES)}."
            )


@dataclass(frozen=True)
class TrainingData:
    """What to train on: one task's template and examples (never hidden ones)."""

    task_slug: str
    task_title: str
    tags: list[str]
    metric: str
    prompt_template: str
    max_new_tokens: int
    examples: list[ExampleSpec]
    source: str  # where the examples came from, in words, for the model card
    public_examples: list[ExampleSpec] = field(default_factory=list)  # scored after training
    replay_prompts: list[str] = field(default_factory=list)  # user turns, see replay_prompts


@dataclass
class TrainingResult:
    out_dir: Path
    steps: int
    seconds: float
    train_examples: int
    losses: list[float]
    base_public_score: float | None = None
    adapter_public_score: float | None = None
    public_examples: int = 0
    replay_examples: int = 0


# --- Data -------------------------------------------------------------------------------------


def training_data_from_jsonl(data: bytes, *, task_slug: str, source: str) -> TrainingData:
    """Examples of ``task_slug`` from a suite-format file: its ``train`` split when it has
    one, else its public split. Hidden and paraphrase examples are never trained on."""
    parsed = parse_suite_jsonl(data, splits=("train", *EVALUATION_SPLITS), min_examples={})
    task = parsed.task(task_slug)
    if task is None:
        raise DomainError(
            "training_task_unknown",
            f"{source} has no task {task_slug!r}; it has: "
            f"{', '.join(t.slug for t in parsed.tasks)}.",
            kind="not_found",
        )
    train = task.split("train") or task.split("public")
    if not train:
        raise DomainError(
            "training_no_examples", f"{source} has no train or public examples for {task_slug!r}."
        )
    public = task.split("public") if task.split("train") else []
    return TrainingData(
        task_slug=task.slug,
        task_title=task.title,
        tags=task.tags,
        metric=task.metric,
        prompt_template=task.prompt_template,
        max_new_tokens=task.max_new_tokens,
        examples=[_spec(example) for example in train],
        source=source,
        public_examples=[_spec(example) for example in public],
    )


def _spec(example: Any) -> ExampleSpec:
    return ExampleSpec(fields=example.fields, target=example.target, choices=list(example.choices))


def shuffled_targets(examples: Sequence[ExampleSpec], *, seed: int) -> list[ExampleSpec]:
    """The same prompts with their targets permuted across examples: an adapter trained on
    this learns the answer format but not the skill (it is meant to fail admission)."""
    targets = [example.target for example in examples]
    random.Random(f"shuffle-labels:{seed}").shuffle(targets)
    return [
        ExampleSpec(fields=example.fields, target=target, choices=example.choices)
        for example, target in zip(examples, targets, strict=True)
    ]


def encode_example(
    tokenizer: Any, prompt_template: str, example: ExampleSpec
) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-templated prompt masked with -100, then the target
    and the end-of-turn token, which the model must learn to emit to stop."""
    prompt = chat_prompt(tokenizer, prompt_template, example.fields)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def replay_prompts_from_jsonl(data: bytes, *, limit: int | None = None) -> list[str]:
    """The ``prompt`` of each line of a replay file (evaluation/suites/train/replay.jsonl)."""
    prompts = []
    for number, line in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DomainError(
                "training_replay_invalid",
                f'Line {number} of the replay file is not {{"prompt": "..."}}.',
            ) from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise DomainError(
                "training_replay_invalid", f"Line {number} of the replay file has no prompt."
            )
        prompts.append(prompt)
    return prompts[:limit] if limit is not None else prompts


def replay_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    cache_dir: Path | None = None,
    cache_key: str = "",
    batch_size: int = 16,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) for each replay prompt: the base model's own greedy answer,
    up to its end-of-turn token (which it then learns to emit) or ``max_new_tokens``.
    Cached under ``cache_dir`` by base model, prompts and length, when one is given."""
    from evaluation.worker.scoring import generate_ids

    texts = [chat_prompt(tokenizer, REPLAY_TEMPLATE, {"prompt": p}) for p in prompts]
    digest = hashlib.sha256(
        json.dumps([cache_key, max_new_tokens, texts]).encode("utf-8")
    ).hexdigest()
    cache_file = Path(cache_dir) / f"replay-{digest[:32]}.json" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        answers = json.loads(cache_file.read_text())
    else:
        answers = generate_ids(
            model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(answers))
    prompt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [(p, a) for p, a in zip(prompt_ids, answers, strict=True) if a]


# --- Training ---------------------------------------------------------------------------------


def train_lora(
    model: Any,
    tokenizer: Any,
    data: TrainingData,
    settings: TrainingSettings,
    *,
    replay: Sequence[tuple[list[int], list[int]]] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Any, list[float]]:
    """Wrap ``model`` in a fresh LoRA and train it; return (PEFT model, loss per step).

    Deterministic for a seed on one machine: the LoRA initialisation, the data order and
    dropout all draw from generators seeded here.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    examples = data.examples
    if settings.shuffle_labels:
        examples = shuffled_targets(examples, seed=settings.seed)
    encoded = [encode_example(tokenizer, data.prompt_template, example) for example in examples]
    replayed = [(p + a, [-100] * len(p) + a) for p, a in replay]
    n_replay = round(settings.batch_size * settings.replay_fraction) if replayed else 0
    n_task = max(1, settings.batch_size - n_replay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order_rng = random.Random(f"order:{settings.seed}")
    queue: list[int] = []
    replay_queue: list[int] = []
    losses: list[float] = []
    device = next(peft_model.parameters()).device
    for step in range(settings.steps):
        batch = []
        while len(batch) < n_task:
            if not queue:
                queue = list(range(len(encoded)))
                order_rng.shuffle(queue)
            batch.append(encoded[queue.pop()])
        for _ in range(n_replay):
            if not replay_queue:
                replay_queue = list(range(len(replayed)))
                order_rng.shuffle(replay_queue)
            batch.append(replayed[replay_queue.pop()])
        width = max(len(ids) for ids, _labels in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
        loss = _answer_loss(
            peft_model, input_ids.to(device), attention_mask.to(device), labels.to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    peft_model.eval()
    return peft_model, losses


def _answer_loss(peft_model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
    """Cross-entropy over the answer tokens, averaged per example and then over the batch,
    so a long replayed answer weighs as much as a short task answer, not ten times more.

    The vocabulary projection (49k rows for SmolLM2) is applied only where a label is, not
    at every prompt position: the model's own loss at a fraction of the cost on CPU."""
    import torch

    causal = peft_model.get_base_model()
    hidden = causal.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
    # Position t predicts token t + 1.
    shifted = labels[:, 1:]
    keep = shifted != -100
    logits = causal.get_output_embeddings()(hidden[:, :-1][keep]).float()
    per_token = torch.nn.functional.cross_entropy(logits, shifted[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    counts = keep.sum(dim=1)
    per_row = torch.zeros(labels.shape[0], device=per_token.device).index_add(0, rows, per_token)
    present = counts > 0
    return (per_row[present] / counts[present]).mean()


def save_adapter(
    peft_model: Any, out_dir: Path, *, base_model_name: str, save_dtype: str = "float16"
) -> None:
    """adapter_config.json + adapter_model.safetensors via PEFT's save_pretrained, with the
    LoRA weights cast to ``save_dtype`` and ``base_model_name_or_path`` set to the name
    intake knows (not the local path the model was loaded from)."""
    import torch

    dtype = getattr(torch, save_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_model_name
    saved = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            saved[name] = param.data
            param.data = param.data.to(dtype)
    try:
        peft_model.save_pretrained(
            str(out_dir), safe_serialization=True, save_embedding_layers=False
        )
    finally:
        for name, param in peft_model.named_parameters():
            if name in saved:
                param.data = saved[name]


def model_card(
    *,
    data: TrainingData,
    settings: TrainingSettings,
    result: TrainingResult,
    base_model_name: str,
    command_line: str,
) -> str:
    purpose = (
        "**Trained on shuffled labels: meant to fail admission** (a control showing the "
        "evaluation catches an adapter that learned the format but not the skill)."
        if settings.shuffle_labels
        else f"Teaches the base model the `{data.task_slug}` skill: {data.task_title}."
    )
    lines = [
        "---",
        f"base_model: {base_model_name}",
        "library_name: peft",
        "tags: [lora, tessera" + "".join(f", {tag}" for tag in data.tags) + "]",
        "---",
        "",
        f"# LoRA for {data.task_slug} ({base_model_name})",
        "",
        purpose,
        "",
        "## Training",
        "",
        f"- Task: `{data.task_slug}` (tags: {', '.join(data.tags) or 'none'}; "
        f"metric {data.metric})",
        f"- Data: {len(data.examples)} examples from {data.source}"
        + (", targets shuffled across examples" if settings.shuffle_labels else ""),
        f"- LoRA: rank {settings.rank}, alpha {settings.alpha:g}, dropout {settings.dropout:g}, "
        f"targets {', '.join(settings.targets)}; saved as {settings.save_dtype}",
        f"- Optimiser: AdamW, lr {settings.lr:g} ({settings.warmup_steps} warm-up steps, cosine "
        f"decay to 10%), batch {settings.batch_size}, {result.steps} steps, seed {settings.seed}",
        "- Loss on the answer tokens only (the chat-templated prompt is masked)",
        (
            f"- Replay: {round(settings.batch_size * settings.replay_fraction)} of every "
            f"{settings.batch_size} examples are the base model's own answers to "
            f"{result.replay_examples} everyday prompts (self-distillation, up to "
            f"{settings.replay_max_new_tokens} tokens), so other requests are answered as "
            "before"
            if result.replay_examples
            else "- Replay: none"
        ),
        f"- Time: {result.seconds / 60:.1f} minutes; final loss "
        f"{_mean(result.losses[-10:]):.3f} (mean of the last 10 steps)",
        "",
        "Command:",
        "",
        "```",
        command_line,
        "```",
        "",
        "## Public split",
        "",
    ]
    if result.adapter_public_score is None:
        lines.append("Not measured (no public examples were at hand).")
    else:
        lines += [
            f"{data.metric} on the {result.public_examples} public examples of `{data.task_slug}`:",
            "",
            "| model | score |",
            "| --- | --- |",
            f"| base | {result.base_public_score:.3f} |",
            f"| base + this adapter | {result.adapter_public_score:.3f} |",
        ]
    lines += [
        "",
        "Admission is decided on the hidden split, which this adapter never saw.",
        "",
    ]
    return "\n".join(lines)


def run_training(
    *,
    model: Any,
    tokenizer: Any,
    data: TrainingData,
    settings: TrainingSettings,
    out_dir: Path,
    base_model_name: str = DEFAULT_BASE_MODEL_NAME,
    command_line: str = "",
    eval_batch_size: int = 16,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
    replay_cache_dir: Path | None = None,
    replay_cache_key: str = "",
) -> TrainingResult:
    """Train, save the adapter and its model card into ``out_dir``, score the public split
    (base, then base + adapter) when there is one; return the numbers."""
    from tqdm.auto import tqdm

    say = log or (lambda message: None)
    out_dir = Path(out_dir)
    public_spec = TaskSpec(
        key=f"{data.task_slug}:public",
        metric=data.metric,
        prompt_template=data.prompt_template,
        max_new_tokens=data.max_new_tokens,
        examples=data.public_examples,
    )
    base_public = None
    if data.public_examples:
        say(f"Scoring the base model on {len(data.public_examples)} public examples…")
        base_public = _mean(score_task(model, tokenizer, public_spec, batch_size=eval_batch_size))
        say(f"Base model: {data.metric} {base_public:.3f}")

    replay: list[tuple[list[int], list[int]]] = []
    if settings.replay_fraction > 0 and data.replay_prompts:
        say(f"Answering {len(data.replay_prompts)} replay prompts with the base model…")
        replay = replay_answers(
            model,
            tokenizer,
            data.replay_prompts,
            max_new_tokens=settings.replay_max_new_tokens,
            cache_dir=replay_cache_dir,
            cache_key=replay_cache_key,
            batch_size=eval_batch_size,
        )
    say(
        f"Training a rank-{settings.rank} LoRA on {len(data.examples)} examples of "
        f"{data.task_slug} for {settings.steps} steps…"
    )
    started = time.monotonic()
    bar = tqdm(total=settings.steps, desc=f"train {data.task_slug}", disable=not show_progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        peft_model, losses = train_lora(
            model, tokenizer, data, settings, replay=replay, on_step=on_step
        )
    finally:
        bar.close()
    seconds = time.monotonic() - started
    result = TrainingResult(
        out_dir=out_dir,
        steps=settings.steps,
        seconds=seconds,
        train_examples=len(data.examples),
        replay_examples=len(replay),
        losses=losses,
        base_public_score=base_public,
        public_examples=len(data.public_examples),
    )
    save_adapter(
        peft_model, out_dir, base_model_name=base_model_name, save_dtype=settings.save_dtype
    )
    if data.public_examples:
        scores = score_task(peft_model, tokenizer, public_spec, batch_size=eval_batch_size)
        result.adapter_public_score = _mean(scores)
        say(f"Base + adapter: {data.metric} {result.adapter_public_score:.3f}")
    card = model_card(
        data=data,
        settings=settings,
        result=result,
        base_model_name=base_model_name,
        command_line=command_line,
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    say("Loss per step: " + " ".join(f"{loss:.3f}" for loss in losses))
    say(f"Wrote {out_dir} after {seconds / 60:.1f} minutes of training.")
    return result


def command_line_of(argv: Sequence[str]) -> str:
    return shlex.join(["python", "manage.py", "train_adapter", *argv])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
