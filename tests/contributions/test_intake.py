"""contributions.intake: every refusal rule by its code, and real PEFT adapters accepted in
every shape a contributor may send them. Plain unit tests: no database."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load, save

from contributions.intake import (
    IntakeError,
    IntakeLimits,
    UploadPart,
    ValidatedAdapter,
    validate_upload,
)
from tests.support.crafted import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    laid_out_safetensors,
    mutated_config,
    real_adapter,
    safetensors_bytes,
    tar_gz_bytes,
    tar_gz_with_pax_bomb,
    upload,
    zip_bomb_with_lying_sizes,
    zip_bytes,
    zip_marked_encrypted,
)
from tests.support.tiny_model import tiny_architecture

BASE_NAMES = frozenset({"HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"})
PREFIX = "base_model.model.model.layers"
Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"


@functools.cache
def architecture() -> dict:
    return tiny_architecture()


def validate(parts: list[UploadPart], *, limits: IntakeLimits | None = None) -> ValidatedAdapter:
    return validate_upload(
        parts,
        base_model_names=BASE_NAMES,
        architecture=architecture(),
        limits=limits or IntakeLimits(),
    )


def refusal(parts: list[UploadPart], **kwargs) -> IntakeError:
    """The IntakeError validate raises; every refusal must speak in one sentence."""
    with pytest.raises(IntakeError) as caught:
        validate(parts, **kwargs)
    error = caught.value
    assert error.code.split("_", 1)[0] in {"upload", "archive", "config", "weights"}
    assert error.message.endswith(".") and error.message[0].isupper()
    return error


def with_config(config: bytes) -> list[UploadPart]:
    return upload({CONFIG_NAME: config, WEIGHTS_NAME: real_adapter().weights})


def with_config_changes(changes=None, *, drop=()) -> list[UploadPart]:
    return with_config(mutated_config(real_adapter().config, changes, drop=drop))


def with_weights(weights: bytes) -> list[UploadPart]:
    return upload({CONFIG_NAME: real_adapter().config, WEIGHTS_NAME: weights})


def real_tensors() -> dict[str, torch.Tensor]:
    return load(real_adapter().weights)


def in_folder(files: dict[str, bytes], folder: str = "my-adapter") -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in files.items()}


# --- accepted -------------------------------------------------------------------------------


def test_a_real_peft_adapter_sent_as_two_files_is_accepted_with_its_facts():
    adapter = real_adapter()
    result = validate(adapter.parts())
    tensors = real_tensors()
    assert result.config_bytes == adapter.config
    assert result.weights_bytes == adapter.weights
    assert result.card_bytes is None
    assert result.config_sha256 == hashlib.sha256(adapter.config).hexdigest()
    assert result.weights_sha256 == hashlib.sha256(adapter.weights).hexdigest()
    assert result.card_sha256 == ""
    assert result.size_bytes == len(adapter.config) + len(adapter.weights)
    assert (result.rank, result.alpha, result.dropout) == (4, 8.0, 0.0)
    assert result.target_modules == ["q_proj", "v_proj"]
    assert result.dtype == "float32"
    assert result.tensor_count == len(tensors) == 8
    assert result.parameter_count == sum(t.numel() for t in tensors.values())
    assert result.normalised_config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }


def test_the_normalised_config_is_one_peft_itself_accepts():
    config = LoraConfig(**validate(real_adapter().parts()).normalised_config)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}


def test_a_model_card_is_kept_hashed_and_counted():
    adapter = real_adapter()
    result = validate(adapter.parts(card=True))
    assert result.card_bytes == adapter.card
    assert result.card_sha256 == hashlib.sha256(adapter.card).hexdigest()
    assert result.size_bytes == len(adapter.config) + len(adapter.weights) + len(adapter.card)


@pytest.mark.parametrize("archive_name", ["adapter.zip", "adapter.tar.gz", "adapter.TGZ"])
@pytest.mark.parametrize("inside_a_folder", [False, True], ids=["at_the_top", "in_a_folder"])
def test_a_real_adapter_inside_an_archive_is_accepted(archive_name, inside_a_folder):
    adapter = real_adapter()
    files = adapter.files(card=True)
    if inside_a_folder:
        files = in_folder(files)
    make = zip_bytes if archive_name.endswith(".zip") else tar_gz_bytes
    result = validate(upload({archive_name: make(files)}))
    assert result.weights_sha256 == hashlib.sha256(adapter.weights).hexdigest()
    assert result.card_bytes == adapter.card


@pytest.mark.parametrize(("archive_format", "suffix"), [("zip", ".zip"), ("gztar", ".tar.gz")])
def test_archives_of_the_saved_folder_made_by_standard_tools_are_accepted(
    tmp_path, archive_format, suffix
):
    # shutil writes directory entries ("./", "my-adapter/") as real tools do.
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    for name, data in real_adapter().files(card=True).items():
        (folder / name).write_bytes(data)
    for root_dir, base_dir in ((tmp_path, "my-adapter"), (folder, ".")):
        made = shutil.make_archive(
            str(tmp_path / "out"), archive_format, root_dir=root_dir, base_dir=base_dir
        )
        result = validate(upload({f"adapter{suffix}": Path(made).read_bytes()}))
        assert result.card_bytes == real_adapter().card


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_adapters_are_accepted_and_report_their_dtype(dtype):
    result = validate(real_adapter(dtype).parts())
    assert result.dtype == dtype
    assert result.tensor_count == 8


def test_an_adapter_on_every_linear_module_with_a_larger_rank_is_accepted():
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    result = validate(real_adapter(rank=8, lora_alpha=16, target_modules=targets).parts())
    assert result.target_modules == sorted(targets)
    assert (result.rank, result.alpha, result.tensor_count) == (8, 16.0, 2 * 7 * 2)


def test_a_mixed_dtype_file_reports_the_dtype_holding_most_parameters():
    tensors = real_tensors()
    tensors[Q_A] = tensors[Q_A].to(torch.bfloat16)
    assert validate(with_weights(save(tensors))).dtype == "float32"
    halves = {name: t.to(torch.float16) for name, t in tensors.items()}
    halves[Q_B] = halves[Q_B].float()
    assert validate(with_weights(save(halves))).dtype == "float16"


@pytest.mark.parametrize(
    "name",
    [
        None,
        "",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct",
        "/home/someone/models/SmolLM2-135M-Instruct",
        "/home/someone/models/SmolLM2-135M-Instruct/",
        "C:\\models\\SmolLM2-135M-Instruct",
    ],
)
def test_a_base_model_named_by_id_by_local_path_or_not_at_all_is_accepted(name):
    assert validate(with_config_changes({"base_model_name_or_path": name})).rank == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"init_lora_weights": "gaussian"},
        {"init_lora_weights": False},
        {"use_dora": False, "use_rslora": None, "rank_pattern": {}, "modules_to_save": []},
        {"megatron_core": None, "loftq_config": None, "revision": ""},
        {"lora_dropout": 0.1, "lora_alpha": 4.5, "target_modules": ["v_proj", "q_proj", "q_proj"]},
    ],
)
def test_harmless_or_unset_config_values_are_accepted(changes):
    assert validate(with_config_changes(changes)).target_modules == ["q_proj", "v_proj"]


def test_optional_config_keys_may_be_left_out():
    keep = {"peft_type", "task_type", "r", "lora_alpha", "target_modules"}
    drop = set(json.loads(real_adapter().config)) - keep
    result = validate(with_config_changes(drop=drop))
    assert (result.dropout, result.normalised_config["bias"]) == (0.0, "none")


def test_limits_are_read_from_settings(settings):
    settings.TESSERA_MAX_UPLOAD_BYTES = 1000
    settings.TESSERA_MAX_LORA_RANK = 7
    settings.TESSERA_MAX_SAFETENSORS_HEADER_BYTES = 2000
    settings.TESSERA_MAX_TENSORS = 9
    assert IntakeLimits.from_settings() == IntakeLimits(
        max_upload_bytes=1000, max_rank=7, max_header_bytes=2000, max_tensors=9
    )


# --- the parts --------------------------------------------------------------------------------


def test_an_upload_with_no_files_is_refused():
    assert refusal([]).code == "upload_empty"


def test_an_upload_over_the_size_limit_is_refused_as_too_large():
    error = refusal(real_adapter().parts(), limits=IntakeLimits(max_upload_bytes=1000))
    assert (error.code, error.kind) == ("upload_too_large", "too_large")


@pytest.mark.parametrize(
    "name",
    ["adapter_model.bin", "model.pt", "model.pth", "weights.pkl", "x.pickle", "last.ckpt", "A.BIN"],
)
def test_a_pickle_format_is_refused_even_beside_the_right_files(name):
    parts = [*real_adapter().parts(), UploadPart(name, b"\x80\x04K\x01.")]
    assert refusal(parts).code == "upload_pickle_refused"


@pytest.mark.parametrize("member", ["adapter_model.bin", "my-adapter/deep/down/optimizer.pt"])
@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_a_pickle_format_inside_an_archive_is_refused(make, member):
    files = {**real_adapter().files(), member: b"\x80\x04K\x01."}
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    assert refusal(upload({name: make(files)})).code == "upload_pickle_refused"


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_an_upload_without_a_required_file_is_refused(missing):
    files = real_adapter().files(card=True)
    del files[missing]
    error = refusal(upload(files))
    assert (error.code, error.details["name"]) == ("upload_missing_file", missing)


def test_an_archive_without_a_required_file_is_refused():
    files = {CONFIG_NAME: real_adapter().config}
    assert refusal(upload({"a.zip": zip_bytes(files)})).code == "upload_missing_file"


@pytest.mark.parametrize("extra", ["notes.txt", "readme.md", "adapter_config.json.orig"])
def test_an_unexpected_file_is_refused(extra):
    parts = [*real_adapter().parts(), UploadPart(extra, b"hello")]
    assert refusal(parts).code == "upload_unexpected_file"


def test_an_unexpected_file_inside_an_archive_is_refused():
    files = {**real_adapter().files(), "training_args.json": b"{}"}
    assert refusal(upload({"a.tar.gz": tar_gz_bytes(files)})).code == "upload_unexpected_file"


def test_a_file_sent_twice_is_refused():
    parts = [*real_adapter().parts(), UploadPart(CONFIG_NAME, real_adapter().config)]
    assert refusal(parts).code == "upload_duplicate_file"


@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_a_file_repeated_inside_an_archive_is_refused(make):
    members = [*real_adapter().files().items(), (CONFIG_NAME, b"{}")]
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    assert refusal(upload({name: make(members)})).code == "upload_duplicate_file"


def test_an_empty_file_is_refused():
    assert refusal(with_config(b"")).code == "upload_empty_file"


def test_an_archive_beside_loose_files_is_refused():
    parts = [*real_adapter().parts(), UploadPart("a.zip", zip_bytes(real_adapter().files()))]
    assert refusal(parts).code == "upload_archive_not_alone"


def test_two_archives_are_refused():
    archive = zip_bytes(real_adapter().files())
    parts = [UploadPart("a.zip", archive), UploadPart("b.zip", archive)]
    assert refusal(parts).code == "upload_archive_not_alone"


@pytest.mark.parametrize("name", ["adapter.tar", "adapter.tar.bz2", "adapter.7z", "a.rar"])
def test_an_archive_format_we_do_not_unpack_is_refused(name):
    assert refusal(upload({name: b"whatever"})).code == "upload_unsupported_archive"


def test_a_model_card_over_its_size_cap_is_refused():
    parts = [*real_adapter().parts(), UploadPart(CARD_NAME, b"#" * (256 * 1024 + 1))]
    assert refusal(parts).code == "upload_card_too_large"


def test_a_model_card_that_is_not_utf8_text_is_refused():
    parts = [*real_adapter().parts(), UploadPart(CARD_NAME, b"# Card\n\xff\xfe")]
    assert refusal(parts).code == "upload_card_not_text"


# --- archives -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    ["../adapter_config.json", "/adapter_config.json", "x/../../README.md", "x\\..\\README.md"],
)
@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_a_member_path_that_escapes_the_archive_is_refused(make, member):
    files = {**real_adapter().files(), member: b"# card"}
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    assert refusal(upload({name: make(files)})).code == "archive_unsafe_path"


def test_a_symlink_inside_a_zip_is_refused():
    archive = zip_bytes(real_adapter().files(), symlinks={CARD_NAME: "/etc/passwd"})
    assert refusal(upload({"a.zip": archive})).code == "archive_unsupported_member"


@pytest.mark.parametrize(
    "hostile",
    [
        {"symlinks": {CARD_NAME: "/etc/passwd"}},
        {"hardlinks": {CARD_NAME: CONFIG_NAME}},
        {"devices": [CARD_NAME]},
        {"fifos": [CARD_NAME]},
    ],
    ids=["symlink", "hardlink", "device", "fifo"],
)
def test_a_link_device_or_fifo_inside_a_tar_is_refused(hostile):
    archive = tar_gz_bytes(real_adapter().files(), **hostile)
    assert refusal(upload({"a.tar.gz": archive})).code == "archive_unsupported_member"


def test_an_encrypted_zip_member_is_refused():
    archive = zip_marked_encrypted(zip_bytes(real_adapter().files()))
    assert refusal(upload({"a.zip": archive})).code == "archive_unsupported_member"


@pytest.mark.parametrize("inner", ["inner.zip", "inner.tar.gz", "weights.gz", "x.tar"])
@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_an_archive_inside_an_archive_is_refused(make, inner):
    files = {**real_adapter().files(), inner: zip_bytes(real_adapter().files())}
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    assert refusal(upload({name: make(files)})).code == "archive_nested"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a.zip", b"this is not a zip file"),
        ("a.tar.gz", b"this is not gzip"),
        ("a.tgz", b"\x1f\x8b\x08\x00garbage after a gzip magic number"),
        ("a.zip", zip_bytes({CONFIG_NAME: b"{}" * 1000})[:-30]),
        ("a.tgz", tar_gz_bytes({CONFIG_NAME: bytes(range(256)) * 100})[:-200]),
        ("a.tgz", gzip.compress(b"a gzip of something that is not a tar")),
    ],
    ids=["not_zip", "not_gzip", "bad_gzip", "truncated_zip", "truncated_tgz", "gzip_not_tar"],
)
def test_a_corrupt_archive_is_refused(name, data):
    assert refusal(upload({name: data})).code == "archive_corrupt"


def test_a_zip_bomb_whose_headers_understate_its_size_never_inflates_past_them():
    # zipfile stops at the declared size, so the bomb ends as a checksum failure.
    bomb = zip_bomb_with_lying_sizes(WEIGHTS_NAME, inflated_bytes=50_000_000, declared_bytes=100)
    assert len(bomb) < 100_000
    assert refusal(upload({"a.zip": bomb})).code == "archive_corrupt"


@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_an_archive_that_unpacks_past_the_limit_is_refused_as_too_large(make):
    files = {**real_adapter().files(), CARD_NAME: b"#" * 2_000_000}
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    archive = make(files)
    limits = IntakeLimits(max_upload_bytes=1_000_000)
    assert len(archive) < limits.max_upload_bytes
    error = refusal(upload({name: archive}), limits=limits)
    assert (error.code, error.kind) == ("archive_too_large", "too_large")


def test_a_tar_whose_hidden_pax_record_inflates_past_the_limit_is_stopped_while_reading():
    archive = tar_gz_with_pax_bomb(real_adapter().files(), pax_bytes=8_000_000)
    limits = IntakeLimits(max_upload_bytes=500_000)
    assert len(archive) < limits.max_upload_bytes
    assert refusal(upload({"a.tgz": archive}), limits=limits).code == "archive_too_large"


@pytest.mark.parametrize("make", [zip_bytes, tar_gz_bytes], ids=["zip", "tar.gz"])
def test_an_archive_with_too_many_members_is_refused(make):
    files = {**real_adapter().files(), **{f"extra{i}.txt": b"x" for i in range(15)}}
    name = "adapter.zip" if make is zip_bytes else "adapter.tgz"
    assert refusal(upload({name: make(files)})).code == "archive_too_many_members"


@pytest.mark.parametrize(
    "paths",
    [
        ["one/adapter_config.json", "two/adapter_model.safetensors"],
        ["adapter_config.json", "folder/adapter_model.safetensors"],
        ["a/b/adapter_config.json", "a/b/adapter_model.safetensors"],
    ],
    ids=["two_folders", "top_and_folder", "two_levels_deep"],
)
def test_an_archive_not_laid_out_flat_or_in_one_folder_is_refused(paths):
    adapter = real_adapter()
    files = dict(zip(paths, (adapter.config, adapter.weights), strict=True))
    assert refusal(upload({"a.zip": zip_bytes(files)})).code == "archive_bad_layout"


# --- adapter_config.json --------------------------------------------------------------------


def test_a_config_over_its_size_cap_is_refused():
    padded = real_adapter().config[:-1] + b" " * 70_000 + b"}"
    assert refusal(with_config(padded)).code == "config_too_large"


@pytest.mark.parametrize(
    "config",
    [
        b"not json",
        b"[1, 2, 3]",
        '{"r": 4}'.encode("utf-16"),
        b'{"r": 4, "r": 8}',
        b'{"r": NaN}',
        b"[" * 30_000 + b"]" * 30_000,
    ],
    ids=["not_json", "not_an_object", "utf16", "repeated_key", "nan", "deeply_nested"],
)
def test_a_config_that_is_not_a_utf8_json_object_is_refused(config):
    assert refusal(with_config(config)).code == "config_invalid_json"


@pytest.mark.parametrize(
    "changes",
    [
        {"auto_mapping": {"base_model_class": "X", "parent_library": "os"}},
        {"auto_map": {"AutoModel": "evil.Model"}},
        {"modules_to_save": ["lm_head"]},
        {"megatron_config": {"tensor_model_parallel_size": 1}},
        {"megatron_core": "evil.module"},
        {"revision": "main"},
        {"trainable_token_indices": [1, 2]},
        {"loftq_config": {"loftq_bits": 4}},
        {"eva_config": {"rho": 2.0}},
        {"corda_config": {"cache_file": "/tmp/x"}},
        {"lora_ga_config": {"direction": "ArB2r"}},
        {"layer_replication": [[0, 2]]},
        {"target_parameters": ["mlp.experts.gate_up_proj"]},
        {"trust_remote_code": True},
        {"trust_remote_code": False},
        {"code_revision": "abc"},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_a_forbidden_config_key_with_a_value_is_refused(changes):
    error = refusal(with_config_changes(changes))
    assert (error.code, error.details["key"]) == ("config_forbidden_key", next(iter(changes)))


@pytest.mark.parametrize("key", ["surprise", "decoder_layers", "target_modules "])
def test_an_unknown_config_key_is_refused(key):
    error = refusal(with_config_changes({key: 1}))
    assert (error.code, error.details["keys"]) == ("config_unknown_key", [key])


@pytest.mark.parametrize("key", ["peft_type", "task_type", "r", "lora_alpha", "target_modules"])
def test_a_config_without_a_required_key_is_refused(key):
    assert refusal(with_config_changes(drop=[key])).code == "config_missing_key"
    assert refusal(with_config_changes({key: None})).code == "config_missing_key"


@pytest.mark.parametrize("peft_type", ["LOHA", "lora", "IA3"])
def test_a_config_for_another_peft_method_is_refused(peft_type):
    assert refusal(with_config_changes({"peft_type": peft_type})).code == "config_not_lora"


def test_a_config_for_another_task_is_refused():
    error = refusal(with_config_changes({"task_type": "SEQ_CLS"}))
    assert error.code == "config_wrong_task_type"


@pytest.mark.parametrize("rank", [0, -1, 65])
def test_a_rank_outside_the_allowed_range_is_refused(rank):
    assert refusal(with_config_changes({"r": rank})).code == "config_rank_out_of_range"


def test_the_rank_limit_comes_from_the_limits():
    error = refusal(real_adapter().parts(), limits=IntakeLimits(max_rank=2))
    assert error.code == "config_rank_out_of_range"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"lora_alpha": 2048}, "config_alpha_out_of_range"),
        ({"lora_alpha": 1e308}, "config_alpha_out_of_range"),
        ({"lora_alpha": 257}, "config_scale_out_of_range"),  # 64.25 at r = 4
        ({"lora_alpha": 0.02}, "config_scale_out_of_range"),  # 0.005
        ({"r": 64, "lora_alpha": 0.1}, "config_scale_out_of_range"),
        ({"lora_dropout": 0.6}, "config_dropout_out_of_range"),
        ({"lora_dropout": 1.0}, "config_dropout_out_of_range"),
    ],
    ids=repr,
)
def test_numbers_beyond_what_a_real_lora_uses_are_refused_with_their_bound(changes, code):
    error = refusal(with_config_changes(changes))
    assert error.code == code
    bound = {"max_alpha", "min_scale", "max_scale", "max_dropout"} & set(error.details)
    assert bound, error.details


@pytest.mark.parametrize(
    "changes", [{"lora_alpha": 256}, {"lora_alpha": 4 / 128}, {"lora_dropout": 0.5}], ids=repr
)
def test_the_bounds_themselves_are_accepted(changes):
    result = validate(with_config_changes(changes))
    if "lora_alpha" in changes:
        assert result.alpha == float(changes["lora_alpha"])
    if "lora_dropout" in changes:
        assert result.dropout == changes["lora_dropout"]


@pytest.mark.parametrize(
    "changes",
    [
        {"r": "4"},
        {"r": 4.0},
        {"r": True},
        {"lora_alpha": 0},
        {"lora_alpha": -8},
        {"lora_alpha": "8"},
        {"lora_alpha": True},
        {"lora_dropout": -0.1},
        {"lora_dropout": "0"},
        {"target_modules": []},
        {"target_modules": ["q_proj", 3]},
        {"target_modules": {"q_proj": True}},
        {"init_lora_weights": 3},
        {"inference_mode": "yes"},
        {"peft_version": 21},
        {"qalora_group_size": "16"},
        {"base_model_name_or_path": 5},
    ],
    ids=repr,
)
def test_a_config_value_of_the_wrong_type_or_range_is_refused(changes):
    error = refusal(with_config_changes(changes))
    assert (error.code, error.details["key"]) == ("config_invalid_value", next(iter(changes)))


@pytest.mark.parametrize(
    "changes",
    [
        {"use_dora": True},
        {"use_rslora": True},
        {"fan_in_fan_out": True},
        {"bias": "all"},
        {"bias": "lora_only"},
        {"lora_bias": True},
        {"use_qalora": True},
        {"use_bdlora": {"nblocks": 2}},
        {"alora_invocation_tokens": [1, 2]},
        {"arrow_config": {"top_k": 3}},
        {"layers_to_transform": [0]},
        {"layers_pattern": "layers"},
        {"rank_pattern": {"q_proj": 8}},
        {"alpha_pattern": {"q_proj": 16}},
        {"exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        {"ensure_weight_tying": True},
    ],
    ids=repr,
)
def test_a_lora_variant_other_than_plain_lora_is_refused(changes):
    error = refusal(with_config_changes(changes))
    assert (error.code, error.details["key"]) == ("config_unsupported_option", next(iter(changes)))


@pytest.mark.parametrize("targets", [".*\\.(q|v)_proj", "all-linear", "q_proj"])
def test_target_modules_given_as_a_regular_expression_string_are_refused(targets):
    error = refusal(with_config_changes({"target_modules": targets}))
    assert error.code == "config_target_modules_regex"


@pytest.mark.parametrize(
    "targets", [["q_proj", "lm_head"], ["embed_tokens"], ["self_attn.q_proj"], ["c_attn"]]
)
def test_target_modules_the_base_model_does_not_have_are_refused(targets):
    error = refusal(with_config_changes({"target_modules": targets}))
    assert error.code == "config_unknown_target_module"


@pytest.mark.parametrize(
    "name", ["meta-llama/Llama-2-7b-hf", "/home/someone/SmolLM2-360M", "SmolLM2-135M-Instruct/x"]
)
def test_an_adapter_trained_for_another_base_model_is_refused(name):
    error = refusal(with_config_changes({"base_model_name_or_path": name}))
    assert error.code == "config_base_model_mismatch"


# --- adapter_model.safetensors --------------------------------------------------------------


def test_a_safetensors_header_over_the_limit_is_refused_before_it_is_parsed():
    # The declared length alone decides: the bytes after it are never looked at.
    hostile = safetensors_bytes(b"\xff not json", header_length=2**63)
    assert refusal(with_weights(hostile)).code == "weights_header_too_large"
    error = refusal(real_adapter().parts(), limits=IntakeLimits(max_header_bytes=100))
    assert error.code == "weights_header_too_large"


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "weights",
    [
        b"short",
        safetensors_bytes({"a": _entry()}, bytes(4), header_length=10_000),
        safetensors_bytes(b"{not json", bytes(4)),
        safetensors_bytes(b"[]"),
        safetensors_bytes(b'{"a": {}, "a": {}}'),
        safetensors_bytes({"__metadata__": {"format": 1}, "a": _entry()}, bytes(4)),
        safetensors_bytes({"__metadata__": {"x": "y" * 70_000}, "a": _entry()}, bytes(4)),
        safetensors_bytes({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        safetensors_bytes({"a": {**_entry(), "extra": 1}}, bytes(4)),
        safetensors_bytes({"a": _entry(shape=(-1,))}, bytes(4)),
        safetensors_bytes({"a": _entry(shape=(1.0,))}, bytes(4)),
        safetensors_bytes({"a": _entry(shape="1")}, bytes(4)),
    ],
    ids=[
        "shorter_than_8_bytes",
        "header_past_the_end",
        "not_json",
        "not_an_object",
        "repeated_tensor",
        "metadata_not_strings",
        "metadata_too_large",
        "entry_without_offsets",
        "entry_with_extra_key",
        "negative_dimension",
        "float_dimension",
        "shape_not_a_list",
    ],
)
def test_a_malformed_safetensors_header_is_refused(weights):
    assert refusal(with_weights(weights)).code == "weights_invalid_header"


def test_more_tensors_than_the_limit_are_refused():
    error = refusal(real_adapter().parts(), limits=IntakeLimits(max_tensors=7))
    assert error.code == "weights_too_many_tensors"


@pytest.mark.parametrize("dtype", ["F64", "I64", "I32", "U8", "BOOL", "F8_E4M3"])
def test_a_tensor_dtype_other_than_f16_bf16_f32_is_refused(dtype):
    weights = laid_out_safetensors({Q_A: ("F32", [4, 64]), Q_B: (dtype, [64, 4])})
    error = refusal(with_weights(weights))
    assert (error.code, error.details["dtype"]) == ("weights_dtype", dtype)


@pytest.mark.parametrize(
    ("header", "data_length"),
    [
        ({"a": _entry(offsets=(0, 4)), "b": _entry(offsets=(2, 6))}, 8),
        ({"a": _entry(offsets=(0, 4)), "b": _entry(offsets=(8, 12))}, 12),
        ({"a": _entry(offsets=(4, 8)), "b": _entry(offsets=(4, 8))}, 8),
        ({"a": _entry(offsets=(0, 8))}, 8),
        ({"a": _entry(offsets=(4, 0))}, 4),
        ({"a": _entry(offsets=(0,))}, 4),
        ({"a": _entry(offsets=(0, "4"))}, 4),
        ({"a": _entry(shape=(2**62, 2**62, 2**62), offsets=(0, 4))}, 4),
        ({"a": _entry(offsets=(0, 4))}, 16),
        ({"a": _entry(offsets=(0, 4))}, 2),
    ],
    ids=[
        "overlap",
        "gap",
        "same_bytes_twice",
        "range_longer_than_shape",
        "end_before_begin",
        "one_offset",
        "offset_not_int",
        "huge_shape",
        "bytes_left_over",
        "range_past_the_end",
    ],
)
def test_tensor_byte_ranges_that_do_not_tile_the_data_exactly_are_refused(header, data_length):
    weights = safetensors_bytes(header, bytes(data_length))
    assert refusal(with_weights(weights)).code == "weights_offsets_invalid"


@pytest.mark.parametrize(
    "name",
    [
        f"{PREFIX}.0.self_attn.k_proj.lora_A.weight",  # a module the config does not target
        f"{PREFIX}.2.self_attn.q_proj.lora_A.weight",  # a layer the base does not have
        f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector",  # DoRA
        f"{PREFIX}.0.self_attn.q_proj.lora_A.bias",
        "base_model.model.lm_head.weight",  # a full layer smuggled in
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "model.layers.0.self_attn.q_proj.lora_A.weight",  # without PEFT's prefix
    ],
)
def test_a_tensor_that_is_not_a_targeted_lora_weight_is_refused(name):
    tensors = {**real_tensors(), name: torch.zeros(4, 64)}
    error = refusal(with_weights(save(tensors)))
    assert (error.code, error.details["tensor"]) == ("weights_unexpected_tensor", name)


@pytest.mark.parametrize(
    "dropped",
    [
        [Q_B],
        [Q_A],
        [f"{PREFIX}.1.self_attn.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj") for ab in "AB"],
    ],
    ids=["a_lora_B", "a_lora_A", "a_whole_layer"],
)
def test_a_targeted_module_without_its_lora_weights_is_refused(dropped):
    tensors = {name: t for name, t in real_tensors().items() if name not in dropped}
    assert refusal(with_weights(save(tensors))).code == "weights_missing_tensor"


@pytest.mark.parametrize(
    ("name", "shape"),
    [(Q_A, (64, 4)), (Q_B, (4, 64)), (Q_A, (4, 32)), (Q_B, (64, 8)), (Q_A, (4, 64, 1))],
    ids=["A_transposed", "B_transposed", "A_wrong_in_features", "B_wrong_rank", "A_three_dims"],
)
def test_a_lora_weight_of_the_wrong_shape_is_refused(name, shape):
    tensors = {**real_tensors(), name: torch.zeros(shape)}
    assert refusal(with_weights(save(tensors))).code == "weights_shape_mismatch"


def test_weights_of_another_rank_than_the_config_says_are_refused():
    error = refusal(with_config_changes({"r": 8}))
    assert error.code == "weights_shape_mismatch"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_holding_nan_or_infinity_is_refused(value, dtype):
    tensors = {name: t.to(dtype) for name, t in real_tensors().items()}
    tensors[Q_B][3, 1] = value
    error = refusal(with_weights(save(tensors)))
    assert (error.code, error.details["tensor"]) == ("weights_not_finite", Q_B)
