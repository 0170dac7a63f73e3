"""The ``tessera`` command line against the real platform: the REST API on pytest-django's
live server and, for ``ask``, the inference API on a live uvicorn server (tests/routing),
both in this process over the suite's PostgreSQL and Redis.

``main([...])`` runs in-process with its output captured; ``--help`` and one ``push`` (to
its outcome) run the installed console script as a real subprocess. Evaluation runs are
executed by a stand-in worker: the platform's own execution service in a thread, with the
stand-in evaluation child of tests/evaluation.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from contributions.models import Adapter, AdapterVersion
from evaluation.models import EvaluationRun
from evaluation.services import execution
from evaluation.tasks import evaluate_run
from tests.conftest import media_files
from tests.evaluation.test_runs import fake_child, make_task
from tests.routing.conftest import UNITS_PROMPTS, admitted_version
from tests.support import crafted

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).with_name("tessera")
METADATA = {
    "slug": "three-digit-addition",
    "title": "Three-digit addition",
    "description": "Adds two three-digit numbers.",
    "task_tags": ["arithmetic"],
    "languages": ["en"],
    "license": "Apache-2.0",
    "intended_use": "Answer sums of two three-digit numbers with the number alone.",
    "training_data_summary": "Synthetic sums from a seeded generator.",
    "example_prompts": ["What is 347 + 285?", "Add 619 and 204.", "Compute 158 + 876."],
    "contributor": "ada",  # the demo's owner, not an API field: the command must drop it
}


@pytest.fixture
def worker(monkeypatch, tiny_base_model, child, fast_eval):
    """A stand-in Celery worker: each run sent is executed, a moment later, by the worker's
    own service in a thread of this process, with the stand-in child ``child(...)`` sets."""
    threads: list[threading.Thread] = []

    def apply_async(args=None, queue=None, **kwargs):
        def work() -> None:
            try:
                time.sleep(0.3)  # the command sees the run queued first, as with a real queue
                execution.evaluation_run_execute(run_id=args[0], worker="cli-tests:1")
            finally:
                connection.close()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        threads.append(thread)

    monkeypatch.setattr(evaluate_run, "apply_async", apply_async)
    make_task()  # the benchmark task "addition", tagged arithmetic like METADATA
    yield threads
    for thread in threads:
        thread.join(60)


def adapter_folder(
    path: Path, *, seed: int = 0, metadata: dict | None = None, weights: bool = True
) -> Path:
    """A PEFT adapter folder as save_pretrained writes it, with a metadata.json."""
    files = crafted.real_adapter(seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(files.config)
    if weights:
        (path / "adapter_model.safetensors").write_bytes(files.weights)
    (path / "README.md").write_bytes(files.card)
    (path / "metadata.json").write_text(json.dumps(metadata or METADATA))
    return path


# --- login --------------------------------------------------------------------------------------


def test_login_checks_the_token_and_stores_it_readable_by_the_owner_only(
    cli, live_server, key, config_dir
):
    result = cli(
        "login", "--url", f"{live_server.url}/api/v1/", "--token", key,
        "--inference-url", "http://127.0.0.1:8001/v1/",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "as owner" in result.out
    path = config_dir / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "url": live_server.url,
        "inference_url": "http://127.0.0.1:8001/v1",
        "token": key,
    }


def test_login_takes_the_token_from_the_environment(cli, live_server, key, config_dir, monkeypatch):
    monkeypatch.setenv("TESSERA_TOKEN", key)
    assert cli("login", "--url", live_server.url).code == 0
    stored = json.loads((config_dir / "config.json").read_text())
    # Without --inference-url: the standard port on the platform's host.
    assert stored["inference_url"] == "http://localhost:8001/v1"
    assert stored["token"] == key


def test_login_refuses_a_wrong_token_with_the_apis_message_and_stores_nothing(
    cli, live_server, contributor, config_dir
):
    result = cli("login", "--url", live_server.url, "--token", "tsr_nothere_0123456789")
    assert result.code == 2
    assert "Invalid or revoked API token." in result.err
    assert not (config_dir / "config.json").exists()


def test_commands_before_login_say_so(cli):
    result = cli("status")
    assert (result.code, result.out) == (2, "")
    assert "tessera login" in result.err


def test_a_usage_error_exits_2(cli):
    assert cli("push").code == 2
    assert cli("ask", "hi", "--composition", "everything").code == 2


# --- push -----------------------------------------------------------------------------------------


def test_push_no_wait_creates_the_adapter_and_uploads_the_files(
    cli, logged_in, tmp_path, base_model
):
    folder = adapter_folder(tmp_path / "adder")
    result = cli("push", folder, "--no-wait", "--tags", "arithmetic,sums", "--private")
    assert result.code == 0, result.err
    assert "Created adapter three-digit-addition" in result.out
    assert "three-digit-addition v1" in result.out and "queued" in result.out
    adapter = Adapter.objects.get(slug="three-digit-addition")
    assert adapter.owner.username == "owner"
    assert adapter.task_tags == ["arithmetic", "sums"]  # the flags over metadata.json's
    assert adapter.visibility == "private"
    assert adapter.example_prompts == METADATA["example_prompts"]
    version = adapter.versions.get()
    assert (version.number, version.status) == (1, "queued")
    files = crafted.real_adapter(seed=0)
    assert version.weights_file.read() == files.weights
    assert version.config_sha256 and version.card_sha256  # the README.md went up too
    run = EvaluationRun.objects.get(version=version)
    assert run.status == "queued"  # no worker here: it waits


def test_push_of_a_second_version_and_of_the_same_weights_again(
    cli, logged_in, tmp_path, base_model
):
    assert cli("push", adapter_folder(tmp_path / "one"), "--no-wait").code == 0
    second = cli("push", adapter_folder(tmp_path / "two", seed=1), "--no-wait")
    assert second.code == 0, second.err
    assert "Created adapter" not in second.out
    assert "three-digit-addition v2" in second.out
    assert list(AdapterVersion.objects.values_list("number", flat=True).order_by("number")) == [
        1,
        2,
    ]
    again = cli("push", tmp_path / "two", "--no-wait")
    assert again.code == 2
    assert "These exact weights were already uploaded (three-digit-addition v2)" in again.err
    assert AdapterVersion.objects.count() == 2


def test_a_folder_without_weights_gets_the_apis_message_and_nothing_is_stored(
    cli, logged_in, tmp_path, base_model, media_root
):
    assert cli("push", adapter_folder(tmp_path / "one"), "--no-wait").code == 0
    stored = media_files(media_root)
    bad = adapter_folder(tmp_path / "bad", seed=1, weights=False)
    result = cli("push", bad, "--no-wait")
    assert result.code == 2
    assert "The file adapter_model.safetensors is missing from the upload." in result.err
    assert "upload_missing_file" in result.err
    assert AdapterVersion.objects.count() == 1
    assert media_files(media_root) == stored

    # A new slug: the API has no dry run, so the adapter is made before its files are
    # refused; the command says so, and the fixed folder's push adds its first version.
    fresh_bad = adapter_folder(tmp_path / "new", seed=1, metadata={**METADATA, "slug": "new"})
    (fresh_bad / "adapter_model.safetensors").unlink()
    refused = cli("push", fresh_bad, "--no-wait")
    assert refused.code == 2
    assert "The file adapter_model.safetensors is missing from the upload." in refused.err
    assert "The adapter new exists now, with no version" in refused.err
    assert not AdapterVersion.objects.filter(adapter__slug="new").exists()
    assert media_files(media_root) == stored
    adapter_folder(fresh_bad, seed=1, metadata={**METADATA, "slug": "new"})
    fixed = cli("push", fresh_bad, "--no-wait")
    assert fixed.code == 0, fixed.err
    assert "Created adapter" not in fixed.out and "new v1" in fixed.out


def test_a_new_adapter_refused_by_the_api_shows_each_field_and_stores_nothing(
    cli, logged_in, tmp_path, base_model
):
    metadata = {"slug": "Not A Slug", "title": "x", "license": "Apache-2.0"}
    result = cli("push", adapter_folder(tmp_path / "bad", metadata=metadata), "--no-wait")
    assert result.code == 2
    assert "slug: Use 1–64 lowercase letters, digits and hyphens." in result.err
    assert "intended_use: This field is required." in result.err
    assert not Adapter.objects.exists()


def test_push_follows_the_evaluation_and_prints_the_failed_rules(
    cli, logged_in, tmp_path, worker, child
):
    child(fake_child(default=(0.0, 0.0), sleep=0.6))  # no gain on the task: it fails
    result = cli("push", adapter_folder(tmp_path / "adder"), "--poll-interval", "0.1")
    assert result.code == 1, result.err
    assert "100%" in result.err  # the progress bar reached the end
    assert "Outcome: failed" in result.out
    assert "Failed rules:" in result.out
    assert "gain:addition: On Addition the adapter scored 0.000" in result.out
    assert "not met" in result.out
    assert "ci:addition:" in result.out
    assert AdapterVersion.objects.get().status == "failed"


# --- status and withdraw ------------------------------------------------------------------------


def test_status_lists_the_adapters_and_one_adapters_versions(cli, logged_in, tmp_path, base_model):
    assert "no adapters yet" in cli("status").out
    cli("push", adapter_folder(tmp_path / "one"), "--no-wait")
    cli("push", adapter_folder(tmp_path / "two", seed=1), "--no-wait")
    listing = cli("status")
    assert listing.code == 0
    assert "three-digit-addition" in listing.out
    assert "v2 queued" in listing.out
    assert "Three-digit addition" in listing.out
    versions = cli("status", "three-digit-addition")
    assert versions.code == 0
    lines = versions.out.splitlines()
    assert lines[0].startswith("three-digit-addition: Three-digit addition (public)")
    assert lines[1].split()[:2] == ["v2", "queued"]
    assert lines[2].split()[:2] == ["v1", "queued"]
    unknown = cli("status", "nope")
    assert unknown.code == 2
    assert "no adapter 'nope'" in unknown.err


def test_withdraw_the_latest_or_a_named_version(cli, logged_in, tmp_path, base_model):
    cli("push", adapter_folder(tmp_path / "one"), "--no-wait")
    cli("push", adapter_folder(tmp_path / "two", seed=1), "--no-wait")
    latest = cli("withdraw", "three-digit-addition", "--reason", "superseded")
    assert latest.code == 0, latest.err
    assert "Withdrew three-digit-addition v2: withdrawn" in latest.out
    first = cli("withdraw", "three-digit-addition", "--version", "1")
    assert first.code == 0, first.err
    assert dict(AdapterVersion.objects.values_list("number", "status")) == {
        1: "withdrawn",
        2: "withdrawn",
    }
    again = cli("withdraw", "three-digit-addition", "--version", "1")
    assert again.code == 2
    assert "This version is already withdrawn. (already_withdrawn)" in again.err


# --- import-hub -----------------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A huggingface_hub cache holding one snapshot of ``repo_id`` at COMMIT, laid out as
    the library lays it out (blobs, a ref for main, the snapshot's links to its blobs)."""
    import hashlib

    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    return root


def test_import_hub_takes_the_adapter_from_the_hub_cache_with_no_network(
    cli, logged_in, tmp_path, base_model, monkeypatch
):
    from huggingface_hub import constants

    # Offline: a request to the Hub raises before it leaves; the cache answers instead.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    files = crafted.real_adapter(seed=2).files(card=True)
    cache = hub_cache(tmp_path / "hub", "someone/Tiny-Adder_v2", files)
    metadata = tmp_path / "meta.json"
    given = {k: v for k, v in METADATA.items() if k not in ("slug", "description")}
    metadata.write_text(json.dumps(given))
    args = ["--cache-dir", cache, "--metadata", metadata, "--no-wait"]
    result = cli("import-hub", "someone/Tiny-Adder_v2", *args)
    assert result.code == 0, result.err
    assert f"someone/Tiny-Adder_v2@{COMMIT[:12]}" in result.out
    adapter = Adapter.objects.get()
    assert adapter.slug == "tiny-adder-v2"  # from the repository's name
    assert adapter.title == "Three-digit addition"  # metadata over the defaults
    assert adapter.description == (
        f"Imported from the Hugging Face Hub: someone/Tiny-Adder_v2 at commit {COMMIT}."
    )
    version = adapter.versions.get()
    assert version.weights_file.read() == files["adapter_model.safetensors"]
    assert version.card_sha256

    by_commit = cli(
        "import-hub", "someone/Tiny-Adder_v2", "--revision", COMMIT, *args, "--slug", "pinned"
    )
    assert by_commit.code == 2  # the same weights again: the API's duplicate refusal
    assert "already uploaded" in by_commit.err
    missing = cli("import-hub", "someone/absent", "--cache-dir", cache, "--no-wait")
    assert missing.code == 2
    assert "Cannot fetch someone/absent" in missing.err


# --- ask --------------------------------------------------------------------------------------


def test_ask_streams_the_answer_and_says_which_adapters_answered(
    cli, server, contributor, key, monkeypatch
):
    monkeypatch.setenv("TESSERA_URL", "http://127.0.0.1:9")  # not used by ask
    monkeypatch.setenv("TESSERA_TOKEN", key)
    monkeypatch.setenv("TESSERA_INFERENCE_URL", f"{server.url}/v1")
    admitted_version(contributor, slug="unit-conversion", prompts=UNITS_PROMPTS, seed=1)
    deadline = time.monotonic() + 10
    while len(server.runtime.catalog) != 1:
        assert time.monotonic() < deadline, "the adapter never reached the serving catalog"
        time.sleep(0.02)
    prompt = "Convert 7 km to metres."
    whole = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "tessera",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] >= 1

    result = cli("ask", prompt, "--max-tokens", "8", "--temperature", "0")
    assert result.code == 0, result.err
    answer, attribution = result.out.rsplit("\n", 2)[:2]
    assert answer == text
    assert attribution == "Answered by: owner/unit-conversion (weight 1) [top1]"

    composed = cli("ask", prompt, "--composition", "topk", "--k", "2", "--max-tokens", "4")
    assert composed.code == 0, composed.err
    assert "owner/unit-conversion (weight 1) [topk]" in composed.out

    unknown = cli("ask", prompt, "--model", "nobody/nothing")
    assert unknown.code == 2
    assert "model_not_found" in unknown.err


# --- The installed console script ---------------------------------------------------------------


def test_the_console_script_runs_without_the_platforms_code():
    assert CONSOLE_SCRIPT.exists(), "pip install -e . installs the tessera console script"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("login", "push", "status", "withdraw", "import-hub", "ask", "train"):
        assert command in result.stdout
    probe = (
        "import sys, tessera_cli.main; "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'django', 'rest_framework', 'contributions', 'evaluation', 'routing', 'tessera'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_a_push_through_the_console_script_to_admission(
    cli, logged_in, tmp_path, worker, child, config_dir
):
    child(fake_child(sleep=0.3))  # a clear gain on the task: admitted (review is off)
    folder = adapter_folder(tmp_path / "adder")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_CONFIG_DIR"] = str(config_dir)
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "push", str(folder), "--poll-interval", "0.2", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "three-digit-addition v1" in result.stdout
    assert "Outcome: admitted" in result.stdout
    assert "All 5 admission rules passed." in result.stdout
    assert "Addition (hidden, n=12)" in result.stdout
    assert AdapterVersion.objects.get().status == "admitted"


def test_push_over_the_hourly_upload_limit_says_so_at_once(
    cli, logged_in, tmp_path, base_model, settings
):
    settings.TESSERA_UPLOADS_PER_HOUR = 1
    assert cli("push", adapter_folder(tmp_path / "one"), "--no-wait").code == 0
    started = time.monotonic()
    refused = cli("push", adapter_folder(tmp_path / "two", seed=1), "--no-wait")
    assert time.monotonic() - started < 30  # shown, not slept for an hour
    assert refused.code != 0
    assert "upload_rate_limited" in refused.err
    assert AdapterVersion.objects.count() == 1
