"""A fresh clone runs embedded from an empty var/: `make run`'s steps, one by one, then a real
web process and a real Celery worker on every queue, with no DATABASE_URL, no
CELERY_BROKER_URL and no REDIS_URL (SQLite, kombu's filesystem transport and the file cache,
all under the clone's var/). An adapter uploaded through the REST API must be evaluated: the
web process sends the task, the worker consumes it and records an outcome.

Everything else in the suite runs on PostgreSQL and Redis, and its fixtures create whatever
folders they use, so only this test sees what a user's first `make run` sees.

The clone is a copy of the files git would commit (tracked, plus untracked files that are not
ignored) as they are in the working tree: in CI, whose checkout is clean, that is exactly a
clone of HEAD; locally it checks the code being changed, like the rest of the suite does.
Nothing is installed: the clone runs on this interpreter's environment. The base model is the
tiny random Llama, so the whole test takes well under a minute.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import crafted
from tests.support.tiny_model import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
# Whatever points the settings at real services or elsewhere; the clone must run on defaults.
UNSET = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REDIS_URL")
UNSET_PREFIXES = ("DJANGO_", "TESSERA_")
FINISHED = ("succeeded", "failed")


def copy_of_the_checkout(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split(b"\0")):
        source = ROOT / os.fsdecode(name)
        if not os.path.lexists(source):  # deleted in the working tree, not yet in the index
            continue
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def embedded_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in UNSET and not key.startswith(UNSET_PREFIXES)
    }
    env["DJANGO_DEBUG"] = "true"  # as `make run` says for development
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Long-running processes, each in its own session so that one killpg ends its workers;
    their descendants that started sessions of their own (the sandboxed evaluation child)
    are found with psutil and killed too."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], *, cwd: Path, env: dict) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((process, log))
        return process

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {log.name} (exit {process.poll()}) ---\n"
            + log.read_text(errors="replace")[-chars:]
            for process, log in self.started
        )

    def stop_all(self) -> None:
        descendants: list[psutil.Process] = []
        for process, _log in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(process.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                os.killpg(process.pid, signal.SIGTERM)
        for process, _log in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        _gone_now, alive = psutil.wait_procs(descendants, timeout=5)
        for leftover in alive:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                leftover.kill()
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Processes(logs)
    yield started
    started.stop_all()


def manage(clone: Path, env: dict, *args: str) -> str:
    """One `make run` step; its output, or the test fails with it."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"manage.py {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result.stdout


def wait_until_serving(url: str, processes: Processes, web: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if web.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the web process never answered {url}:\n{processes.tails()}")


def upload_and_follow(api: str, token: str, worker: subprocess.Popen) -> tuple[dict, list[str]]:
    """Upload the tiny adapter through the REST API, then poll its run until it finishes (or
    the worker dies, or 90 s pass): the last run seen and every status it went through."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        created = client.post(
            "/adapters/",
            json={
                "slug": "tiny-adder",
                "title": "Tiny adder",
                "license": "Apache-2.0",
                "task_tags": ["arithmetic"],
                "languages": ["en"],
                "intended_use": "Add two numbers.",
                "training_data_summary": "None: random weights for a test.",
                "example_prompts": ["What is 1 + 2?", "Add 7 and 8.", "Sum 10 and 20."],
            },
        )
        assert created.status_code == 201, created.text
        adapter_id = created.json()["id"]
        uploaded = client.post(
            f"/adapters/{adapter_id}/versions/",
            files=[
                ("files", (name, data)) for name, data in crafted.real_adapter().files().items()
            ],
        )
        assert uploaded.status_code == 201, uploaded.text

        seen: list[str] = []
        deadline = time.monotonic() + 90
        while True:
            (run,) = client.get(f"/adapters/{adapter_id}/versions/1/runs/").json()
            if not seen or seen[-1] != run["status"]:
                seen.append(run["status"])
            if (
                run["status"] in FINISHED
                or worker.poll() is not None
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
    return run, seen


def test_a_fresh_clone_runs_embedded_and_evaluates_an_upload(tmp_path, processes):
    clone = copy_of_the_checkout(tmp_path / "clone")
    assert not (clone / "var").exists()
    env = embedded_env(
        TESSERA_BASE_MODEL_SOURCE=str(save_tiny_llama(tmp_path / "tiny-llama")),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # Faster, not different: one torch thread on a shared machine, fewer resamples.
        OMP_NUM_THREADS="1",
        TESSERA_EVAL_BOOTSTRAP_SAMPLES="200",
    )

    # `make run`'s steps, in its order, on a var/ that does not exist yet.
    manage(clone, env, "migrate", "--no-input")
    manage(clone, env, "prepare_base_model")
    manage(clone, env, "load_suites")
    token = re.search(r"API token: (tsr_\S+)", manage(clone, env, "seed_demo")).group(1)

    # The processes platform/run-local.sh starts, but the inference server: no evaluation
    # involves it.
    port = free_port()
    web = processes.start(
        "web",
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=clone,
        env=env,
    )
    worker = processes.start(
        "worker",
        [
            *(sys.executable, "-m", "celery", "-A", "tessera", "worker"),
            *("--queues", "default,maintenance,eval-cpu,eval-gpu", "--concurrency", "1"),
            *("--beat", "--schedule", "var/celerybeat-schedule"),
            *("--loglevel", "INFO"),
        ],
        cwd=clone,
        env=env,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    wait_until_serving(f"{api}/intake-rules/", processes, web)

    run, seen = upload_and_follow(api, token, worker)
    assert run["status"] in FINISHED, f"the run stayed {seen}:\n{processes.tails()}"
    assert run["attempts"] == 1
    assert run["status"] == "succeeded" or run["failure"]["code"], run
    # The broker's folders, exchange tables included, are the clone's, not the current
    # directory's.
    assert (clone / "var" / "broker" / "control").is_dir()
    assert not (clone / "control").exists()
