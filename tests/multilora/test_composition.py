"""Compositions in the engine: topk against merged weights, Arrow against PEFT's own Arrow
model, logit fusion against its single-adapter rows, and a mixed batch against each row
alone. The tiny random model and adapters of test_engine are reused."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from peft import (
    ArrowConfig,
    LoraConfig,
    create_arrow_model,
    get_peft_model,
    set_peft_model_state_dict,
)
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from multilora import (
    BASE,
    Composition,
    CompositionError,
    Engine,
    GenerationError,
    GenerationRequest,
)
from multilora.bound import GatheredLora, LazyConcatLora, SharedLora
from tests.multilora import test_engine as support

tiny_dir = support.tiny_dir
tokenizer = support.tokenizer
TARGETS = ("q_proj", "v_proj", "up_proj")


def arrow_adapter(key: str, *, seed: int, rank: int = 4) -> support.Adapter:
    """A random LoRA whose ΔW has one dominant direction per module, so that PEFT's power
    iteration (15 steps) has converged to the exact prototype the engine uses."""
    adapter = support.random_adapter(key, seed=seed, rank=rank, targets=TARGETS)
    tensors = adapter.tensors()
    for name, tensor in tensors.items():
        if name.endswith("lora_A.weight"):
            tensor[0] *= 6
        else:
            tensor[:, 0] *= 6
    return support.Adapter(key=key, config=adapter.config, weights=save(tensors))


@pytest.fixture(scope="module")
def adapters() -> list[support.Adapter]:
    return [arrow_adapter(f"a{i}", seed=70 + i) for i in range(4)]


@pytest.fixture
def engine(tiny_dir: Path, tokenizer, adapters) -> Engine:
    engine = support.new_engine(tiny_dir, tokenizer)
    support.load_into(engine, *adapters)
    return engine


def request(tokenizer, index: int, composition: Composition = BASE, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    ids = support.prompt(tokenizer, index)
    return GenerationRequest(prompt_ids=ids, composition=composition, **kwargs)


def test_topk_equals_the_base_with_the_weighted_deltas_merged_in(
    engine: Engine, tiny_dir, tokenizer, adapters
):
    keys, weights = ("a0", "a2", "a3"), (0.5, 0.3, 0.2)
    merged = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for adapter, weight in zip([adapters[0], adapters[2], adapters[3]], weights, strict=True):
            scaling = adapter.config["lora_alpha"] / adapter.config["r"]
            tensors = adapter.tensors()
            for name, a in tensors.items():
                if not name.endswith("lora_A.weight"):
                    continue
                path = name[len("base_model.model.") : -len(".lora_A.weight")]
                b = tensors[name.replace("lora_A", "lora_B")]
                merged.get_submodule(path).weight += weight * scaling * (b @ a)
    requests = [request(tokenizer, i, Composition.topk(keys, weights)) for i in range(3)]
    logits = engine.next_token_logits(requests)
    for i, row in enumerate(requests):
        with torch.inference_mode():
            expected = merged(input_ids=torch.tensor([row.prompt_ids])).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)
    (result,) = engine.generate(requests[:1])
    assert result.shares == dict(zip(keys, weights, strict=True))


def peft_arrow_model(tiny_dir: Path, adapters, folder: Path, *, top_k: int, temperature: float):
    paths = []
    for adapter in adapters:
        path = folder / adapter.key
        if not path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = AutoModelForCausalLM.from_pretrained(tiny_dir)
                model = get_peft_model(base, LoraConfig(**adapter.config))
                set_peft_model_state_dict(model, adapter.tensors())
                model.save_pretrained(path)
            assert json.loads((path / "adapter_config.json").read_text())["r"] == 4
        paths.append(str(path))
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        return create_arrow_model(base, paths, config).eval()


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 0.5), (3, 2.0), (4, 1.0)])
def test_arrow_matches_peft_arrow(
    engine: Engine, tiny_dir, tokenizer, adapters, tmp_path_factory, top_k, temperature
):
    folder = tmp_path_factory.getbasetemp() / "arrow-adapters"
    model = peft_arrow_model(tiny_dir, adapters, folder, top_k=top_k, temperature=temperature)
    composition = Composition.arrow([a.key for a in adapters], k=top_k, temperature=temperature)
    requests = [request(tokenizer, i, composition) for i in range(4)]
    logits = engine.next_token_logits(requests)
    base = engine.next_token_logits([request(tokenizer, i) for i in range(4)])
    for i, row in enumerate(requests):
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([row.prompt_ids])).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits[i], base[i], atol=1e-2)  # the adapters do act


def test_logit_fusion_combines_the_single_adapter_log_probabilities(engine: Engine, tokenizer):
    keys, weights = ("a1", "a3"), (0.25, 0.75)
    fused = engine.next_token_logits([request(tokenizer, 1, Composition.logit(keys, weights))])
    alone = engine.next_token_logits(
        [request(tokenizer, 1, Composition.single(key)) for key in keys]
    )
    expected = sum(w * torch.log_softmax(alone[i], -1) for i, w in enumerate(weights))
    torch.testing.assert_close(fused[0], expected, atol=1e-5, rtol=1e-5)

    # Greedy generation against a manual loop over the two adapters' next-token logits.
    (result,) = engine.generate([request(tokenizer, 1, Composition.logit(keys, weights))])
    ids = list(support.prompt(tokenizer, 1))
    tokens = []
    for _ in range(6):
        rows = [GenerationRequest(prompt_ids=ids, composition=Composition.single(k)) for k in keys]
        step = engine.next_token_logits(rows)
        combined = sum(w * torch.log_softmax(step[i], -1) for i, w in enumerate(weights))
        tokens.append(int(combined.argmax()))
        ids.append(tokens[-1])
    assert result.token_ids == tokens
    assert result.shares == {"a1": 0.25, "a3": 0.75}


MIXED = [
    BASE,
    Composition.single("a2"),
    Composition.topk(("a0", "a1"), (0.6, 0.4)),
    Composition.arrow(("a0", "a1", "a2", "a3"), k=2, temperature=0.7),
    Composition.logit(("a0", "a3"), (0.5, 0.5)),
    Composition.arrow(("a1", "a3"), k=1),
    Composition.topk(("a3", "a2", "a1", "a0"), (0.1, 0.2, 0.3, 0.4)),
]


@pytest.mark.parametrize("max_bound_bytes", [None, 0])
def test_a_mixed_batch_gives_every_request_what_it_gets_alone(
    tiny_dir, tokenizer, adapters, max_bound_bytes
):
    kwargs = {} if max_bound_bytes is None else {"max_bound_bytes": max_bound_bytes}
    engine = support.new_engine(tiny_dir, tokenizer, **kwargs)
    support.load_into(engine, *adapters)
    lengths = [3, 8, 5, 8, 4, 8, 2]  # rows leave the batch early: compaction follows them
    requests = [
        request(tokenizer, i, c, max_new_tokens=n)
        for i, (c, n) in enumerate(zip(MIXED, lengths, strict=True))
    ]
    logits = engine.next_token_logits(requests)
    results = engine.generate(requests)
    kinds = {type(m.lora) for m in engine.lora.modules.values()}
    assert kinds == {type(None)}  # unbound after the batch
    for i, row in enumerate(requests):
        alone_logits = engine.next_token_logits([row])
        (alone,) = engine.generate([row])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-4, rtol=1e-4)
        assert results[i].token_ids == alone.token_ids
        assert results[i].composition == row.composition
        assert results[i].shares == pytest.approx(alone.shares, abs=1e-5)
    distinct = {tuple(result.token_ids[:2]) for result in results}
    assert len(distinct) > 3  # the compositions do answer differently


@pytest.mark.parametrize("schedule", [0, 1, 2])
def test_requests_that_join_a_running_batch_at_random_steps_get_what_they_get_alone(
    engine: Engine, tokenizer, schedule
):
    rng = random.Random(schedule)
    compositions = [*MIXED, Composition.single("a1")]
    requests = [
        request(
            tokenizer,
            i,
            c,
            max_new_tokens=rng.randint(1, 9),
            temperature=0.8 if i == len(MIXED) else 0.0,
            seed=11 + i,
        )
        for i, c in enumerate(compositions)
    ]
    # Each request joins at its step (several may join together, some at once).
    steps = [0] + [rng.randint(0, 8) for _ in requests[1:]]
    joined = support.run_joining(engine, requests, steps)
    results, tokens, lane_counts = joined.results, joined.tokens, joined.lane_counts
    assert len(lane_counts) > 2  # the batch did grow and shrink
    for row in requests:
        (alone,) = engine.generate([row])
        result = results[row.request_id]
        assert result.token_ids == alone.token_ids == tokens[row.request_id]
        assert result.text == alone.text
        assert result.shares == pytest.approx(alone.shares, abs=1e-5)


def test_a_request_the_engine_refuses_does_not_join_and_the_batch_runs_on(
    engine: Engine, tokenizer
):
    good = request(tokenizer, 0, Composition.single("a0"), max_new_tokens=4)
    with engine.running() as batch:
        batch.join([good])
        made = [e.token_id for e in batch.sample()]
        batch.forward()
        with pytest.raises(GenerationError):
            batch.join([request(tokenizer, 1, Composition.single("missing"))])
        with pytest.raises(GenerationError):
            batch.join([request(tokenizer, 2), GenerationRequest(prompt_ids=[])])
        assert len(batch) == 1 and batch.lane_count == 1
        while len(batch):
            made += [e.token_id for e in batch.sample()]
            batch.forward()
    (alone,) = engine.generate([good])
    assert made == alone.token_ids


def test_binding_forms_follow_the_batch(engine: Engine, tokenizer):
    def forms() -> set[type]:
        return {type(m.lora) for m in engine.lora.modules.values() if m.lora is not None}

    topk = Composition.topk(("a0", "a1"), (0.5, 0.5))
    with engine.lora.compositions([topk, topk]):
        assert forms() == {SharedLora}
    arrow = Composition.arrow(("a0", "a1"), k=1)
    with engine.lora.compositions([arrow, BASE]) as binding:
        assert forms() == {GatheredLora}
        assert binding.shares is not None and binding.shares.shape == (2, 2)
    engine.lora.max_bound_bytes = 0
    with engine.lora.compositions([arrow, topk]):
        assert forms() == {LazyConcatLora}
    assert forms() == set()


def test_model_generate_under_a_composition_binding_matches_the_engine(engine: Engine, tokenizer):
    """What an evaluation child does: HF's generate under ``lora.compositions``."""
    compositions = [Composition.topk(("a0", "a2"), (0.3, 0.7)), Composition.arrow(("a1", "a2"))]
    ids = support.prompt(tokenizer, 0)
    expected = engine.generate(
        [GenerationRequest(prompt_ids=ids, composition=c, max_new_tokens=5) for c in compositions]
    )
    batch = torch.tensor([ids, ids])
    with torch.inference_mode(), engine.lora.compositions(compositions):
        output = engine.model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=5,
            do_sample=False,
        )
    for row, result in zip(output[:, len(ids) :].tolist(), expected, strict=True):
        assert row == result.token_ids


def test_shares(engine: Engine, tokenizer):
    arrow = Composition.arrow(("a0", "a1", "a2", "a3"), k=2)
    results = engine.generate(
        [
            request(tokenizer, 0, arrow, max_new_tokens=8),
            request(tokenizer, 1, Composition.topk(("a1", "a2"), (0.9, 0.1))),
            request(tokenizer, 2, Composition.single("a3")),
            request(tokenizer, 3),
        ]
    )
    shares = results[0].shares
    assert list(shares) == list(arrow.adapters)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= value <= 1.0 for value in shares.values())
    assert sum(value > 0.01 for value in shares.values()) >= 2  # per-token routing does vary
    assert results[1].shares == {"a1": 0.9, "a2": 0.1}
    assert results[2].shares == {"a3": 1.0}
    assert results[3].shares == {}


def test_bad_compositions_fail_alone(engine: Engine, tokenizer):
    with pytest.raises(GenerationError, match="nobody"):
        engine.generate(
            [request(tokenizer, 0), request(tokenizer, 1, Composition.arrow(["nobody"]))]
        )
    with pytest.raises(GenerationError, match="nobody"):
        engine.generate([request(tokenizer, 0, Composition.logit(["a0", "nobody"]))])
    with pytest.raises(GenerationError, match="Composition"):
        engine.generate([GenerationRequest(prompt_ids=[5], composition="a0")])
    with pytest.raises(CompositionError):
        Composition.topk(("a0", "a1"), (0.7, 0.7))
    with pytest.raises(CompositionError):
        Composition.arrow(("a0", "a1"), k=3)
    with pytest.raises(CompositionError), engine.lora.compositions([Composition.logit(["a0"])]):
        pass
    # The engine still serves after the refusals.
    (result,) = engine.generate([request(tokenizer, 0, Composition.single("a0"))])
    assert result.finish_reason == "length"


def test_prototypes_are_cached_per_slot_and_module_and_dropped_with_the_slot(engine: Engine):
    registry = engine.registry
    slot = registry.slot_of("a1")
    path = next(iter(registry.stacks))
    registry.prototypes(path, [slot])
    assert (slot, path) in registry._prototypes
    cached = registry._prototypes[(slot, path)]
    assert registry.prototypes(path, [slot])[0].equal(cached)
    assert float(cached.norm()) == pytest.approx(1.0, abs=1e-5)
    engine.remove_adapter("a1")
    assert all(key[0] != slot for key in registry._prototypes)


def test_rows_keep_working_with_plain_slots(engine: Engine, tokenizer):
    """``adapters`` still takes registry slots (the evaluation child binds those)."""
    slot = engine.registry.slot_of("a0")
    ids = torch.tensor([support.prompt(tokenizer, 0)] * 2)
    with torch.inference_mode(), engine.lora.adapters([slot, 0]):
        mixed = engine.model(input_ids=ids).logits[:, -1]
    alone = engine.next_token_logits(
        [request(tokenizer, 0, Composition.single("a0")), request(tokenizer, 0)]
    )
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
