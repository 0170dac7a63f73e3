"""evaluation.worker.scoring: normalisation, the four metrics on a tiny random Llama, batching,
PEFT models, and the paired bootstrap.

The tiny model's weights are random but seeded, so its greedy answers are fixed: the
hand-made cases below are built from what it actually says (an answer it gives is an exact
match; its likeliest next token is the choice it must pick).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.worker.scoring import (
    TemplateError,
    bootstrap_delta_ci,
    chat_prompt,
    contains,
    continuation_logliks,
    exact_match,
    generate_answers,
    normalize_answer,
    render_prompt,
    score_task,
    template_fields,
)
from evaluation.worker.specs import ExampleSpec, TaskSpec
from tests.support.tiny_model import save_tiny_llama

TEMPLATE = "Question: {question}"
QUESTIONS = [
    "What is 123 + 456?",
    "Add 7 and 8.",
    "The capital of France is?",
    "hello",
    "Translate hello to French, please, and then explain why in one sentence.",
    "x",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # At its initial scale (std 0.02) the random model answers every prompt with newlines;
    # larger seeded weights make its answers depend on the prompt, which the cases need.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def task_of(metric: str, examples: list[ExampleSpec], *, max_new_tokens: int = 6) -> TaskSpec:
    return TaskSpec(
        key=f"test:{metric}",
        metric=metric,
        prompt_template=TEMPLATE,
        max_new_tokens=max_new_tokens,
        examples=examples,
    )


def answers_of(model, tokenizer, questions: list[str], *, max_new_tokens: int = 6, batch_size=4):
    prompts = [chat_prompt(tokenizer, TEMPLATE, {"question": q}) for q in questions]
    return generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )


# --- Normalisation and templates ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("579", "579"),
        ("  579.  ", "579"),
        ("Paris!", "paris"),
        ("The   Answer\tis 42.", "the answer is 42"),
        ("579\nBecause 123 + 456 = 579.", "579"),
        ("\n\n  March 7, 2024.\nmore", "march 7, 2024"),
        ("3, 7, 19, 42, 88", "3, 7, 19, 42, 88"),
        ("Yes?!", "yes"),
        ("", ""),
        ("   \n  ", ""),
    ],
)
def test_answers_are_normalised_to_their_first_line_lowercased_without_trailing_punctuation(
    raw, normalised
):
    assert normalize_answer(raw) == normalised


def test_exact_match_and_contains_compare_normalised_answers():
    assert exact_match("  1,234.\nmore text", "1,234") == 1.0
    assert exact_match("The answer is 579.", "579") == 0.0
    assert contains("The capital of France is Paris.", "Paris") == 1.0
    assert contains("Paris?\nNo, Lyon.", "lyon") == 0.0  # only the first line counts
    assert contains("anything", "   ") == 0.0  # an empty target never matches


def test_templates_take_plain_field_names_only():
    assert template_fields("{question}\nAnswer with {n:>3} digits.") == {"question", "n"}
    assert render_prompt("{a} + {b}", {"a": 1, "b": 2, "unused": 3}) == "1 + 2"
    for bad in ["{a.__class__}", "{a[0]}", "{}", "{0}", "{a!r}", "{a:{b}}", "{unclosed"]:
        with pytest.raises(TemplateError):
            template_fields(bad)
    with pytest.raises(TemplateError):
        render_prompt("{a} {b}", {"a": 1})


def test_prompts_are_the_filled_template_as_a_user_turn_with_the_generation_prompt(tiny):
    _model, tokenizer = tiny
    prompt = chat_prompt(tokenizer, TEMPLATE, {"question": "Add 7 and 8."})
    assert prompt == "<|im_start|>user\nQuestion: Add 7 and 8.<|im_end|>\n<|im_start|>assistant\n"


# --- Generative metrics --------------------------------------------------------------------------


def test_exact_match_scores_one_for_the_models_own_answer_and_zero_otherwise(tiny):
    model, tokenizer = tiny
    answers = answers_of(model, tokenizer, QUESTIONS)
    assert all(normalize_answer(answer) for answer in answers)  # the cases are meaningful
    examples = [
        ExampleSpec(fields={"question": q}, target=a if i % 2 == 0 else "no such answer")
        for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]

    scores = score_task(model, tokenizer, task_of("exact_match", examples), batch_size=4)

    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_contains_scores_one_when_the_answer_holds_the_target(tiny):
    model, tokenizer = tiny
    answers = answers_of(model, tokenizer, QUESTIONS[:3])
    examples = [
        ExampleSpec(fields={"question": QUESTIONS[0]}, target=normalize_answer(answers[0])[1:3]),
        ExampleSpec(fields={"question": QUESTIONS[1]}, target="definitely absent"),
        ExampleSpec(fields={"question": QUESTIONS[2]}, target=answers[2].strip().upper()),
    ]

    scores = score_task(model, tokenizer, task_of("contains", examples), batch_size=2)

    assert scores == [1.0, 0.0, 1.0]


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    one_by_one = answers_of(model, tokenizer, QUESTIONS, max_new_tokens=12, batch_size=1)
    batched = answers_of(model, tokenizer, QUESTIONS, max_new_tokens=12, batch_size=len(QUESTIONS))
    in_threes = answers_of(model, tokenizer, QUESTIONS, max_new_tokens=12, batch_size=3)

    assert batched == one_by_one == in_threes


def test_scoring_is_deterministic_and_reports_progress_per_example(tiny):
    model, tokenizer = tiny
    examples = [ExampleSpec(fields={"question": q}, target="x") for q in QUESTIONS]
    seen: list[int] = []

    first = score_task(
        model, tokenizer, task_of("exact_match", examples), batch_size=4, progress=seen.append
    )
    second = score_task(model, tokenizer, task_of("exact_match", examples), batch_size=4)

    assert first == second
    assert seen == [4, 2]


def test_scoring_uses_eval_mode_and_leaves_the_model_as_it_was(tiny):
    model, tokenizer = tiny
    examples = [ExampleSpec(fields={"question": q}, target="x") for q in QUESTIONS[:2]]
    model.train()
    try:
        score_task(model, tokenizer, task_of("mean_loglik", examples), batch_size=2)
        assert model.training
    finally:
        model.eval()


# --- Log-likelihood metrics ----------------------------------------------------------------------


def reference_mean_loglik(model, tokenizer, prompt: str, continuation: str) -> float:
    """Straightforward, unbatched: the model over prompt + continuation in one piece."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = sum(
        float(log_probs[len(prompt_ids) + k - 1, token]) for k, token in enumerate(cont_ids)
    )
    return total / len(cont_ids)


def test_mean_loglik_is_the_mean_token_log_likelihood_of_the_target(tiny):
    model, tokenizer = tiny
    targets = ["Paris is the capital of France.", "579", "zq zq zq zq"]
    examples = [
        ExampleSpec(fields={"question": q}, target=t)
        for q, t in zip(QUESTIONS[:3], targets, strict=True)
    ]

    scores = score_task(model, tokenizer, task_of("mean_loglik", examples), batch_size=2)

    for score, example in zip(scores, examples, strict=True):
        prompt = chat_prompt(tokenizer, TEMPLATE, example.fields)
        expected = reference_mean_loglik(model, tokenizer, prompt, example.target)
        assert score < 0
        assert score == pytest.approx(expected, abs=1e-4)


def test_mean_loglik_is_higher_for_what_the_model_would_say(tiny):
    model, tokenizer = tiny
    own = answers_of(model, tokenizer, [QUESTIONS[0]], max_new_tokens=8)[0]
    assert own
    examples = [
        ExampleSpec(fields={"question": QUESTIONS[0]}, target=own),
        ExampleSpec(fields={"question": QUESTIONS[0]}, target="zq Xv 9#"),
    ]

    preferred, other = score_task(model, tokenizer, task_of("mean_loglik", examples), batch_size=2)

    assert other < preferred < 0


def single_token_texts(tokenizer, ids) -> list[tuple[int, str]]:
    """Token ids whose text encodes back to exactly that one token."""
    out = []
    for token in ids:
        text = tokenizer.decode([int(token)])
        if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == [int(token)]:
            out.append((int(token), text))
    return out


def test_multiple_choice_picks_the_choice_the_model_finds_likeliest(tiny):
    model, tokenizer = tiny
    prompt = chat_prompt(tokenizer, TEMPLATE, {"question": QUESTIONS[0]})
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ranking = torch.argsort(model(input_ids=ids).logits[0, -1], descending=True)
    candidates = single_token_texts(tokenizer, ranking.tolist())
    (_, likeliest), (_, unlikeliest) = candidates[0], candidates[-1]
    choices = [unlikeliest, likeliest]
    examples = [
        ExampleSpec(fields={"question": QUESTIONS[0]}, target=likeliest, choices=choices),
        ExampleSpec(fields={"question": QUESTIONS[0]}, target=unlikeliest, choices=choices),
    ]

    scores = score_task(model, tokenizer, task_of("multiple_choice", examples), batch_size=3)

    assert scores == [1.0, 0.0]


def test_multiple_choice_scores_are_zero_or_one_and_sum_log_likelihoods(tiny):
    model, tokenizer = tiny
    choices = ["Paris", "Lyon", "the quick brown fox"]
    examples = [
        ExampleSpec(fields={"question": q}, target=choices[i % 3], choices=choices)
        for i, q in enumerate(QUESTIONS)
    ]

    seen: list[int] = []
    scores = score_task(
        model, tokenizer, task_of("multiple_choice", examples), batch_size=4, progress=seen.append
    )

    assert sum(seen) == len(examples) and len(seen) > 1
    assert set(scores) <= {0.0, 1.0}
    for score, example in zip(scores, examples, strict=True):
        prompt = chat_prompt(tokenizer, TEMPLATE, example.fields)
        sums, _ = continuation_logliks(
            model, tokenizer, [(prompt, c) for c in choices], batch_size=1
        )
        assert score == float(choices[int(np.argmax(sums))] == example.target)


def test_an_unknown_metric_or_an_empty_task_is_handled(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="metric"):
        score_task(model, tokenizer, task_of("bleu", []), batch_size=1)
    assert score_task(model, tokenizer, task_of("exact_match", []), batch_size=1) == []


# --- PEFT models ------------------------------------------------------------------------------


def test_a_peft_model_is_scored_like_any_model(tiny, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    base_path = tmp_path / "base"
    model.save_pretrained(base_path)
    fresh = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    peft_model.eval()
    answers = answers_of(model, tokenizer, QUESTIONS[:3])
    generative = [
        ExampleSpec(fields={"question": q}, target=a)
        for q, a in zip(QUESTIONS[:3], answers, strict=True)
    ]
    loglik = [ExampleSpec(fields={"question": q}, target="Paris.") for q in QUESTIONS[:3]]

    # A fresh LoRA (B = 0) changes nothing.
    assert score_task(peft_model, tokenizer, task_of("exact_match", generative), batch_size=2) == [
        1.0,
        1.0,
        1.0,
    ]
    base_ll = score_task(model, tokenizer, task_of("mean_loglik", loglik), batch_size=2)
    same_ll = score_task(peft_model, tokenizer, task_of("mean_loglik", loglik), batch_size=2)
    assert same_ll == pytest.approx(base_ll, abs=1e-5)

    # Trained (here: perturbed) LoRA weights change the scores.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    moved = score_task(peft_model, tokenizer, task_of("mean_loglik", loglik), batch_size=2)
    assert all(math.isfinite(s) and s < 0 for s in moved)
    assert moved != pytest.approx(base_ll, abs=1e-3)


# --- Bootstrap ----------------------------------------------------------------------------------


def test_the_bootstrap_ci_contains_the_true_delta_of_a_known_case():
    rng = np.random.default_rng(42)
    n = 400
    base = rng.binomial(1, 0.2, n).astype(float)
    adapter = np.where(rng.random(n) < 0.3, 1.0, base)  # +0.3 x (1 - 0.2) = +0.24 expected

    delta, low, high = bootstrap_delta_ci(base, adapter, samples=2000, seed=0)

    assert delta == pytest.approx(float(np.mean(adapter - base)))
    assert low < 0.24 < high
    assert low < delta < high
    assert 0.05 < high - low < 0.2  # about 4 standard errors wide


def test_the_bootstrap_ci_is_a_point_when_every_difference_is_equal():
    delta, low, high = bootstrap_delta_ci([0.0] * 50, [0.25] * 50, samples=500)

    assert delta == low == high == pytest.approx(0.25)


def test_the_bootstrap_is_deterministic_for_a_seed_and_paired():
    base = [0, 1, 0, 1, 1, 0, 0, 1] * 10
    adapter = list(base)  # identical: every paired difference is 0, whatever the spread
    assert bootstrap_delta_ci(base, adapter, samples=1000) == (0.0, 0.0, 0.0)

    adapter = [b + 0.1 * ((i * 7919) % 13) - 0.5 for i, b in enumerate(base)]
    first = bootstrap_delta_ci(base, adapter, samples=1000, seed=7)
    assert first == bootstrap_delta_ci(base, adapter, samples=1000, seed=7)
    assert first != bootstrap_delta_ci(base, adapter, samples=1000, seed=8)
    narrow = bootstrap_delta_ci(base, adapter, samples=1000, seed=7, level=0.5)
    assert first[1] <= narrow[1] <= narrow[2] <= first[2]


def test_the_bootstrap_refuses_mismatched_or_empty_inputs():
    with pytest.raises(ValueError):
        bootstrap_delta_ci([1, 0], [1], samples=10)
    with pytest.raises(ValueError):
        bootstrap_delta_ci([], [], samples=10)
    with pytest.raises(ValueError):
        bootstrap_delta_ci([1], [0], samples=10, level=1.5)
