"""Metrics and scoring: pure functions over a loaded model and its tokenizer.

Nothing here touches the database or Django, so the sandboxed child process can import it
with a model it loaded itself. The model may be a plain transformers model or a PEFT model
wrapping one; only ``generate``, ``__call__`` (logits), ``parameters`` and ``eval`` are used.

Prompts are the task's ``prompt_template`` filled with an example's fields, wrapped as one
user turn by the tokenizer's chat template (with the generation prompt). Generation is
greedy, batched with left padding and deterministic. Log-likelihoods are summed over the
continuation's tokens, which follow the chat-templated prompt directly (the assistant turn).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluation.worker.specs import ExampleSpec, TaskSpec

if TYPE_CHECKING:
    import torch

METRICS = ("exact_match", "contains", "multiple_choice", "mean_loglik", "parts")
GENERATIVE_METRICS = frozenset({"exact_match", "contains", "parts"})
# A ``parts`` target holds one part a line: no single-skill answer spans two lines.
PARTS_SEPARATOR = "\n"

_TRAILING_PUNCTUATION = ".,;:!?。"
_WHITESPACE = re.compile(r"\s+")
_BOOTSTRAP_CHUNK_CELLS = 4_000_000  # resampled means computed this many cells at a time


# --- Templates --------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A prompt template that is not a plain ``str.format`` template over simple names."""


def template_fields(template: str) -> set[str]:
    """The field names ``template`` uses. Only plain names are allowed: no attribute or
    index access (``{a.b}``, ``{a[0]}``), no positional fields, no conversions; a format
    spec is allowed (``{n:>3}``) as long as it is itself plain."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(str(exc)) from exc
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(f"{{{name}}} is not a plain field name")
        if conversion is not None:
            raise TemplateError(f"{{{name}!{conversion}}}: conversions are not allowed")
        if spec and ("{" in spec or "}" in spec):
            raise TemplateError(f"{{{name}:{spec}}}: nested fields are not allowed")
        names.add(name)
    return names


def render_prompt(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` with ``fields`` (only plain names; see template_fields)."""
    missing = template_fields(template) - set(fields)
    if missing:
        raise TemplateError(f"missing fields: {', '.join(sorted(missing))}")
    return template.format_map(dict(fields))


def chat_prompt(tokenizer: Any, template: str, fields: Mapping[str, Any]) -> str:
    """The text the model sees: the filled template as one user turn, chat-templated, with
    the assistant's generation prompt at the end."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": render_prompt(template, fields)}],
        tokenize=False,
        add_generation_prompt=True,
    )


# --- Answers --------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """First line of the answer, stripped, lowercased, whitespace collapsed, trailing
    punctuation removed: "  The Answer is 42.\\nbecause…" → "the answer is 42"."""
    text = text.strip()
    first = text.split("\n", 1)[0] if text else ""
    first = _WHITESPACE.sub(" ", first.strip().lower())
    return first.rstrip(_TRAILING_PUNCTUATION).strip()


def exact_match(answer: str, target: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(target))


def contains(answer: str, target: str) -> float:
    """Whether the (normalised) first line of the answer contains the normalised target."""
    needle = normalize_answer(target)
    return float(bool(needle) and needle in normalize_answer(answer))


def target_parts(target: str) -> list[str]:
    """The parts of a ``parts`` target: its lines, stripped, blank ones dropped."""
    return [line.strip() for line in target.split(PARTS_SEPARATOR) if line.strip()]


def part_found(part: str, answer: str) -> bool:
    """Whether the normalised ``part`` is in the normalised answer, as a whole: ``contains``'s
    normalisation, but over the whole answer (its lines joined by spaces: the parts are
    asked for on lines of their own), and a part that starts or ends with a letter or digit
    must not run on into one, so "742" is not found in "742000" (a chained task's second
    part often starts with its first)."""
    needle = normalize_answer(part)
    if not needle:
        return False
    haystack = normalize_answer(_WHITESPACE.sub(" ", answer))
    left = r"(?<!\w)" if needle[0].isalnum() else ""
    right = r"(?!\w)" if needle[-1].isalnum() else ""
    return re.search(left + re.escape(needle) + right, haystack) is not None


def parts(answer: str, target: str) -> float:
    """The fraction of the target's parts (see target_parts) found in the answer; an
    example is solved when every part is (1.0)."""
    needles = target_parts(target)
    if not needles:
        return 0.0
    return sum(part_found(part, answer) for part in needles) / len(needles)


_GENERATIVE: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "parts": parts,
}


# --- Scoring ----------------------------------------------------------------------------------


def score_task(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Per-example scores of ``model`` on ``task``, in the task's example order.

    exact_match / contains: 1.0 or 0.0 on the greedy answer (``task.max_new_tokens``);
    parts: the fraction of the target's parts found in the greedy answer (0.0 to 1.0);
    multiple_choice: 1.0 when the target is the choice with the highest summed
    log-likelihood (the first one on a tie); mean_loglik: the target's mean log-likelihood
    per token (negative; higher is better). ``progress``, when given, is called after each
    batch with the number of examples just finished (so the calls sum to len(examples)).
    """
    return score_task_variants(
        model, tokenizer, task, variants=[0], batch_size=batch_size, progress=progress
    )[0]


# Binds a batch's rows to model variants (one slot per row) for the forwards inside it;
# multilora.MultiLoraModel.adapters is one.
Bind = Callable[[list[int]], AbstractContextManager[Any]]


def score_task_variants(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    *,
    variants: Sequence[int],
    batch_size: int,
    bind: Bind | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """``score_task`` for several variants of one model at once: the scores of each
    variant (e.g. the base model and every adapter, by engine slot) in ``variants``' order.

    Every (variant, example) is one row, and rows of different variants share batches: a
    batch's forwards run inside ``bind(slots)`` with each row's slot, so the base model and
    any number of adapters are scored in the same forwards. Rows are ordered by length with
    ties kept together, so one prompt's variants usually share a batch. ``progress`` counts
    rows (variants × examples). Without ``bind`` only one variant makes sense.
    """
    if task.metric not in METRICS:
        raise ValueError(f"unknown metric {task.metric!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if bind is None and len(variants) != 1:
        raise ValueError("several variants need a bind")
    examples = task.examples
    if not examples or not variants:
        return [[] for _ in variants]
    prompts = [chat_prompt(tokenizer, task.prompt_template, ex.fields) for ex in examples]
    rows = [(v, i) for v in range(len(variants)) for i in range(len(examples))]
    row_prompts = [prompts[i] for _, i in rows]
    row_slots = [int(variants[v]) for v, _ in rows]
    row_examples = [examples[i] for _, i in rows]
    scores: list[float]
    with _eval_mode(model):
        if task.metric in GENERATIVE_METRICS:
            answers = generate_answers(
                model,
                tokenizer,
                row_prompts,
                max_new_tokens=task.max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                slots=row_slots,
                bind=bind,
            )
            metric = _GENERATIVE[task.metric]
            scores = [
                metric(answer, ex.target) for answer, ex in zip(answers, row_examples, strict=True)
            ]
        elif task.metric == "multiple_choice":
            scores = _score_multiple_choice(
                model, tokenizer, row_prompts, row_examples, batch_size, progress, row_slots, bind
            )
        else:
            pairs = [
                (prompt, ex.target) for prompt, ex in zip(row_prompts, row_examples, strict=True)
            ]
            sums, counts = continuation_logliks(
                model,
                tokenizer,
                pairs,
                batch_size=batch_size,
                progress=progress,
                slots=row_slots,
                bind=bind,
            )
            scores = [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]
    n = len(examples)
    return [scores[v * n : (v + 1) * n] for v in range(len(variants))]


def score_composed(
    engine: Any,
    task: Any,
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Per-example scores of ``task`` (a ComposedTaskSpec) answered by the serving engine
    (a multilora.Engine) with each example's own composition, in batches of ``batch_size``
    rows sorted by length. A generative metric scores the greedy answer the engine serves
    (the prompts tokenized exactly as ``generate_ids`` tokenizes them, so a ``top1``
    composition scores what the variant path scores); ``multiple_choice`` and
    ``mean_loglik`` score log-likelihoods under the composed model (``composed_logliks``).
    An example whose composition names an adapter the engine does not hold (it was refused
    at load time) scores 0.0. ``progress`` counts examples."""
    if task.metric not in METRICS:
        raise ValueError(f"unknown metric {task.metric!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    tokenizer = engine.tokenizer
    loaded = set(engine.registry.keys())
    prompts: dict[int, str] = {}
    compositions: dict[int, Any] = {}
    for index, (example, fields) in enumerate(zip(task.examples, task.compositions, strict=True)):
        composition = _loaded_composition(fields, loaded)
        if composition is not None:
            compositions[index] = composition
            prompts[index] = chat_prompt(tokenizer, task.prompt_template, example.fields)
    scores = [0.0] * len(task.examples)
    if task.metric in _GENERATIVE:
        _generate_composed(engine, task, prompts, compositions, scores, batch_size, progress)
    else:
        _loglik_composed(engine, task, prompts, compositions, scores, batch_size, progress)
    if progress is not None and len(compositions) < len(task.examples):
        progress(len(task.examples) - len(compositions))
    return scores


def _loaded_composition(fields: Mapping[str, Any], loaded: set[str]) -> Any:
    """The composition ``fields`` describe, or None when they are not one or name an
    adapter that is not ``loaded``."""
    from multilora import Composition, CompositionError

    try:
        composition = Composition(**fields)
    except (CompositionError, TypeError):
        return None
    return composition if set(composition.adapters) <= loaded else None


def _generate_composed(
    engine: Any,
    task: Any,
    prompts: Mapping[int, str],
    compositions: Mapping[int, Any],
    scores: list[float],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> None:
    from multilora import GenerationRequest

    metric = _GENERATIVE[task.metric]
    rows = [(index, _encode(engine.tokenizer, prompt)) for index, prompt in prompts.items()]
    rows.sort(key=lambda row: (len(row[1]), row[0]))
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        results = engine.generate(
            [
                GenerationRequest(
                    prompt_ids=ids,
                    composition=compositions[index],
                    max_new_tokens=task.max_new_tokens,
                )
                for index, ids in batch
            ]
        )
        for (index, _ids), result in zip(batch, results, strict=True):
            scores[index] = metric(result.text, task.examples[index].target)
        if progress is not None:
            progress(len(batch))


def _loglik_composed(
    engine: Any,
    task: Any,
    prompts: Mapping[int, str],
    compositions: Mapping[int, Any],
    scores: list[float],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> None:
    # (example index, continuation): every choice of a multiple-choice example, or the target
    pairs: list[tuple[int, str]] = []
    for index in prompts:
        example = task.examples[index]
        if task.metric == "multiple_choice":
            if not example.choices:
                raise ValueError(f"example {index} of a multiple_choice task has no choices")
            pairs.extend((index, choice) for choice in example.choices)
        else:
            pairs.append((index, example.target))
    sums, counts = composed_logliks(
        engine,
        [(prompts[index], continuation) for index, continuation in pairs],
        [compositions[index] for index, _ in pairs],
        batch_size=batch_size,
        progress=_in_examples(progress, len(pairs), len(prompts)),
    )
    if task.metric == "mean_loglik":
        for (index, _), total, count in zip(pairs, sums, counts, strict=True):
            scores[index] = total / count if count else 0.0
        return
    chosen = _choice_scores([task.examples[index] for index in prompts], sums)
    for index, score in zip(prompts, chosen, strict=True):
        scores[index] = score


def composed_logliks(
    engine: Any,
    pairs: Sequence[tuple[str, str]],
    compositions: Sequence[Any],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """``continuation_logliks`` of each (chat-templated prompt, continuation) under its
    composition (a multilora.Composition the engine holds every adapter of), with the
    engine's own rows: ``top1``, ``topk`` and ``arrow`` one row bound to the composition;
    ``logit`` one row per adapter, whose log-probabilities at each position are combined
    by weight, Σ wᵢ log pᵢ(token), and normalised over the vocabulary, as the engine
    combines them to choose a token. ``progress`` counts pairs. Uses the engine's model
    outside its generation loop: not while the engine generates."""
    import torch

    lanes: list[tuple[int, Any, float]] = []  # (pair, bound row, weight)
    for index, composition in enumerate(compositions):
        lanes.extend((index, row, weight) for row, weight in engine.lanes(composition))
    items = [
        _continuation_item(engine.tokenizer, prompt, continuation) for prompt, continuation in pairs
    ]
    remaining = [0] * len(pairs)
    for index, _row, _weight in lanes:
        remaining[index] += 1
    combined: dict[int, torch.Tensor] = {}
    sums = [0.0] * len(pairs)
    counts = [0] * len(pairs)
    for lane, log_probs, targets in _continuation_log_probs(
        engine.model,
        engine.tokenizer,
        [items[index] for index, _row, _weight in lanes],
        batch_size=batch_size,
        bound=lambda batch: engine.lora.adapters([lanes[j][1] for j in batch]),
        progress=_in_examples(progress, len(lanes), len(pairs)),
    ):
        index, _row, weight = lanes[lane]
        term = log_probs * weight
        combined[index] = combined[index] + term if index in combined else term
        remaining[index] -= 1
        if remaining[index] == 0:  # its last row: the composed model's log-probabilities
            sums[index] = _picked_sum(torch.log_softmax(combined.pop(index), dim=-1), targets)
            counts[index] = len(targets)
    return sums, counts


def _in_examples(
    progress: Callable[[int], None] | None, units: int, examples: int
) -> Callable[[int], None] | None:
    """A progress callback counting ``units`` (rows, choices) that reports to ``progress``
    in ``examples``, in proportion: all of them once every unit is counted."""
    if progress is None or units == 0:
        return None
    state = {"units": 0, "reported": 0}

    def reporter(count: int) -> None:
        state["units"] += count
        whole = min(examples, state["units"] * examples // units)
        if whole > state["reported"]:
            progress(whole - state["reported"])
            state["reported"] = whole

    return reporter


def _bound(bind: Bind | None, slots: Sequence[int] | None, batch: Sequence[int]):
    if bind is None or slots is None:
        return nullcontext()
    return bind([slots[i] for i in batch])


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    slots: Sequence[int] | None = None,
    bind: Bind | None = None,
) -> list[str]:
    """Greedy answers to chat-templated ``prompts`` (text after the prompt, special tokens
    dropped), batched with left padding. Prompts are batched in order of length, to waste
    little on padding, and the answers returned in the prompts' order."""
    ids = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        slots=slots,
        bind=bind,
    )
    return [tokenizer.decode(answer, skip_special_tokens=True) for answer in ids]


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    slots: Sequence[int] | None = None,
    bind: Bind | None = None,
) -> list[list[int]]:
    """The greedy answers' token ids: up to and including the first end-of-sequence token
    when the model emitted one within ``max_new_tokens``, never any padding."""
    import torch
    from transformers import GenerationConfig

    pad_id, eos_ids = _special_ids(model, tokenizer)
    encoded = [_encode(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    device = _device(model)
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        with torch.inference_mode(), _bound(bind, slots, batch):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        for row, i in enumerate(batch):
            new = output[row, width:].tolist()
            # A finished row is padded to the batch's length; cut after its first EOS.
            end = next((k + 1 for k, token in enumerate(new) if token in eos_ids), len(new))
            answers[i] = new[:end]
        if progress is not None:
            progress(len(batch))
    return answers


def continuation_logliks(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    slots: Sequence[int] | None = None,
    bind: Bind | None = None,
) -> tuple[list[float], list[int]]:
    """For each (chat-templated prompt, continuation): the summed log-likelihood of the
    continuation's tokens after the prompt, and their number. Batched with right padding
    (a causal model's earlier positions never see it)."""
    items = [_continuation_item(tokenizer, prompt, continuation) for prompt, continuation in pairs]
    sums = [0.0] * len(items)
    counts = [0] * len(items)
    for i, log_probs, targets in _continuation_log_probs(
        model,
        tokenizer,
        items,
        batch_size=batch_size,
        bound=lambda batch: _bound(bind, slots, batch),
        progress=progress,
    ):
        sums[i] = _picked_sum(log_probs, targets)
        counts[i] = len(targets)
    return sums, counts


def _continuation_item(
    tokenizer: Any, prompt: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(the prompt's ids, the continuation's), tokenized as the variant path does."""
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return _encode(tokenizer, prompt), continuation_ids


def _picked_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).double().sum())


def _continuation_log_probs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    bound: Callable[[list[int]], AbstractContextManager[Any]],
    progress: Callable[[int], None] | None = None,
):
    """For each (prompt ids, continuation ids) item with a non-empty continuation, in
    batches sorted by length: (its index, the log-probabilities [continuation, vocab] that
    predict each continuation token, the continuation's tokens). Each batch's forward runs
    inside ``bound(its item indices)``; items of one length keep their order, so the rows of
    one prompt and continuation usually share a batch."""
    import torch

    pad_id, _ = _special_ids(model, tokenizer)
    device = _device(model)
    order = sorted(range(len(items)), key=lambda i: (sum(map(len, items[i])), i))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(items[i][0]) + len(items[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = items[i][0] + items[i][1]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode(), bound(batch):
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits.float()
        for row, i in enumerate(batch):
            prompt_ids, continuation_ids = items[i]
            if not continuation_ids:
                continue
            first = len(prompt_ids)
            last = first + len(continuation_ids)
            # Token t is predicted by the logits at position t - 1.
            log_probs = torch.log_softmax(logits[row, first - 1 : last - 1], dim=-1)
            yield i, log_probs, input_ids[row, first:last].to(log_probs.device)
        if progress is not None:
            progress(len(batch))


def _score_multiple_choice(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    examples: Sequence[ExampleSpec],
    batch_size: int,
    progress: Callable[[int], None] | None,
    slots: Sequence[int] | None = None,
    bind: Bind | None = None,
) -> list[float]:
    pairs: list[tuple[str, str]] = []
    pair_slots: list[int] = []
    for index, (prompt, example) in enumerate(zip(prompts, examples, strict=True)):
        if not example.choices:
            raise ValueError(f"example {index} of a multiple_choice task has no choices")
        for choice in example.choices:
            pairs.append((prompt, choice))
            pair_slots.append(slots[index] if slots is not None else 0)
    # Choices are batched across examples (in order of length), so progress is reported in
    # examples in proportion to the choices scored.
    sums, _counts = continuation_logliks(
        model,
        tokenizer,
        pairs,
        batch_size=batch_size,
        progress=_in_examples(progress, len(pairs), len(examples)),
        slots=pair_slots if slots is not None else None,
        bind=bind,
    )
    return _choice_scores(examples, sums)


def _choice_scores(examples: Sequence[ExampleSpec], sums: Sequence[float]) -> list[float]:
    """1.0 for each example whose target is its likeliest choice (the first one on a tie),
    from every choice's log-likelihood, the examples' choices one after another."""
    scores: list[float] = []
    cursor = 0
    for example in examples:
        k = len(example.choices)
        best = int(np.argmax(sums[cursor : cursor + k]))
        scores.append(float(example.choices[best] == example.target))
        cursor += k
    return scores


# --- Statistics -------------------------------------------------------------------------------


def bootstrap_delta_ci(
    base: Sequence[float],
    adapter: Sequence[float],
    *,
    samples: int,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Paired bootstrap of mean(adapter - base): ``(delta, ci_low, ci_high)``.

    Resamples the per-example differences with replacement ``samples`` times (numpy,
    vectorised, in chunks to bound memory) and takes the percentile interval at ``level``.
    Deterministic for a given seed.
    """
    base_arr = np.asarray(base, dtype=np.float64)
    adapter_arr = np.asarray(adapter, dtype=np.float64)
    if base_arr.shape != adapter_arr.shape or base_arr.ndim != 1:
        raise ValueError("base and adapter must be 1-D sequences of the same length")
    n = base_arr.size
    if n == 0:
        raise ValueError("no scores to compare")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    diffs = adapter_arr - base_arr
    delta = float(diffs.mean())
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    means = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, rows):
        stop = min(samples, start + rows)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[index].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Rounding can put an all-equal sample's quantiles a hair off the mean.
    return delta, float(min(low, delta)), float(max(high, delta))


# --- Internals --------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already holds every special token the model expects.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(model: Any, tokenizer: Any) -> tuple[int, list[int]]:
    eos_ids: list[int] = []
    for source in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(value, int) and value not in eos_ids:
                eos_ids.append(value)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    return pad_id, eos_ids


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: Any):
    """Score in eval mode (no dropout: deterministic), and leave the model as it was."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
