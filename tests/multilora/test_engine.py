"""The inference engine against PEFT: every row of a mixed batch must give what PEFT gives
for that row's adapter alone (first-step logits within 1e-4, greedy tokens exactly).

The tiny random Llama of tests.support is re-initialised with larger weights (std 0.2
instead of 0.02) so that greedy decoding wanders through the vocabulary instead of repeating
one token, and the adapters are large enough to change the tokens: a comparison of token ids
then has teeth, which the tests check (adapter rows differ from base rows).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import random
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from contributions.intake.config import parse_config
from multilora import (
    NO_ADAPTER,
    AdapterLoadError,
    Composition,
    Engine,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    LoraRegistry,
)
from multilora.model import _GatheredLora, _LazyLora, _SharedLora
from routing.serving.sync import add_adapter_version
from tests.support.crafted import real_adapter
from tests.support.tiny_model import save_tiny_llama, tiny_architecture

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SENTENCES = [
    "The capital of France is",
    "Add 123 and 456:",
    "hello",
    "The quick brown fox jumps over the lazy dog. What is",
    "Translate hello to French:",
]


# --- Fixtures and helpers -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Adapter:
    key: str
    # Our normalised LoRA config, as AdapterVersion.adapter_config holds it (not hashable:
    # left out of the hash, which peft_reference's cache needs).
    config: dict = dataclasses.field(hash=False)
    weights: bytes  # adapter_model.safetensors

    def tensors(self) -> dict[str, torch.Tensor]:
        return load(self.weights)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def engine(tiny_dir: Path, tokenizer) -> Engine:
    return new_engine(tiny_dir, tokenizer)


def new_engine(
    tiny_dir: Path,
    tokenizer,
    *,
    initial_capacity: int = 8,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    registry = LoraRegistry.for_model(model, initial_capacity=initial_capacity)
    return Engine(model, tokenizer, registry=registry, **kwargs)


def prompt(tokenizer, index: int) -> list[int]:
    return tokenizer(SENTENCES[index % len(SENTENCES)])["input_ids"]


def random_adapter(
    key: str, *, seed: int, rank: int, targets: tuple[str, ...], layers: tuple[int, ...] = ()
) -> Adapter:
    """A LoRA for the tiny base with random A and B (std 0.2), in PEFT's file format.
    ``layers`` limits it to some decoder layers (all when empty)."""
    architecture = tiny_architecture()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (in_features, out_features) in architecture["linear_modules"].items():
        layer = int(path.split(".")[2])
        if path.rsplit(".", 1)[-1] not in targets or (layers and layer not in layers):
            continue
        tensors[f"base_model.model.{path}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) * 0.2
        )
        tensors[f"base_model.model.{path}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 0.2
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
    }
    return Adapter(key=key, config=config, weights=save(tensors))


@functools.cache
def peft_reference(
    tiny_dir: Path,
    adapter: Adapter | None,
    prompt_ids: tuple[int, ...],
    new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """PEFT alone with one adapter (or the bare base): first-step logits and greedy tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
        if adapter is not None:
            model = get_peft_model(model, LoraConfig(**adapter.config))
            result = set_peft_model_state_dict(model, adapter.tensors())
            assert not result.unexpected_keys
        model.eval()
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1]
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
    return logits, output[0, len(prompt_ids) :].tolist()


def wait_until(condition, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def load_into(engine: Engine, *adapters: Adapter) -> None:
    for adapter in adapters:
        engine.add_adapter(adapter.key, lora_config=adapter.config, tensors=adapter.tensors())


def assert_rows_match_peft(
    engine: Engine,
    tiny_dir: Path,
    rows: list[tuple[Adapter | None, list[int]]],
    new_tokens: int,
    *,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-4,
) -> list[list[int]]:
    """One mixed batch through the engine; each row against PEFT with its adapter alone."""
    requests = [
        GenerationRequest(
            prompt_ids=ids,
            composition=Composition.single(adapter and adapter.key),
            max_new_tokens=new_tokens,
        )
        for adapter, ids in rows
    ]
    logits = engine.next_token_logits(requests)
    results = engine.generate(requests)
    for i, (adapter, ids) in enumerate(rows):
        expected_logits, expected_tokens = peft_reference(
            tiny_dir, adapter, tuple(ids), new_tokens, dtype
        )
        torch.testing.assert_close(logits[i], expected_logits, atol=atol, rtol=0)
        assert results[i].token_ids == expected_tokens, f"row {i} ({adapter and adapter.key})"
    return [result.token_ids for result in results]


# --- The registry ---------------------------------------------------------------------------


def test_registry_stacks_rank_padded_scaled_weights_with_slot_zero_empty():
    shapes = tiny_architecture()["linear_modules"]
    registry = LoraRegistry(shapes)
    small = random_adapter("small", seed=1, rank=2, targets=("q_proj",))
    large = random_adapter("large", seed=2, rank=8, targets=("q_proj", "down_proj"))
    slot_small = registry.add("small", lora_config=small.config, tensors=small.tensors())
    slot_large = registry.add("large", lora_config=large.config, tensors=large.tensors())

    assert (slot_small, slot_large) == (1, 2)
    assert registry.slot_of("large") == 2
    assert set(registry.stacks) == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    q = registry.stacks["model.layers.0.self_attn.q_proj"]
    assert q.A.shape == (registry.capacity, 8, 64) and q.B.shape == (registry.capacity, 64, 8)
    tensors = small.tensors()
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q.A[slot_small, :2], a)
    torch.testing.assert_close(q.B[slot_small, :, :2], b * (4 / 2))  # lora_alpha / r folded in
    assert not q.A[slot_small, 2:].any() and not q.B[slot_small, :, 2:].any()  # rank padding
    assert not q.A[NO_ADAPTER].any() and not q.B[NO_ADAPTER].any()
    down = registry.stacks["model.layers.0.mlp.down_proj"]
    assert not down.A[slot_small].any()  # "small" does not target down_proj
    assert down.rank_of[slot_small] == 0 and down.rank_of[slot_large] == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": {"use_dora": True}}, "plain LoRA"),
        ({"config": {"r": 0}}, "positive integer"),
        ({"config": {"lora_alpha": float("nan")}}, "finite"),
        ({"config": {"target_modules": ["k_proj"]}}, "config omits"),
        ({"config": {"r": 8}}, "expected"),
        ({"rename": "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"}, "names no"),
        ({"rename": "model.layers.0.self_attn.q_proj.weight"}, "not a PEFT"),
        ({"drop_b": True}, "both lora_A and lora_B"),
    ],
)
def test_registry_refuses_adapters_that_do_not_fit(change: dict, message: str):
    adapter = random_adapter("a", seed=1, rank=4, targets=("q_proj",))
    config = {**adapter.config, **change.get("config", {})}
    tensors = adapter.tensors()
    if "rename" in change:
        tensors[change["rename"]] = tensors.pop(next(iter(tensors)))
    if change.get("drop_b"):
        tensors = {name: t for name, t in tensors.items() if "lora_B" not in name}
    registry = LoraRegistry(tiny_architecture()["linear_modules"])
    with pytest.raises(AdapterLoadError, match=message):
        registry.add("a", lora_config=config, tensors=tensors)
    assert len(registry) == 0


def test_registry_refuses_a_key_already_loaded():
    adapter = random_adapter("a", seed=1, rank=4, targets=("q_proj",))
    registry = LoraRegistry(tiny_architecture()["linear_modules"])
    registry.add("a", lora_config=adapter.config, tensors=adapter.tensors())
    with pytest.raises(AdapterLoadError, match="already loaded"):
        registry.add("a", lora_config=adapter.config, tensors=adapter.tensors())


def test_removing_an_adapter_zeroes_its_slot_and_the_next_adapter_reuses_it():
    registry = LoraRegistry(tiny_architecture()["linear_modules"])
    first, second, third = (
        random_adapter(name, seed=i, rank=4, targets=("q_proj", "up_proj"))
        for i, name in enumerate(("first", "second", "third"))
    )
    for adapter in (first, second):
        registry.add(adapter.key, lora_config=adapter.config, tensors=adapter.tensors())

    registry.remove("first")

    assert "first" not in registry
    with pytest.raises(KeyError):
        registry.slot_of("first")
    for stack in registry.stacks.values():
        assert not stack.A[1].any() and not stack.B[1].any() and stack.rank_of[1] == 0
    assert registry.add("third", lora_config=third.config, tensors=third.tensors()) == 1
    with pytest.raises(KeyError):
        registry.remove("first")


def test_capacity_grows_by_doubling_and_keeps_every_adapter():
    registry = LoraRegistry(tiny_architecture()["linear_modules"], initial_capacity=2)
    adapters = [random_adapter(f"a{i}", seed=i, rank=2, targets=("v_proj",)) for i in range(40)]
    for adapter in adapters:
        registry.add(adapter.key, lora_config=adapter.config, tensors=adapter.tensors())

    assert registry.capacity == 64  # 2 -> 4 -> ... -> 64 for 41 slots (slot 0 included)
    stack = registry.stacks["model.layers.1.self_attn.v_proj"]
    for adapter in (adapters[0], adapters[17], adapters[39]):
        a = adapter.tensors()["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
        torch.testing.assert_close(stack.A[registry.slot_of(adapter.key)], a)


# --- Mixed batches against PEFT -------------------------------------------------------------


def test_a_mixed_batch_matches_peft_row_by_row(engine: Engine, tiny_dir: Path, tokenizer):
    # Different ranks, different target modules (attention only, MLP only, both, one layer
    # only) and the base, with prompts of different lengths (left padding).
    adapters = [
        random_adapter("attn-r4", seed=11, rank=4, targets=("q_proj", "v_proj")),
        random_adapter("mlp-r8", seed=12, rank=8, targets=MLP),
        random_adapter("all-r2", seed=13, rank=2, targets=ATTENTION + MLP),
        random_adapter("layer1-r16", seed=14, rank=16, targets=("k_proj", "o_proj"), layers=(1,)),
    ]
    load_into(engine, *adapters)
    rows = [(adapters[i % 4] if i < 8 else None, prompt(tokenizer, i)) for i in range(10)]

    tokens = assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=12)

    # The comparison has teeth: on the same prompt, adapter rows differ from the base's.
    assert tokens[5] != peft_reference(tiny_dir, None, tuple(rows[5][1]), 12)[1]


def test_real_peft_adapter_files_load_through_our_config_schema(
    engine: Engine, tiny_dir: Path, tokenizer
):
    files = real_adapter("float32", rank=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    config = parse_config(
        files.config,
        base_model_names=[],
        target_names={m.rsplit(".", 1)[-1] for m in tiny_architecture()["linear_modules"]},
        max_rank=64,
    ).normalised()
    real = Adapter(key="real", config=config, weights=files.weights)
    other = random_adapter("other", seed=3, rank=8, targets=MLP)
    load_into(engine, real, other)

    rows = [
        (real, prompt(tokenizer, 0)),
        (other, prompt(tokenizer, 1)),
        (None, prompt(tokenizer, 2)),
    ]
    assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=8)


def test_a_batch_with_one_adapter_skips_the_gather_and_still_matches_peft(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapter = random_adapter("only", seed=5, rank=4, targets=("q_proj", "down_proj"))
    load_into(engine, adapter)
    with engine.lora.adapters([1, 1, 1]):
        kinds = {type(m.lora) for m in engine.lora.modules.values()}
        untargeted = engine.lora.modules["model.layers.0.self_attn.k_proj"].lora
    assert kinds == {_SharedLora, type(None)} and untargeted is None
    with engine.lora.adapters([1, 0]):
        assert type(engine.lora.modules["model.layers.0.self_attn.q_proj"].lora) is _GatheredLora

    rows = [(adapter, prompt(tokenizer, i)) for i in range(3)]
    assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=10)


def test_the_memory_bounded_lazy_gather_gives_the_same_rows(tiny_dir: Path, tokenizer):
    engine = new_engine(tiny_dir, tokenizer, max_bound_bytes=0)  # always gather per call
    adapters = [
        random_adapter("lazy-a", seed=21, rank=4, targets=ATTENTION),
        random_adapter("lazy-b", seed=22, rank=8, targets=("v_proj", "up_proj")),
    ]
    load_into(engine, *adapters)
    with engine.lora.adapters([1, 2]):
        assert type(engine.lora.modules["model.layers.0.self_attn.v_proj"].lora) is _LazyLora

    rows = [(adapters[0], prompt(tokenizer, 0)), (None, prompt(tokenizer, 1))]
    rows += [(adapters[1], prompt(tokenizer, 3))]
    assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=10)


def test_a_bfloat16_base_keeps_float32_lora_weights_and_matches_peft(tiny_dir: Path, tokenizer):
    # PEFT keeps adapter weights in float32 under a half-precision base and adds the delta in
    # float32; on CPU the registry does the same (it is faster there too).
    engine = new_engine(tiny_dir, tokenizer, dtype=torch.bfloat16)
    adapters = [
        random_adapter("bf-a", seed=81, rank=4, targets=ATTENTION),
        random_adapter("bf-b", seed=82, rank=8, targets=MLP),
    ]
    load_into(engine, *adapters)
    assert engine.registry.dtype == torch.float32

    rows = [(adapters[0], prompt(tokenizer, 0)), (adapters[1], prompt(tokenizer, 3))]
    rows += [(None, prompt(tokenizer, 1))]
    # Logits of magnitude under 8 within two bfloat16 steps there (padding changes rounding).
    assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=8, dtype=torch.bfloat16, atol=0.0625)


def test_a_hundred_adapters_still_match_peft_for_a_sample(tiny_dir: Path, tokenizer):
    engine = new_engine(tiny_dir, tokenizer, initial_capacity=2)  # many doublings
    choices = random.Random(7)
    adapters = []
    for i in range(100):
        targets = tuple(sorted(choices.sample(ATTENTION + MLP, k=choices.randint(1, 4))))
        rank = choices.choice((1, 2, 4, 8, 16))
        adapters.append(random_adapter(f"a{i:03}", seed=100 + i, rank=rank, targets=targets))
    load_into(engine, *adapters)
    # Churn: remove a few, add them back (under new keys), so freed slots get reused.
    for adapter in adapters[10:15]:
        engine.remove_adapter(adapter.key)
    readded = [dataclasses.replace(a, key=a.key + "-again") for a in adapters[10:15]]
    load_into(engine, *readded)

    assert len(engine.registry) == 100 and engine.registry.capacity == 128
    sample = [adapters[0], readded[2], adapters[37], adapters[64], adapters[99], None]
    rows = [(adapter, prompt(tokenizer, i)) for i, adapter in enumerate(sample)]
    assert_rows_match_peft(engine, tiny_dir, rows, new_tokens=8)


def test_a_batch_binds_weights_sized_by_its_own_rows_not_by_the_registry(tiny_dir: Path, tokenizer):
    # What keeps decoding as fast with a thousand adapters loaded as with five
    # (benchmarks/bench_adapters_loaded.py): a step touches only weights gathered for the
    # batch's rows, trimmed to their largest rank, on the modules their adapters target.
    engine = new_engine(tiny_dir, tokenizer, initial_capacity=2)
    crowd = [
        random_adapter(f"crowd-{i}", seed=200 + i, rank=16, targets=ATTENTION + MLP)
        for i in range(40)
    ]
    small = random_adapter("small", seed=250, rank=2, targets=("q_proj",))
    other = random_adapter("other", seed=251, rank=4, targets=("q_proj", "v_proj"))
    load_into(engine, *crowd, small, other)
    q_stack = engine.registry.stacks["model.layers.0.self_attn.q_proj"]
    assert q_stack.capacity == 64 and q_stack.rank == 16

    slots = [engine.registry.slot_of(key) for key in ("small", "other", "small")] + [NO_ADAPTER]
    with engine.lora.adapters(slots):
        q = engine.lora.modules["model.layers.0.self_attn.q_proj"].lora
        v = engine.lora.modules["model.layers.1.self_attn.v_proj"].lora
        untargeted = [
            path
            for path, module in engine.lora.modules.items()
            if module.lora is not None and not path.endswith(("q_proj", "v_proj"))
        ]
    assert isinstance(q, _GatheredLora) and isinstance(v, _GatheredLora)
    assert q.A_t.shape == (4, 64, 4) and q.B_t.shape == (4, 4, 64)  # rows × in × batch's rank
    assert v.A_t.shape[0] == 4 and v.A_t.shape[2] == 4
    assert untargeted == []  # k, o and the MLP: targeted by loaded adapters, not this batch's


def test_a_removed_adapter_frees_its_slot_which_then_runs_as_the_base(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapter = random_adapter("gone", seed=31, rank=4, targets=ATTENTION)
    load_into(engine, adapter)
    slot = engine.registry.slot_of("gone")
    ids = prompt(tokenizer, 0)

    engine.remove_adapter("gone")

    with pytest.raises(GenerationError, match="gone"):
        engine.generate([GenerationRequest(prompt_ids=ids, composition=Composition.single("gone"))])
    base_logits, _ = peft_reference(tiny_dir, None, tuple(ids), 1)
    with torch.inference_mode(), engine.lora.adapters([slot]):
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits, base_logits, atol=1e-4, rtol=0)


def test_an_adapter_removed_mid_batch_keeps_its_weights_until_the_batch_ends(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapter = random_adapter("busy", seed=41, rank=4, targets=ATTENTION)
    newcomer = random_adapter("newcomer", seed=42, rank=8, targets=MLP)
    load_into(engine, adapter)
    ids = prompt(tokenizer, 1)
    request = GenerationRequest(
        prompt_ids=ids, composition=Composition.single("busy"), max_new_tokens=10
    )

    events = engine.generate_stream([request])
    tokens = [next(events).token_id]
    engine.remove_adapter("busy")  # while the batch runs: the slot is pinned
    load_into(engine, newcomer)  # must not land in the pinned slot
    tokens += [event.token_id for event in events]

    assert tokens == peft_reference(tiny_dir, adapter, tuple(ids), 10)[1]
    assert engine.registry.slot_of("newcomer") == 2
    stacks = engine.registry.stacks.values()
    assert all(not s.A[1].any() for s in stacks)  # zeroed once the batch let go


# --- Decoding: limits, stops, sampling, streaming, cancelling -------------------------------


def test_max_new_tokens_finishes_with_length_and_counts_usage(engine: Engine, tokenizer):
    ids = prompt(tokenizer, 3)
    [result] = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=7)])

    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(ids)
    assert result.completion_tokens == len(result.token_ids) == 7
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_end_of_sequence_finishes_with_stop(engine: Engine, tokenizer):
    ids = prompt(tokenizer, 0)
    [free] = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=6)])
    engine.eos_ids = frozenset({free.token_ids[3]})  # pretend the 4th token ends the sequence

    [stopped] = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=6)])
    [ignored] = engine.generate(
        [GenerationRequest(prompt_ids=ids, max_new_tokens=6, ignore_eos=True)]
    )

    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:4]  # the end-of-sequence token included
    assert stopped.text == tokenizer.decode(free.token_ids[:3])  # but not its text
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_a_stop_sequence_cuts_the_text_and_finishes_with_stop(engine: Engine, tokenizer):
    ids = prompt(tokenizer, 1)
    [free] = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=16)])
    stop = free.text[5:8]  # likely straddles a token boundary
    assert stop and free.text.find(stop) == 5

    [result] = engine.generate(
        [GenerationRequest(prompt_ids=ids, max_new_tokens=16, stop=["never there", stop])]
    )

    assert result.finish_reason == "stop"
    assert result.text == free.text[:5]
    assert len(result.token_ids) < len(free.token_ids)
    assert result.token_ids == free.token_ids[: len(result.token_ids)]
    assert result.completion_tokens == len(result.token_ids)


def test_streaming_yields_the_same_tokens_and_text_as_generate(engine: Engine, tokenizer):
    adapter = random_adapter("s", seed=51, rank=4, targets=("q_proj", "up_proj"))
    load_into(engine, adapter)
    free = engine.generate([GenerationRequest(prompt_ids=prompt(tokenizer, 2), max_new_tokens=12)])
    stop = free[0].text[4:7]

    def requests():
        return [
            GenerationRequest(
                prompt_ids=prompt(tokenizer, i),
                composition=Composition.single(adapter_key),
                **extra,
            )
            for i, (adapter_key, extra) in enumerate(
                [
                    ("s", {"max_new_tokens": 12}),
                    (None, {"max_new_tokens": 5}),
                    (None, {"max_new_tokens": 12, "stop": [stop]}),
                    ("s", {"max_new_tokens": 9, "temperature": 0.8, "seed": 3}),
                ]
            )
        ]

    results = engine.generate(requests())
    tokens: dict[int, list[int]] = {i: [] for i in range(4)}
    texts = {i: "" for i in range(4)}
    finals = {}
    for event in engine.generate_stream(requests()):
        assert event.index not in finals, "no event after a row's last"
        tokens[event.index].append(event.token_id)
        texts[event.index] += event.text
        if event.finish_reason is not None:
            finals[event.index] = event.result

    for i, result in enumerate(results):
        assert tokens[i] == result.token_ids
        assert texts[i] == result.text
        assert dataclasses.replace(finals[i], request_id=result.request_id) == result
    assert results[2].finish_reason == "stop" and results[2].text == free[0].text[:4]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: Engine, tokenizer):
    ids = prompt(tokenizer, 0)

    def sampled(seed: int, **extra) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=ids, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=seed, **extra
        )

    alone = engine.generate([sampled(7)])[0].token_ids
    again = engine.generate([sampled(7)])[0].token_ids
    in_a_crowd = engine.generate(
        [GenerationRequest(prompt_ids=prompt(tokenizer, 3)), sampled(8), sampled(7)]
    )
    greedy = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=12)])[0]

    assert alone == again == in_a_crowd[2].token_ids
    assert in_a_crowd[1].token_ids != alone  # another seed, another stream
    assert alone != greedy.token_ids  # it really sampled


def test_a_tiny_top_p_leaves_only_the_most_likely_token(engine: Engine, tokenizer):
    ids = prompt(tokenizer, 4)
    greedy = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=10)])[0]
    nucleus = engine.generate(
        [GenerationRequest(prompt_ids=ids, max_new_tokens=10, temperature=2.0, top_p=1e-6)]
    )[0]
    assert nucleus.token_ids == greedy.token_ids


def test_cancel_stops_one_row_and_the_others_go_on(engine: Engine, tokenizer):
    requests = [
        GenerationRequest(prompt_ids=prompt(tokenizer, i), max_new_tokens=10, request_id=f"r{i}")
        for i in range(3)
    ]
    results = {}
    for event in engine.generate_stream(requests):
        if event.request_id == "r1" and event.token_id is not None and "r1" not in results:
            engine.cancel("r1")  # the same request every step until it takes effect
        if event.result is not None:
            results[event.request_id] = event.result

    assert results["r1"].finish_reason == "cancelled"
    assert results["r1"].completion_tokens == 1  # cancelled at the step after its first token
    assert results["r0"].finish_reason == results["r2"].finish_reason == "length"
    assert not engine.cancel("r1")  # no longer running


def test_a_request_waiting_for_the_running_batch_can_be_cancelled(engine: Engine, tokenizer):
    long = GenerationRequest(prompt_ids=prompt(tokenizer, 0), max_new_tokens=200, ignore_eos=True)
    late = GenerationRequest(prompt_ids=prompt(tokenizer, 1), max_new_tokens=200, request_id="late")
    first = threading.Thread(target=engine.generate, args=([long],))
    first.start()
    wait_until(lambda: long.request_id in engine._running)
    results = []
    second = threading.Thread(
        target=lambda: results.extend(e.result for e in engine.generate_stream([late]) if e.result)
    )
    second.start()
    wait_until(lambda: "late" in engine._running)

    assert engine.cancel("late")
    first.join(timeout=60)
    second.join(timeout=60)

    assert results[0].finish_reason == "cancelled"
    assert results[0].completion_tokens < 200


def test_a_stream_checks_its_requests_before_the_first_event(engine: Engine):
    with pytest.raises(GenerationError, match="nobody"):
        engine.generate_stream(
            [GenerationRequest(prompt_ids=[5], composition=Composition.single("nobody"))]
        )


def test_rows_that_finish_early_leave_the_batch_and_the_rest_still_match_peft(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapters = [random_adapter(f"c{i}", seed=60 + i, rank=4, targets=ATTENTION) for i in range(2)]
    load_into(engine, *adapters)
    lengths = [2, 3, 14, 14, 5]
    requests = [
        GenerationRequest(
            prompt_ids=prompt(tokenizer, i),
            composition=Composition.single(key),
            max_new_tokens=n,
        )
        for i, (key, n) in enumerate(zip(["c0", "c1", "c1", None, "c0"], lengths, strict=True))
    ]
    bound = []
    original = engine.lora._bind

    def spy(slots: list[int], *args) -> None:
        bound.append(list(slots))
        original(slots, *args)

    engine.lora._bind = spy
    results = engine.generate(requests)

    by_key = {"c0": adapters[0], "c1": adapters[1], None: None}
    for request, result in zip(requests, results, strict=True):
        expected = peft_reference(
            tiny_dir,
            by_key[request.composition.adapter],
            tuple(request.prompt_ids),
            request.max_new_tokens,
        )[1]
        assert result.token_ids == expected
    # The batch opens empty; the five join (bound alone for their prefill, then as the
    # batch). A row leaves as soon as it is done and the last row takes its place: the
    # first after step 2, the second after step 3, the fifth after step 5, the last two
    # after step 14.
    assert bound == [
        [],
        [1, 2, 2, 0, 1],
        [1, 2, 2, 0, 1],
        [1, 2, 2, 0],
        [1, 0, 2],
        [2, 0],
        [],
    ]
    assert [result.completion_tokens for result in results] == lengths


@dataclasses.dataclass
class Joined:
    results: dict[str, GenerationResult]  # by request id
    tokens: dict[str, list[int]]  # every token streamed, by request id
    lane_counts: set[int]  # the batch's sizes, step by step


def run_joining(engine: Engine, requests: list[GenerationRequest], steps: list[int]) -> Joined:
    """Run a batch in which ``requests[i]`` joins before step ``steps[i]`` (several may join
    together); rows leave as they finish, so later rows take the places of rows that left."""
    joined = Joined(results={}, tokens={r.request_id: [] for r in requests}, lane_counts=set())
    with engine.running() as batch:
        step = 0
        while len(joined.results) < len(requests):
            joining = [r for r, at in zip(requests, steps, strict=True) if at == step]
            if joining:
                batch.join(joining)
            joined.lane_counts.add(batch.lane_count)
            for event in batch.sample():
                if event.token_id is not None:
                    joined.tokens[event.request_id].append(event.token_id)
                if event.result is not None:
                    joined.results[event.request_id] = event.result
            batch.forward()
            step += 1
    return joined


def test_rows_joining_a_running_batch_at_random_steps_still_match_peft_alone(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapters = [random_adapter(f"j{i}", seed=80 + i, rank=4, targets=ATTENTION) for i in range(3)]
    load_into(engine, *adapters)
    rng = random.Random(5)
    keys = ["j0", None, "j1", "j2", "j0", "j1"]
    requests = [
        GenerationRequest(
            prompt_ids=prompt(tokenizer, i),
            composition=Composition.single(key) if key else Composition.base(),
            max_new_tokens=rng.randint(2, 10),
        )
        for i, key in enumerate(keys)
    ]
    steps = [0, *sorted(rng.randint(1, 9) for _ in requests[1:])]
    results = run_joining(engine, requests, steps).results
    by_key = {adapter.key: adapter for adapter in adapters}
    for request in requests:
        adapter = by_key.get(request.composition.adapter)
        expected = peft_reference(
            tiny_dir, adapter, tuple(request.prompt_ids), request.max_new_tokens
        )[1]
        assert results[request.request_id].token_ids == expected


def test_chat_messages_are_formatted_with_the_chat_template(engine: Engine, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    from_messages, from_ids = engine.generate(
        [
            GenerationRequest(messages=messages, max_new_tokens=6),
            GenerationRequest(prompt_ids=ids, max_new_tokens=6),
        ]
    )

    assert from_messages.prompt_tokens == len(ids)
    assert from_messages.token_ids == from_ids.token_ids


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"prompt": "hi", "prompt_ids": [5]}, "exactly one"),
        ({"prompt_ids": []}, "empty"),
        ({"prompt_ids": [10_000]}, "vocabulary"),
        ({"prompt_ids": [5], "composition": Composition.single("nobody")}, "nobody"),
        ({"prompt_ids": [5], "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt_ids": [5], "max_new_tokens": 300}, "context"),
        ({"prompt_ids": [5], "top_p": 0.0}, "top_p"),
        ({"prompt_ids": [5], "temperature": -1.0}, "temperature"),
        ({"prompt_ids": [5], "stop": [""]}, "Stop"),
    ],
)
def test_requests_the_engine_cannot_run_are_refused_before_any_work(
    engine: Engine, request_kwargs: dict, message: str
):
    with pytest.raises(GenerationError, match=message):
        engine.generate(
            [
                GenerationRequest(prompt_ids=[5], max_new_tokens=2),
                GenerationRequest(**request_kwargs),
            ]
        )


# --- Loading and unloading ------------------------------------------------------------------


def test_an_adapter_version_loads_from_its_stored_config_and_weights(
    engine: Engine, tiny_dir: Path, tokenizer
):
    adapter = random_adapter("v", seed=71, rank=4, targets=("v_proj", "gate_proj"))
    version = SimpleNamespace(
        adapter_config=adapter.config,
        weights_file=SimpleNamespace(open=lambda mode: io.BytesIO(adapter.weights)),
        weights_sha256=hashlib.sha256(adapter.weights).hexdigest(),  # stored at upload
    )
    assert add_adapter_version(engine.registry, version, key="v") == 1
    assert_rows_match_peft(engine, tiny_dir, [(adapter, prompt(tokenizer, 0))], new_tokens=6)


def test_detach_puts_the_original_linear_modules_back(engine: Engine):
    module = engine.lora.modules["model.layers.0.self_attn.q_proj"]
    engine.lora.detach()
    assert engine.model.get_submodule("model.layers.0.self_attn.q_proj") is module.base
