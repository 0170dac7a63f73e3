"""Compositions scored by the serving engine's own rows (evaluation.worker.scoring
.score_composed, and evaluation.services.composed through the real sandbox): a composition
that is one adapter scores exactly as that adapter does on the variant path, a mix is
measured per example with its own composition, and on a multiple-choice task a mix's
log-likelihoods are the composed model's, the distribution the engine serves tokens from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.services import composed as composed_service
from evaluation.services.outcomes import union_splits
from evaluation.worker.scoring import (
    chat_prompt,
    composed_logliks,
    generate_answers,
    score_composed,
    score_task_variants,
)
from evaluation.worker.specs import ComposedTaskSpec, ExampleSpec, TaskSpec
from multilora import NO_ADAPTER, Composition, Engine, GenerationRequest
from tests.evaluation.test_engine_scoring import QUESTIONS, TEMPLATE, _loud
from tests.evaluation.test_runs import make_task, upload_version
from tests.multilora.test_engine import random_adapter
from tests.support.tiny_model import save_tiny_llama

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _loud(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    engine = Engine(model, tokenizer)
    for key, seed in (("a", 5), ("b", 9)):
        adapter = random_adapter(key, seed=seed, rank=4, targets=TARGETS)
        engine.add_adapter(key, lora_config=adapter.config, tensors=load(adapter.weights))
    return engine


def variant_answers(engine: Engine, slot: int) -> list[str]:
    """What the variant path (HF generate under the binding) answers, per question."""
    from evaluation.worker.scoring import chat_prompt

    prompts = [chat_prompt(engine.tokenizer, TEMPLATE, {"question": q}) for q in QUESTIONS]
    return generate_answers(
        engine.model,
        engine.tokenizer,
        prompts,
        max_new_tokens=6,
        batch_size=3,
        slots=[slot] * len(prompts),
        bind=engine.lora.adapters,
    )


def task_answering(answers: list[str], compositions: list[dict]) -> ComposedTaskSpec:
    """A task whose targets are ``answers``: a composition scores 1.0 on an example exactly
    when it answers what the variant path answered."""
    return ComposedTaskSpec(
        key="t|m",
        metric="exact_match",
        prompt_template=TEMPLATE,
        max_new_tokens=6,
        examples=[
            ExampleSpec(fields={"question": q}, target=a)
            for q, a in zip(QUESTIONS, answers, strict=True)
        ],
        compositions=compositions,
    )


def test_a_one_adapter_composition_answers_as_the_variant_path_does(engine):
    answers = variant_answers(engine, engine.registry.slot_of("a"))
    assert len(set(answers)) > 1  # the loud model's answers depend on the prompt
    single = [{"method": "top1", "adapters": ["a"], "weights": [1.0]}] * len(QUESTIONS)
    # A weighted sum whose second weight is 0 is the first adapter alone, exactly.
    lopsided = [{"method": "topk", "adapters": ["a", "b"], "weights": [1.0, 0.0]}] * len(QUESTIONS)
    for compositions in (single, lopsided):
        scores = score_composed(engine, task_answering(answers, compositions), batch_size=3)
        assert scores == [1.0] * len(QUESTIONS)


def test_each_example_is_answered_with_its_own_composition(engine):
    a = variant_answers(engine, engine.registry.slot_of("a"))
    base = variant_answers(engine, NO_ADAPTER)
    differ = [i for i in range(len(QUESTIONS)) if a[i] != base[i]]
    assert differ, "the adapter changes some answers"
    # Targets are adapter a's answers; the examples where the base model answers otherwise
    # are answered by the base model, the rest by a: only the former miss.
    compositions = [
        {"method": "top1"} if i in differ else {"method": "top1", "adapters": ["a"]}
        for i in range(len(QUESTIONS))
    ]
    scores = score_composed(engine, task_answering(a, compositions), batch_size=4)
    assert [i for i, s in enumerate(scores) if s < 1.0] == differ


def test_a_composition_naming_an_adapter_the_child_does_not_hold_scores_zero(engine):
    answers = variant_answers(engine, engine.registry.slot_of("b"))
    compositions = [{"method": "topk", "adapters": ["b", "gone"], "weights": [0.5, 0.5]}] + [
        {"method": "top1", "adapters": ["b"]}
    ] * (len(QUESTIONS) - 1)
    progress: list[int] = []
    scores = score_composed(
        engine, task_answering(answers, compositions), batch_size=3, progress=progress.append
    )
    assert scores[0] == 0.0 and scores[1:] == [1.0] * (len(QUESTIONS) - 1)
    assert sum(progress) == len(QUESTIONS)


MIXES = {
    "base": Composition.base(),
    "top1": Composition.single("a"),
    "topk": Composition.topk(("a", "b"), (0.6, 0.4)),
    "arrow": Composition.arrow(("a", "b"), k=1, temperature=0.5),
    "logit": Composition.logit(("a", "b"), (0.7, 0.3)),
}
CHOICES = ["yes", "no", "maybe"]


def one_token_words(engine: Engine, count: int) -> list[tuple[str, int]]:
    """``count`` short words the tokenizer writes as one token each, with that token."""
    found = []
    for word in ("a", "the", "yes", "no", "is", "it", "of", "to", "and", "in", "0", "1"):
        ids = engine.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            found.append((word, ids[0]))
    assert len(found) >= count
    return found[:count]


@pytest.mark.parametrize("method", sorted(MIXES))
def test_a_composed_log_likelihood_is_the_distribution_the_engine_serves(engine, method):
    """A one-token continuation's composed log-likelihood equals the log-probability of
    that token in the engine's own first-step distribution for the composition (the
    prefill that ``generate`` samples from, with logit rows combined by weight)."""
    composition = MIXES[method]
    words = one_token_words(engine, 3)
    prompts = [chat_prompt(engine.tokenizer, TEMPLATE, {"question": q}) for q in QUESTIONS[:4]]
    pairs = [(prompt, word) for prompt in prompts for word, _ in words]
    sums, counts = composed_logliks(engine, pairs, [composition] * len(pairs), batch_size=5)
    assert counts == [1] * len(pairs)
    for p, prompt in enumerate(prompts):
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logits = engine.next_token_logits(
            [GenerationRequest(prompt_ids=ids, composition=composition, max_new_tokens=1)]
        )[0]
        served = torch.log_softmax(logits.float(), dim=-1)
        for w, (_word, token) in enumerate(words):
            assert sums[p * len(words) + w] == pytest.approx(float(served[token]), abs=1e-4)


def test_a_mix_changes_the_log_likelihoods_of_its_adapters(engine):
    prompt = chat_prompt(engine.tokenizer, TEMPLATE, {"question": QUESTIONS[0]})
    pairs = [(prompt, "maybe so")]
    alone = {
        key: composed_logliks(engine, pairs, [Composition.single(key)], batch_size=2)[0][0]
        for key in ("a", "b")
    }
    assert alone["a"] != pytest.approx(alone["b"])
    for method in ("topk", "arrow", "logit"):
        (mixed,), _ = composed_logliks(engine, pairs, [MIXES[method]], batch_size=2)
        assert mixed != pytest.approx(alone["a"]) and mixed != pytest.approx(alone["b"])
    # logit of (a, b) at (1, 0) is a alone, per token: a two-token continuation too.
    (lopsided,), _ = composed_logliks(
        engine, pairs, [Composition.logit(("a", "b"), (1.0, 0.0))], batch_size=2
    )
    assert lopsided == pytest.approx(alone["a"], abs=1e-4)


def choice_task(metric: str, targets: list[str], compositions: list[dict]) -> ComposedTaskSpec:
    return ComposedTaskSpec(
        key=f"t|{metric}",
        metric=metric,
        prompt_template=TEMPLATE,
        max_new_tokens=4,
        examples=[
            ExampleSpec(fields={"question": q}, target=t, choices=CHOICES)
            for q, t in zip(QUESTIONS, targets, strict=True)
        ],
        compositions=compositions,
    )


def likeliest_choices(engine: Engine, composition: Composition) -> list[str]:
    """Per question, the choice ``composition`` finds likeliest (computed apart)."""
    found = []
    for question in QUESTIONS:
        prompt = chat_prompt(engine.tokenizer, TEMPLATE, {"question": question})
        pairs = [(prompt, choice) for choice in CHOICES]
        sums, _ = composed_logliks(engine, pairs, [composition] * len(pairs), batch_size=8)
        found.append(CHOICES[max(range(len(CHOICES)), key=lambda i: sums[i])])
    return found


def variant_scores(engine: Engine, key: str, metric: str, examples: list[ExampleSpec]):
    """What the variant path (the evaluation of one adapter) scores ``examples`` at."""
    task = TaskSpec(
        key=f"t:{metric}",
        metric=metric,
        prompt_template=TEMPLATE,
        max_new_tokens=4,
        examples=examples,
    )
    (scores,) = score_task_variants(
        engine.model,
        engine.tokenizer,
        task,
        variants=[engine.registry.slot_of(key)],
        bind=engine.lora.adapters,
        batch_size=4,
    )
    return scores


def test_multiple_choice_compositions_score_the_choice_the_composed_model_finds_likeliest(
    engine,
):
    examples = [
        ExampleSpec(fields={"question": q}, target="yes", choices=CHOICES) for q in QUESTIONS
    ]
    variant = variant_scores(engine, "a", "multiple_choice", examples)
    single = [{"method": "top1", "adapters": ["a"]}] * len(QUESTIONS)
    # One adapter scores as the variant path scores it.
    assert (
        score_composed(
            engine, choice_task("multiple_choice", ["yes"] * len(QUESTIONS), single), batch_size=4
        )
        == variant
    )
    logit = MIXES["logit"]
    picks = likeliest_choices(engine, logit)
    assert len(set(picks)) > 1  # the mix's choice depends on the prompt
    fields = [{"method": "logit", "adapters": ["a", "b"], "weights": [0.7, 0.3]}] * len(QUESTIONS)
    # Each example's target is the mix's likeliest choice, but for the first one.
    targets = [next(c for c in CHOICES if c != picks[0]), *picks[1:]]
    progress: list[int] = []
    scores = score_composed(
        engine,
        choice_task("multiple_choice", targets, fields),
        batch_size=3,
        progress=progress.append,
    )
    assert scores == [0.0] + [1.0] * (len(QUESTIONS) - 1)
    assert sum(progress) == len(QUESTIONS)


def test_a_mean_log_likelihood_under_one_adapter_matches_the_variant_path(engine):
    examples = [ExampleSpec(fields={"question": q}, target="maybe so") for q in QUESTIONS]
    variant = variant_scores(engine, "b", "mean_loglik", examples)
    task = ComposedTaskSpec(
        key="t|ll",
        metric="mean_loglik",
        prompt_template=TEMPLATE,
        max_new_tokens=4,
        examples=examples,
        # The last example names an adapter the engine does not hold: it scores 0.0.
        compositions=[{"method": "top1", "adapters": ["b"]}] * (len(QUESTIONS) - 1)
        + [{"method": "logit", "adapters": ["b", "gone"]}],
    )
    scores = score_composed(engine, task, batch_size=3)
    assert scores[:-1] == pytest.approx(variant[:-1], abs=1e-5)
    assert scores[-1] == 0.0


def test_mixes_are_measured_in_the_sandbox_for_every_part(
    db, tiny_base_model, contributor, fast_eval
):
    from evaluation.models import Example

    make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)])
    choice = make_task(
        slug="choice", metric="multiple_choice", hidden=[{"a": i, "b": 1} for i in range(4)]
    )
    for example in Example.objects.filter(task=choice):
        example.choices = ["no", example.target, "maybe"]
        example.save()
    first = upload_version(contributor, variant=0)
    second = upload_version(contributor, variant=1)
    generated, chosen = sorted(
        (s for s in union_splits() if s.split == "hidden"), key=lambda s: s.task.metric
    )
    assert (generated.task.metric, chosen.task.metric) == ("exact_match", "multiple_choice")
    mix = {"method": "topk", "adapters": [first.pk, second.pk], "weights": [0.7, 0.3]}
    logit = [{**mix, "method": "logit"}] * 3 + [{"method": "top1"}]
    arrow = {"method": "arrow", "adapters": [first.pk, second.pk], "k": 1, "temperature": 1.0}
    parts = [
        composed_service.ComposedPart("embedding/topk", generated, [mix] * 4),
        composed_service.ComposedPart("embedding/logit", generated, logit),
        # A multiple-choice part is measured by log-likelihood, in the same child.
        composed_service.ComposedPart("embedding/logit", chosen, logit),
        composed_service.ComposedPart("embedding/arrow", chosen, [arrow] * 4),
    ]
    measured = composed_service.composed_measure(
        base_model=tiny_base_model, versions=[first, second], parts=parts
    )
    assert set(measured) == {part.key for part in parts}
    for scores in measured.values():
        assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    for part in parts[2:]:
        assert set(measured[part.key]) <= {0.0, 1.0}


def test_the_childs_engine_serves_the_adapters_the_child_loaded(tmp_path):
    """The child loads its adapters into a registry it made before the engine: the engine
    must use that registry (an empty registry is falsy, which once made the engine build a
    second one, so every adapter scored as the base model)."""
    from evaluation.worker import child
    from evaluation.worker.specs import AdapterSpec, JobSpec

    path = save_tiny_llama(tmp_path / "llama")
    model = _loud(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter = random_adapter("a", seed=5, rank=4, targets=TARGETS)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / child.WEIGHTS_NAME).write_bytes(adapter.weights)
    spec = JobSpec(
        base_model_path=str(path),
        adapters=[AdapterSpec(key="a", adapter_dir=str(folder), lora_config=adapter.config)],
        tasks=[],
    )
    engine, slots, _sketches, failed = child._load_adapters(model, tokenizer, spec)
    assert failed == {} and "a" in engine.registry
    assert engine.registry.slot_of("a") == slots["a"]
    assert variant_answers(engine, slots["a"]) != variant_answers(engine, NO_ADAPTER)
