"""The merged adapter: a mixture's public members merged with PEFT's add_weighted_adapter,
built by a job, stored as safetensors + config, and served by the sync as Catalog.merged.

The reference in every comparison is PEFT itself, driven here directly on files this test
wrote (PeftModel.from_pretrained on a folder of our own making, never on an upload).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load, save
from transformers import AutoModelForCausalLM

from contributions import services as contribution_services
from contributions.models import AdapterVersion
from multilora import Engine, GenerationRequest
from multilora.composition import Composition
from routing.catalog import MERGED_MODEL_ID
from routing.merging import services
from routing.merging.merge import LoraInput, MergeRefused, merge_loras
from routing.models import MergedAdapter, MixtureVersion
from routing.serving import sync as sync_module
from routing.serving.sync import MixtureSync, engine_key
from routing.tasks import merge_mixture
from tests.factories import AdapterFactory
from tests.routing.conftest import UNITS_PROMPTS, admitted_version, walk_to_admitted
from tests.support import crafted
from tests.support.tiny_model import tiny_architecture, tiny_llama_config, tiny_tokenizer

Status = MergedAdapter.Status
PROMPTS = ["The capital of France is", "Add 123 and 456:", "hello"]


# --- Helpers --------------------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_llama_config())
    return model.eval()


def random_lora(
    name: str, *, seed: int, targets: tuple[str, ...], rank: int = 4, std: float = 0.2
) -> LoraInput:
    """A LoRA for the tiny base with random A and B, large enough to change the logits."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (in_features, out_features) in tiny_architecture()["linear_modules"].items():
        if path.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{path}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) * std
            )
            tensors[f"base_model.model.{path}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * std
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
    return LoraInput(name=name, config=config, tensors=tensors)


def write_peft_folder(folder: Path, lora: LoraInput) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(lora.config))
    (folder / "adapter_model.safetensors").write_bytes(save(dict(lora.tensors)))
    return folder


def peft_merged(tmp_path: Path, loras: list[LoraInput], *, method: str, density: float):
    """PEFT alone: the members loaded from folders, merged with add_weighted_adapter at
    equal weights (the CPU generator seeded with 0 first, as the service seeds DARE)."""
    names = [f"p{i}" for i in range(len(loras))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            tiny_model(), write_peft_folder(tmp_path / names[0], loras[0]), adapter_name=names[0]
        )
        for name, lora in zip(names[1:], loras[1:], strict=True):
            model.load_adapter(write_peft_folder(tmp_path / name, lora), adapter_name=name)
        torch.manual_seed(0)
        model.add_weighted_adapter(
            names, [1.0] * len(names), "ref", combination_type=method, density=density
        )
    model.set_adapter("ref")
    return model.eval(), get_peft_model_state_dict(model, adapter_name="ref")


PAIR = (
    random_lora("units", seed=1, targets=("q_proj", "v_proj")),
    random_lora("dates", seed=2, targets=("q_proj", "o_proj", "down_proj")),
)


# --- The arithmetic (no database) -----------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_the_merged_tensors_are_peft_add_weighted_adapter_s(tmp_path: Path, method: str):
    merged = merge_loras(tiny_model(), list(PAIR), method=method, density=0.5)
    _model, reference = peft_merged(tmp_path, list(PAIR), method=method, density=0.5)
    assert merged.tensors.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(merged.tensors[key], tensor, atol=0, rtol=0)
    # Same ranks in, same rank out; the union of the members' modules; scaling 1.
    assert merged.rank == 4
    assert merged.config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert merged.config["r"] == 4 and merged.config["lora_alpha"] == 4.0


def test_dare_ties_rebuilds_give_the_same_tensors_whatever_the_global_generator():
    torch.manual_seed(123)
    first = merge_loras(tiny_model(), list(PAIR), method="dare_ties", density=0.3)
    torch.manual_seed(456)
    second = merge_loras(tiny_model(), list(PAIR), method="dare_ties", density=0.3)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_the_engine_serving_the_merged_adapter_gives_peft_s_logits(tmp_path: Path):
    merged = merge_loras(tiny_model(), list(PAIR), method="ties", density=0.5)
    reference, _state = peft_merged(tmp_path, list(PAIR), method="ties", density=0.5)
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(), tokenizer)
    engine.add_adapter("merged", lora_config=merged.config, tensors=merged.tensors)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    requests = [
        GenerationRequest(prompt_ids=ids, composition=Composition.single("merged"))
        for ids in prompts
    ]
    base = [GenerationRequest(prompt_ids=ids) for ids in prompts]
    logits, base_logits = engine.next_token_logits(requests), engine.next_token_logits(base)
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0)
            assert not torch.allclose(logits[i], base_logits[i], atol=1e-3)  # it does something


def test_the_base_model_is_left_as_it_was():
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    merge_loras(model, list(PAIR))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert not any("lora" in name for name, _ in model.named_modules())


def test_members_of_different_ranks_are_refused_with_peft_s_reason():
    wide = random_lora("wide", seed=3, targets=("q_proj",), rank=8)
    with pytest.raises(MergeRefused, match="same r"):
        merge_loras(tiny_model(), [PAIR[0], wide])


def test_tensors_that_do_not_fit_the_base_are_refused_before_peft_sees_them():
    broken = random_lora("broken", seed=4, targets=("q_proj",))
    tensors = dict(broken.tensors)
    tensors.pop(next(key for key in tensors if key.endswith("lora_B.weight")))
    with pytest.raises(MergeRefused, match=r"broken: .*both lora_A and lora_B"):
        merge_loras(tiny_model(), [PAIR[0], LoraInput("broken", broken.config, tensors)])


# --- The job, its row and its files ---------------------------------------------------------


@pytest.fixture
def engine() -> Engine:
    return Engine(tiny_model(), tiny_tokenizer())


def admitted(owner, slug: str, *, seed: int, private: bool = False, rank: int = 4, **kwargs):
    if rank == 4 and not kwargs:
        return admitted_version(owner, slug=slug, prompts=UNITS_PROMPTS, private=private, seed=seed)
    adapter = AdapterFactory(owner=owner, slug=slug, visibility="private" if private else "public")
    files = crafted.real_adapter(seed=seed, rank=rank, lora_alpha=2 * rank, **kwargs)
    version = contribution_services.adapter_version_create(
        adapter=adapter, actor=owner, parts=files.parts()
    )
    return walk_to_admitted(version)


def active() -> MixtureVersion:
    return MixtureVersion.objects.get(is_active=True)


def stored_inputs(versions: list[AdapterVersion]) -> list[LoraInput]:
    return [services.lora_input(version) for version in versions]


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_publishing_queues_one_build_after_commit(
    settings, contributor, tiny_base_model, sent_tasks, django_capture_on_commit_callbacks
):
    settings.TESSERA_MERGE_ON_PUBLISH = True
    settings.TESSERA_MERGE_METHOD = "dare_ties"
    with django_capture_on_commit_callbacks(execute=True):
        admitted(contributor, "units", seed=21)
    merged = MergedAdapter.objects.get(mixture=active())
    assert merged.status == Status.QUEUED and merged.method == "dare_ties"
    assert merged.density == 0.5
    assert [args for args, _queue in sent_tasks["routing.merge_mixture"]] == [[merged.pk]]


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_the_build_merges_the_public_members_only(contributor, other_contributor, tiny_base_model):
    units = admitted(contributor, "units", seed=22)
    dates = admitted(other_contributor, "dates", seed=23, target_modules=("q_proj", "o_proj"))
    admitted(contributor, "secret", seed=24, private=True)
    merged = services.merge_compute_now(mixture=active())
    assert merged.status == Status.DONE, merged.reason
    assert merged.version_ids == [units.pk, dates.pk]
    assert merged.rank == 4 and merged.method == "ties"
    assert merged.adapter_config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert json.loads(merged.config_file.read()) == merged.adapter_config
    with merged.weights_file.open("rb") as weights:
        stored = load(weights.read())
    expected = merge_loras(tiny_model(), stored_inputs([units, dates]), density=0.5)
    assert stored.keys() == expected.tensors.keys()
    assert all(torch.equal(stored[key], expected.tensors[key]) for key in stored)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_a_mixture_without_public_members_is_done_with_no_weights(contributor, tiny_base_model):
    admitted(contributor, "secret", seed=25, private=True)
    merged = services.merge_compute_now(mixture=active())
    assert merged.status == Status.DONE
    assert merged.reason == services.NO_PUBLIC_MEMBERS
    assert merged.version_ids == [] and merged.rank is None
    assert not merged.weights_file and not merged.config_file


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_the_task_is_idempotent_and_a_newer_mixture_supersedes_a_queued_build(
    contributor, tiny_base_model, monkeypatch
):
    admitted(contributor, "units", seed=26)
    older = MergedAdapter.objects.create(mixture=active())
    admitted(contributor, "dates", seed=27)
    newer = MergedAdapter.objects.create(mixture=active())
    assert merge_mixture.run(newer.pk) == "done"
    first = MergedAdapter.objects.get(pk=newer.pk)
    # A redelivered message does no work and keeps the files it wrote.
    monkeypatch.setattr(services, "merged_lora", lambda *a, **k: pytest.fail("rebuilt"))
    assert merge_mixture.run(newer.pk) == "finished"
    assert MergedAdapter.objects.get(pk=newer.pk).weights_file.name == first.weights_file.name
    assert merge_mixture.run(older.pk) == "superseded"
    assert MergedAdapter.objects.get(pk=older.pk).status == Status.SUPERSEDED
    assert merge_mixture.run(older.pk) == "finished"
    assert merge_mixture.run(10**9) == "gone"


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_a_failing_merge_records_why_and_serving_carries_on(
    contributor, tiny_base_model, engine, capsys
):
    units = admitted(contributor, "units", seed=28)
    admitted(contributor, "wide", seed=29, rank=8)
    merged = services.merge_compute_now(mixture=active())
    assert merged.status == Status.FAILED
    assert "same r" in merged.reason and not merged.weights_file
    sync = MixtureSync(engine)
    assert sync.refresh() is True
    assert sync.catalog.merged is None
    assert engine_key(units.pk) in engine.registry and len(sync.catalog) == 2
    with pytest.raises(CommandError, match=r"Merging failed: .*same r"):
        call_command("merge_mixture")


# --- Serving --------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_the_sync_serves_the_built_adapter_and_swaps_it_with_the_mixture(
    contributor, other_contributor, tiny_base_model, engine, monkeypatch
):
    monkeypatch.setattr(sync_module, "RETIRE_GRACE_SECONDS", 0.0)
    admitted(contributor, "units", seed=30)
    admitted(other_contributor, "dates", seed=31)
    first_mixture = active()
    build = MergedAdapter.objects.create(mixture=first_mixture)
    sync = MixtureSync(engine)
    assert sync.refresh() is True
    assert sync.catalog.merged is None  # queued: the mixture is served without it
    assert sync.refresh() is False  # nothing changed, nothing read but two rows
    assert services.merge_compute(merged_id=build.pk) == "done"
    assert sync.refresh() is True
    merged = sync.catalog.merged
    assert merged is not None and merged.key in engine.registry
    assert (
        merged.model_id == MERGED_MODEL_ID
        and merged.title == f"Merged mixture v{first_mixture.number}"
    )
    assert merged.owner_username == "tessera" and merged.private is False
    assert merged.license == "Apache-2.0"  # the members' common license
    assert merged.version_number == first_mixture.number
    assert merged not in tuple(sync.catalog)  # no router picks it
    assert sync.refresh() is False

    # The engine's answer for the merged key is the stored adapter's.
    tokenizer = tiny_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    served = engine.next_token_logits(
        [GenerationRequest(prompt_ids=ids, composition=Composition.single(merged.key))]
    )
    row = MergedAdapter.objects.get(pk=build.pk)
    with row.weights_file.open("rb") as weights:
        tensors = load(weights.read())
    check = Engine(tiny_model(), tokenizer)
    check.add_adapter("m", lora_config=row.adapter_config, tensors=tensors)
    expected = check.next_token_logits(
        [GenerationRequest(prompt_ids=ids, composition=Composition.single("m"))]
    )
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)

    # A new mixture: its catalog has no merged adapter until its own build is done; the old
    # one leaves the engine after the grace period.
    third = admitted(contributor, "third", seed=32)
    third.adapter.license = "MIT"
    third.adapter.save()
    assert sync.refresh() is True
    assert sync.catalog.merged is None
    sync.refresh()
    assert merged.key not in engine.registry
    second = MergedAdapter.objects.create(mixture=active())
    services.merge_compute(merged_id=second.pk)
    assert sync.refresh() is True
    assert sync.catalog.merged.license == "mixed"
    assert sync.catalog.merged.key in engine.registry


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_an_unloadable_merged_adapter_leaves_it_out_and_the_mixture_served(
    contributor, tiny_base_model, engine
):
    units = admitted(contributor, "units", seed=33)
    merged = services.merge_compute_now(mixture=active())
    MergedAdapter.objects.filter(pk=merged.pk).update(
        adapter_config={**merged.adapter_config, "r": 3}
    )
    sync = MixtureSync(engine)
    assert sync.refresh() is True
    assert sync.catalog.merged is None and merged.pk in sync.merged_failed
    assert engine_key(units.pk) in engine.registry


@pytest.mark.django_db
@pytest.mark.usefixtures("no_evaluation")
def test_the_command_builds_the_active_mixture_s_adapter(contributor, tiny_base_model, capsys):
    admitted(contributor, "units", seed=34)
    admitted(contributor, "dates", seed=35)
    call_command("merge_mixture", "--method", "dare_ties", "--density", "0.3")
    merged = MergedAdapter.objects.get(mixture=active())
    assert merged.status == Status.DONE and merged.method == "dare_ties"
    assert merged.density == pytest.approx(0.3)
    assert "2 adapters merged with dare_ties (density 0.3) into rank 4" in capsys.readouterr().out
