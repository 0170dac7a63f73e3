"""Compositions scored by the serving engine's own generation (evaluation.worker.scoring
.score_composed, and evaluation.services.composed through the real sandbox): a composition
that is one adapter scores exactly as that adapter does on the variant path, and a mix is
measured per example with its own composition."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.services import composed as composed_service
from evaluation.services.outcomes import union_splits
from evaluation.worker.scoring import generate_answers, score_composed
from evaluation.worker.specs import ComposedTaskSpec, ExampleSpec
from multilora import NO_ADAPTER, Engine
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


def test_mixes_are_measured_in_the_sandbox_for_every_part(
    db, tiny_base_model, contributor, fast_eval
):
    make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(4)])
    first = upload_version(contributor, variant=0)
    second = upload_version(contributor, variant=1)
    (split,) = [s for s in union_splits() if s.split == "hidden"]
    mix = {"method": "topk", "adapters": [first.pk, second.pk], "weights": [0.7, 0.3]}
    parts = [
        composed_service.ComposedPart("embedding/topk", split, [mix] * 4),
        composed_service.ComposedPart(
            "embedding/logit", split, [{**mix, "method": "logit"}] * 3 + [{"method": "top1"}]
        ),
    ]
    measured = composed_service.composed_measure(
        base_model=tiny_base_model, versions=[first, second], parts=parts
    )
    assert set(measured) == {part.key for part in parts}
    for scores in measured.values():
        assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


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
