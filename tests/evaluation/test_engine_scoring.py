"""The evaluation child scores with the serving engine (multilora), not with PEFT: the same
adapter must score the same either way, and the base model's rows and the adapter's rows
mixed in one batch must score as they do apart."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.worker.scoring import (
    chat_prompt,
    generate_answers,
    score_task,
    score_task_variants,
)
from evaluation.worker.specs import ExampleSpec, TaskSpec
from multilora import NO_ADAPTER, LoraRegistry, MultiLoraModel
from tests.multilora.test_engine import random_adapter
from tests.support.tiny_model import save_tiny_llama

TEMPLATE = "Question: {question}"
QUESTIONS = [
    "What is 123 + 456?",
    "Sort: 9 3 7",
    "Reverse the words: castle salt grape",
    "Spell 42 in words.",
    "Convert 3 km to meters.",
    "Write 2024-03-05 in words.",
    "hi",
    "Name a colour of the sky, and say why it is that colour at noon.",
]


def _loud(model):
    # At its initial scale the random model answers every prompt with newlines; larger
    # seeded weights make its answers depend on the prompt (as in test_scoring).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """(plain model, PEFT model with the adapter, engine-wrapped model, its slot, tokenizer):
    three copies of the same weights, one adapter."""
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter = random_adapter(
        "a", seed=5, rank=4, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    )
    plain = _loud(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    peft = get_peft_model(
        _loud(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)),
        LoraConfig(**adapter.config),
    )
    loaded = set_peft_model_state_dict(peft, load(adapter.weights))
    assert not loaded.unexpected_keys
    peft.eval()
    engine_model = _loud(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    registry = LoraRegistry.for_model(engine_model)
    lora = MultiLoraModel(engine_model, registry)
    slot = registry.add("a", lora_config=adapter.config, tensors=load(adapter.weights))
    return plain, peft, engine_model, lora, slot, tokenizer


def task_of(metric: str, *, max_new_tokens: int = 6) -> TaskSpec:
    if metric == "multiple_choice":
        examples = [
            ExampleSpec(fields={"question": q}, target="yes", choices=["yes", "no", "maybe"])
            for q in QUESTIONS
        ]
    else:
        examples = [ExampleSpec(fields={"question": q}, target="579") for q in QUESTIONS]
    return TaskSpec(
        key=f"t:{metric}",
        metric=metric,
        prompt_template=TEMPLATE,
        max_new_tokens=max_new_tokens,
        examples=examples,
    )


def test_the_engine_generates_exactly_the_answers_peft_generates_for_the_same_adapter(models):
    plain, peft, engine_model, lora, slot, tokenizer = models
    prompts = [chat_prompt(tokenizer, TEMPLATE, {"question": q}) for q in QUESTIONS]
    with_peft = generate_answers(peft, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    base = generate_answers(plain, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    # One batch: every prompt once for the base model and once with the adapter.
    both = generate_answers(
        engine_model,
        tokenizer,
        prompts + prompts,
        max_new_tokens=8,
        batch_size=5,
        slots=[NO_ADAPTER] * len(prompts) + [slot] * len(prompts),
        bind=lora.adapters,
    )
    assert both[len(prompts) :] == with_peft
    assert both[: len(prompts)] == base
    assert with_peft != base  # the adapter changes the answers, so the comparison means something


@pytest.mark.parametrize("metric", ["exact_match", "multiple_choice", "mean_loglik"])
def test_engine_scores_of_base_and_adapter_in_mixed_batches_equal_the_scores_apart(models, metric):
    plain, peft, engine_model, lora, slot, tokenizer = models
    task = task_of(metric)
    base_apart = score_task(plain, tokenizer, task, batch_size=4)
    peft_apart = score_task(peft, tokenizer, task, batch_size=4)
    reported: list[int] = []
    base_mixed, adapter_mixed = score_task_variants(
        engine_model,
        tokenizer,
        task,
        variants=[NO_ADAPTER, slot],
        bind=lora.adapters,
        batch_size=4,
        progress=reported.append,
    )
    assert adapter_mixed == pytest.approx(peft_apart, abs=1e-4)
    assert base_mixed == pytest.approx(base_apart, abs=1e-4)
    assert sum(reported) == 2 * len(QUESTIONS)
    if metric == "mean_loglik":
        assert adapter_mixed != pytest.approx(base_mixed, abs=1e-3)


def test_several_variants_without_a_bind_are_refused(models):
    plain, *_rest, tokenizer = models
    with pytest.raises(ValueError, match="bind"):
        score_task_variants(plain, tokenizer, task_of("exact_match"), variants=[0, 1], batch_size=2)
