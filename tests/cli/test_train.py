"""``tessera train`` against the real platform (pytest-django's live server): the base model
comes down through ``/api/v1/base-model/``, the task's public split through the suites API,
and the kit trains a few steps on the tiny random Llama; the folder it writes is pushed
through the platform's intake. The second run reuses the cached base model and runs as a
separate process with no Django settings to load."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command

from contributions.api import views
from contributions.models import AdapterVersion
from evaluation.management.commands.train_adapter import Command as TrainAdapter
from tessera_cli import basemodel, train
from tessera_cli.api import Platform
from tests.evaluation.test_runs import make_task
from tests.evaluation.test_suites import jsonl

pytestmark = pytest.mark.django_db(transaction=True)

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
TEMPLATE = "What is {a} + {b}?"
FAST = ("--steps", "3", "--batch-size", "4", "--threads", "1", "--no-progress")
METADATA = {
    "slug": "small-sums",
    "title": "Small sums",
    "license": "Apache-2.0",
    "task_tags": ["arithmetic"],
    "intended_use": "Add two small numbers.",
    "training_data_summary": "Eight sums.",
    "example_prompts": ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?"],
}
# Runs the command in a fresh interpreter and reports what it loaded. DJANGO_SETTINGS_MODULE
# names a module that does not exist, so any use of Django's settings would fail.
PROBE = """
import json, sys
from tessera_cli.main import main
code = main(sys.argv[1:])
from django.conf import settings
loaded = {m.split(".")[0] for m in sys.modules}
print(json.dumps({
    "code": code,
    "settings_configured": settings.configured,
    "platform_modules": sorted(loaded & {"rest_framework", "contributions", "routing", "psycopg"}),
}), file=sys.stderr)
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The names of the base model files the live server sent."""
    sent: list[str] = []
    original = views.BaseModelFileApi.get

    def get(self, request, name):
        sent.append(name)
        return original(self, request, name)

    monkeypatch.setattr(views.BaseModelFileApi, "get", get)
    return sent


@pytest.fixture
def addition(db):
    """The platform's task: "addition" in suite "arithmetic", three public examples."""
    return make_task(template=TEMPLATE)


@pytest.fixture
def data_file(tmp_path) -> Path:
    return suite_file(tmp_path / "sums.jsonl", TEMPLATE)


def suite_file(path: Path, template: str) -> Path:
    lines = [
        {"suite": "sums", "title": "Sums to train on", "purpose": "skill"},
        {
            "task": "addition",
            "title": "Addition",
            "tags": ["arithmetic"],
            "metric": "exact_match",
            "prompt_template": template,
            "max_new_tokens": 6,
        },
        *[
            {
                "task": "addition",
                "split": "train",
                "fields": {"a": i, "b": 2 * i},
                "target": str(3 * i),
            }
            for i in range(8)
        ],
    ]
    path.write_bytes(jsonl(lines))
    return path


@pytest.fixture
def replay_file(tmp_path) -> Path:
    path = tmp_path / "replay.jsonl"
    path.write_bytes(jsonl([{"prompt": "What is a spoon for?"}, {"prompt": "Say hello."}]))
    return path


def test_train_downloads_the_base_model_once_and_writes_a_folder_push_accepts(
    cli, logged_in, key, tiny_base_model, addition, data_file, replay_file, cache_dir, downloads,
    tmp_path, config_dir,
):  # fmt: skip
    out = tmp_path / "small-sums"
    args = ["--task", "addition", "--data", data_file, "--replay", replay_file, *FAST]
    first = cli("train", *args, "--out", out)
    assert first.code == 0, first.err

    # The base model: every file of the manifest, once, into the cache under its sha256.
    manifest = httpx.get(
        f"{logged_in}/api/v1/base-model/", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert sorted(downloads) == sorted(f["name"] for f in manifest["files"])
    cached = cache_dir / "base-models" / manifest["sha256"]
    for entry in manifest["files"]:
        assert hashlib.sha256((cached / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    assert "Downloading the base model tiny-llama" in first.out
    assert not list((cache_dir / "base-models").glob(".partial-*"))

    # The folder: the adapter for the platform's name of the base model, and its card.
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == manifest["adapter_base_model_name"]
    card = (out / "README.md").read_text()
    assert f"8 examples from {data_file}" in card
    assert "3 public examples of `addition`" in card  # the platform's public split
    assert "tessera train --task addition" in card and "--steps 3" in card
    assert "Replay: 1 of every 4 examples" in card
    assert "Public split of addition (3 examples, exact_match): base" in first.out
    assert f"tessera push {out}" in first.out

    # The platform's intake accepts it.
    (out / "metadata.json").write_text(json.dumps(METADATA))
    pushed = cli("push", out, "--no-wait")
    assert pushed.code == 0, pushed.err
    version = AdapterVersion.objects.get(adapter__slug="small-sums")
    assert (version.status, version.rank, version.dtype) == ("queued", 8, "float16")

    # Again, as its own process without Django settings: the cached copy, no download.
    again = tmp_path / "again"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "DJANGO_"))}
    env |= {
        "TESSERA_CONFIG_DIR": str(config_dir),
        "TESSERA_CACHE_DIR": str(cache_dir),
        "DJANGO_SETTINGS_MODULE": "no_such_settings_module",
    }
    second = subprocess.run(
        [sys.executable, "-c", PROBE, "train", *map(str, args), "--out", str(again)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    report = json.loads(second.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, second.stdout + second.stderr
    assert report == {"code": 0, "settings_configured": False, "platform_modules": []}
    assert "Using the cached base model tiny-llama" in second.stdout
    assert "Downloading" not in second.stdout
    assert len(downloads) == len(manifest["files"])  # nothing more was sent
    assert {p.name for p in again.iterdir()} == ADAPTER_FILES
    # Same seed, same data, same base model: the same adapter.
    weights = (out / "adapter_model.safetensors").read_bytes()
    assert (again / "adapter_model.safetensors").read_bytes() == weights


def test_train_is_the_same_training_as_train_adapter(
    cli, logged_in, tiny_base_model, addition, data_file, replay_file, cache_dir, tmp_path,
    settings,
):  # fmt: skip
    settings.VAR_DIR = tmp_path / "var"  # train_adapter's replay cache
    common = ["--task", "addition", "--replay", replay_file, *FAST, "--rank", "4", "--seed", "5"]
    result = cli("train", "--data", data_file, "--out", tmp_path / "cli", *common)
    assert result.code == 0, result.err
    call_command(
        "train_adapter", "--jsonl", str(data_file), "--out", str(tmp_path / "server"),
        *map(str, common), stdout=open(os.devnull, "w"),  # noqa: SIM115
    )  # fmt: skip
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "server" / name).read_bytes()
    card = (tmp_path / "cli" / "README.md").read_text()
    assert (
        card.split("Command:")[1].split("## Public split")[1]
        == ((tmp_path / "server" / "README.md").read_text().split("## Public split")[1])
    )  # the same public scores


def test_without_data_it_trains_on_the_platforms_public_split(
    cli, logged_in, tiny_base_model, addition, cache_dir, tmp_path
):
    out = tmp_path / "public"
    result = cli(
        "train", "--task", "arithmetic/addition", "--out", out, "--replay-fraction", "0", *FAST
    )
    assert result.code == 0, result.err
    card = (out / "README.md").read_text()
    assert "3 examples from the public split of suite arithmetic v1" in card
    assert "Replay: none" in card


def test_a_task_the_platform_lacks_trains_unscored_and_another_template_is_noted(
    cli, logged_in, tiny_base_model, data_file, cache_dir, tmp_path
):
    fast = ["--replay-fraction", "0", *FAST]
    unscored = cli(
        "train", "--task", "addition", "--data", data_file, "--out", tmp_path / "a", *fast
    )
    assert unscored.code == 0, unscored.err
    assert "The platform has no current task 'addition'" in unscored.out
    assert "Not measured" in (tmp_path / "a" / "README.md").read_text()

    make_task(template=TEMPLATE)
    other = suite_file(tmp_path / "other.jsonl", "{a} plus {b}?")
    noted = cli("train", "--task", "addition", "--data", other, "--out", tmp_path / "b", *fast)
    assert noted.code == 0, noted.err
    assert "with another prompt template than the platform's" in noted.out
    assert "3 public examples" in (tmp_path / "b" / "README.md").read_text()


def test_the_defaults_are_train_adapters(tmp_path):
    import argparse

    ours = argparse.ArgumentParser()
    train.add_arguments(ours)
    theirs = TrainAdapter().create_parser("manage.py", "train_adapter")
    mine = vars(ours.parse_args(["--task", "t", "--out", "o"]))
    server = vars(theirs.parse_args(["--task", "t", "--out", "o"]))
    for key in train.DEFAULTS:
        assert mine[key] == server[key], key


def test_refusals_are_clear_and_exit_2(
    cli, logged_in, tiny_base_model, addition, data_file, cache_dir, downloads, tmp_path
):
    out = tmp_path / "out"

    def refused(*args) -> str:
        result = cli("train", *args, *FAST)
        assert result.code == 2, result.out + result.err
        assert result.err.startswith("error: ")
        return result.err

    assert "no current task 'nope' to train on" in refused("--task", "nope", "--out", out)
    assert "No such file" in refused("--task", "addition", "--data", tmp_path / "x", "--out", out)
    err = refused("--task", "subtraction", "--data", data_file, "--out", out)
    assert "has no task 'subtraction'" in err and "(training_task_unknown)" in err
    assert "(training_settings_invalid)" in refused(
        "--task", "addition", "--data", data_file, "--out", out, "--rank", "0"
    )
    assert "No such replay file" in refused(
        "--task", "addition", "--data", data_file, "--out", out, "--replay", tmp_path / "none"
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "setup.py").write_text("")
    assert "holds other files (setup.py)" in refused(
        "--task", "addition", "--data", data_file, "--out", project
    )
    assert downloads == [] and not out.exists()


def test_a_platform_without_a_prepared_base_model_is_the_apis_message(
    cli, logged_in, base_model, addition, data_file, cache_dir, tmp_path
):
    result = cli("train", "--task", "addition", "--data", data_file, "--out", tmp_path / "o", *FAST)
    assert result.code == 2
    assert "has no prepared copy on this server" in result.err
    assert "(base_model_not_prepared)" in result.err


def test_before_login_it_says_so(cli, data_file, tmp_path):
    result = cli("train", "--task", "addition", "--data", data_file, "--out", tmp_path / "o")
    assert result.code == 2 and "tessera login" in result.err


# --- The cache, on its own ------------------------------------------------------------------


def test_a_damaged_cached_copy_is_downloaded_again(
    logged_in, key, tiny_base_model, tmp_path, downloads, capsys
):
    with Platform(logged_in, key) as platform:
        manifest = basemodel.parse_manifest(platform.base_model())
        first = basemodel.fetch(platform, manifest, tmp_path, progress=True)
        assert first.downloaded and len(downloads) == len(manifest.files)
        bar = capsys.readouterr().err  # the download's progress line
        assert "base model: 100%" in bar and "B/" in bar
        assert not basemodel.fetch(platform, manifest, tmp_path, progress=False).downloaded
        config = first.folder / "config.json"
        damaged = bytearray(config.read_bytes())
        damaged[-1] ^= 1  # the same size, another sha256
        config.write_bytes(bytes(damaged))
        again = basemodel.fetch(platform, manifest, tmp_path, progress=False)
    assert again.downloaded and again.folder == first.folder
    assert len(downloads) == 2 * len(manifest.files)
    assert basemodel.cached(tmp_path, manifest) == first.folder


def manifest_body(files: dict[str, bytes]) -> dict:
    listed = {
        n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()
    }
    return {
        "name": "m",
        "adapter_base_model_name": "org/m",
        "weights_sha256": "0" * 64,
        "sha256": basemodel.listing_sha256(listed),
        "files": [{"name": n, **entry} for n, entry in listed.items()],
    }


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b", "..", ".hidden", "x\\y"])
def test_a_manifest_naming_a_path_is_refused_before_anything_is_written(name):
    body = manifest_body({"config.json": b"{}"})
    body["files"][0]["name"] = name
    with pytest.raises(basemodel.BaseModelError, match="names a file"):
        basemodel.parse_manifest(body)


def test_a_manifest_whose_listing_does_not_match_its_sha256_is_refused():
    body = manifest_body({"config.json": b"{}"})
    body["files"][0]["sha256"] = "a" * 64
    with pytest.raises(basemodel.BaseModelError, match="does not match its file list"):
        basemodel.parse_manifest(body)


def test_a_file_that_arrives_other_than_listed_is_refused_and_nothing_is_kept(tmp_path):
    body = manifest_body({"config.json": b"{}", "model.safetensors": b"weights"})

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/base-model/"):
            return httpx.Response(200, json=body)
        name = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, content=b"{}" if name == "config.json" else b"weightz")

    transport = httpx.MockTransport(answer)
    with Platform("http://platform.test", "tsr_x", transport=transport) as platform:
        manifest = basemodel.parse_manifest(platform.base_model())
        with pytest.raises(basemodel.BaseModelError, match=r"model\.safetensors arrived with"):
            basemodel.fetch(platform, manifest, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "base-models").iterdir()] == []
