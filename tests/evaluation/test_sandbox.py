"""The sandbox, with small Python snippets run under exactly the limits and isolation the
evaluation child gets: no network, rlimits, the wall clock, the output protocol."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from evaluation.worker import sandbox
from evaluation.worker.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    run_sandboxed,
    sandbox_mode,
    workdir_create,
    workdir_remove,
)

GiB = 1024**3


def _available(mode: str) -> bool:
    return sandbox._probe(mode) is None


ISOLATING = [
    pytest.param(
        mode, marks=pytest.mark.skipif(not _available(mode), reason=f"{mode} does not work here")
    )
    for mode in ("bwrap", "unshare")
]


def limits(**changes) -> SandboxLimits:
    values = {
        "memory_bytes": 4 * GiB,
        "cpu_seconds": 60,
        "open_files": 256,
        "file_bytes": 16 * 1024 * 1024,
        "wall_seconds": 30.0,
    }
    values.update(changes)
    return SandboxLimits(**values)


@pytest.fixture
def workdir():
    path, _adapter_dir = workdir_create(files={"adapter_model.safetensors": b"weights"})
    yield path
    workdir_remove(path)


def run(code: str, workdir: Path, *, mode: str, stdin: bytes = b"", **limit_changes):
    return run_sandboxed(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin_bytes=stdin,
        limits=limits(**limit_changes),
        workdir=workdir,
        mode=mode,
        readonly=[workdir / "adapter"],
    )


RESULT = (
    "import json, sys\ndef result(value):\n    print(json.dumps({'result': value}), flush=True)\n"
)


# --- network -------------------------------------------------------------------------------


CONNECT = RESULT + textwrap.dedent(
    """
    import socket
    outcomes = {}
    for host, port in [("127.0.0.1", PORT), ("1.1.1.1", 53)]:
        try:
            socket.create_connection((host, port), timeout=3).close()
            outcomes[host] = "connected"
        except OSError as exc:
            outcomes[host] = exc.errno
    result(outcomes)
    """
)


@pytest.mark.parametrize("mode", ISOLATING)
def test_the_child_cannot_open_a_network_connection(mode, workdir, redis_proc):
    outcome = run(CONNECT.replace("PORT", str(redis_proc.port)), workdir, mode=mode)
    assert outcome.failure() is None, outcome.log
    # A new network namespace: loopback is down (unshare) or up with nothing listening
    # (bwrap brings lo up), and there is no route anywhere else.
    assert outcome.result["127.0.0.1"] in (errno.ENETUNREACH, errno.ECONNREFUSED)
    assert outcome.result["1.1.1.1"] in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def test_without_a_sandbox_the_same_snippet_reaches_redis(workdir, redis_proc):
    """The control: the test above would notice a sandbox that isolates nothing."""
    socket.create_connection((redis_proc.host, redis_proc.port), timeout=3).close()
    outcome = run(CONNECT.replace("PORT", str(redis_proc.port)), workdir, mode="none")
    assert outcome.result["127.0.0.1"] == "connected"


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ISOLATING)
def test_memory_over_the_address_space_limit_fails_with_a_memory_reason(mode, workdir):
    outcome = run("block = bytearray(2 * 1024**3)\n", workdir, mode=mode, memory_bytes=GiB)
    code, reason = outcome.failure()
    assert code == "sandbox_memory"
    assert "out of memory" in reason and "1 GiB" in reason


def test_the_evaluation_childs_memory_exit_status_reads_as_memory(workdir):
    outcome = run("import sys; sys.exit(86)\n", workdir, mode=sandbox_mode())
    assert outcome.failure()[0] == "sandbox_memory"


@pytest.mark.parametrize("mode", ISOLATING)
def test_the_wall_clock_deadline_kills_the_child_and_its_children(mode, workdir):
    token = uuid.uuid4().hex
    code = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)  # {token}"])
        time.sleep(300)
    """
    started = time.monotonic()
    outcome = run(code, workdir, mode=mode, wall_seconds=2.0)
    assert time.monotonic() - started < 15
    assert outcome.timed_out
    code, reason = outcome.failure()
    assert code == "sandbox_deadline"
    assert "deadline" in reason and "2 s" in reason
    time.sleep(0.5)
    assert not _processes_with(token), "a grandchild outlived the deadline kill"


@pytest.mark.parametrize("mode", ISOLATING)
def test_a_grandchild_in_its_own_session_dies_at_the_deadline_too(mode, workdir):
    """setsid and a double fork leave the child's process group; its PID namespace still
    holds it, and the namespace ends with the sandbox."""
    token = uuid.uuid4().hex
    code = f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)",
                                          "{token}"])
            os._exit(0)
        os.wait()
        time.sleep(300)
    """
    outcome = run(code, workdir, mode=mode, wall_seconds=2.0)
    assert outcome.failure()[0] == "sandbox_deadline"
    time.sleep(0.5)
    assert not _processes_with(token), "a detached grandchild outlived the deadline kill"


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("mode", ISOLATING)
def test_the_cpu_time_limit_stops_a_busy_child(mode, workdir):
    outcome = run("while True:\n    pass\n", workdir, mode=mode, cpu_seconds=1)
    code, reason = outcome.failure()
    assert code == "sandbox_cpu_time"
    assert "CPU time limit of 1 s" in reason


@pytest.mark.parametrize("mode", ISOLATING)
def test_the_file_size_limit_stops_a_large_write(mode, workdir):
    code = "open('big.bin', 'wb').write(b'x' * (4 * 1024 * 1024))\n"
    outcome = run(code, workdir, mode=mode, file_bytes=1024 * 1024)
    code, reason = outcome.failure()
    assert code == "sandbox_file_size"
    assert "1 MiB" in reason


@pytest.mark.parametrize("mode", ISOLATING)
def test_a_signal_is_named(mode, workdir):
    outcome = run("import os, signal\nos.abort()\n", workdir, mode=mode)
    code, reason = outcome.failure()
    assert code == "sandbox_signal"
    assert "SIGABRT" in reason


@pytest.mark.parametrize("mode", ISOLATING)
def test_the_child_cannot_raise_its_limits_or_write_the_adapter_copy(mode, workdir):
    code = RESULT + textwrap.dedent(
        """
        import resource
        found = {}
        try:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
            found["raise"] = "raised"
        except (ValueError, OSError):
            found["raise"] = "refused"
        try:
            open("adapter/adapter_model.safetensors", "ab").write(b"x")
            found["write"] = "written"
        except OSError as exc:
            found["write"] = exc.errno
        try:
            open("adapter/new-file", "wb")
            found["create"] = "created"
        except OSError as exc:
            found["create"] = exc.errno
        found["read"] = open("adapter/adapter_model.safetensors", "rb").read().decode()
        result(found)
        """
    )
    outcome = run(code, workdir, mode=mode)
    assert outcome.failure() is None, outcome.log
    assert outcome.result["raise"] == "refused"
    assert outcome.result["write"] in (errno.EACCES, errno.EPERM, errno.EROFS)
    assert outcome.result["create"] in (errno.EACCES, errno.EPERM, errno.EROFS)
    assert outcome.result["read"] == "weights"


def test_the_child_gets_a_minimal_offline_environment(workdir, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://secret@db/tessera")
    monkeypatch.setenv("DJANGO_SECRET_KEY", "s3cret")
    code = RESULT + "import os\nresult(dict(os.environ))\n"
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
    )
    env = outcome.result
    assert "DATABASE_URL" not in env and "DJANGO_SECRET_KEY" not in env
    assert not any("SECRET" in key or "PASSWORD" in key for key in env)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


# --- the output protocol ---------------------------------------------------------------------


def test_progress_lines_reach_the_parent_and_stdin_reaches_the_child(workdir):
    code = RESULT + textwrap.dedent(
        """
        job = json.loads(sys.stdin.read())
        for i in range(job["n"] + 1):
            print(json.dumps({"progress": i, "total": job["n"], "label": "step"}), flush=True)
        result({"echo": job})
        """
    )
    seen = []
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=json.dumps({"n": 3}).encode(),
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
        on_progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert outcome.failure() is None
    assert seen == [(0, 3, "step"), (1, 3, "step"), (2, 3, "step"), (3, 3, "step")]
    assert outcome.result == {"echo": {"n": 3}}


@pytest.mark.parametrize(
    "line",
    [
        "hello, not JSON",
        '{"neither": 1}',
        '{"progress": 5, "total": 2, "label": "x"}',
        '{"progress": "1", "total": 2}',
        '["result"]',
    ],
)
def test_bad_output_is_a_bad_output_failure(line, workdir):
    code = f"print({line!r}, flush=True)\n" + RESULT + "result({})\n"
    outcome = run(code, workdir, mode=sandbox_mode())
    code, reason = outcome.failure()
    assert code == "sandbox_bad_output"
    assert "invalid output" in reason


def test_the_log_is_the_capped_tail_of_stderr(workdir):
    code = "import sys\nsys.stderr.write('a' * 400_000 + 'THE END')\n"
    outcome = run(code, workdir, mode=sandbox_mode())
    assert outcome.failure() is None
    assert outcome.log.endswith("THE END")
    assert len(outcome.log) < sandbox.LOG_CAP_BYTES + 200
    assert "earlier bytes of the log dropped" in outcome.log


def test_a_caller_that_loses_the_run_stops_the_child(workdir):
    calls = []

    def tick() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 3

    started = time.monotonic()
    outcome = run_sandboxed(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
        tick=tick,
    )
    assert time.monotonic() - started < 10
    assert outcome.aborted
    assert outcome.failure()[0] == "run_taken_away"


# --- choosing the mode ------------------------------------------------------------------------


@pytest.fixture
def no_sandbox_tools(monkeypatch, tmp_path):
    """A PATH with python but neither bwrap nor unshare."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    monkeypatch.setenv("PATH", str(bin_dir))
    sandbox.sandbox_probe_reset()
    yield
    sandbox.sandbox_probe_reset()


@pytest.mark.parametrize("setting", ["auto", "bwrap", "unshare"])
def test_production_settings_refuse_to_run_without_a_working_sandbox(setting, no_sandbox_tools):
    with pytest.raises(SandboxUnavailable) as excinfo:
        sandbox_mode(setting=setting, allow_network=False)
    assert excinfo.value.code == "sandbox_unavailable"
    assert "not installed" in excinfo.value.message


def test_unshare_is_refused_outside_development():
    """It isolates the network and the processes, not the filesystem: a child could read
    the .env file and the database."""
    with pytest.raises(SandboxUnavailable) as excinfo:
        sandbox_mode(setting="unshare", allow_network=False, allow_unshare=False)
    assert excinfo.value.code == "sandbox_unavailable"
    assert "refused outside development" in excinfo.value.message


def test_auto_falls_back_to_unshare_only_in_development(monkeypatch):
    monkeypatch.setattr(
        sandbox, "_probe", lambda mode: None if mode == "unshare" else "bwrap is not installed"
    )
    assert sandbox_mode(setting="auto", allow_network=False, allow_unshare=True) == "unshare"
    with pytest.raises(SandboxUnavailable) as excinfo:
        sandbox_mode(setting="auto", allow_network=False, allow_unshare=False)
    assert "bwrap is not installed" in excinfo.value.message
    assert "unshare:" not in excinfo.value.message


def _production_settings(sandbox_setting: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "x" * 50,
        "TESSERA_SUITE_SEED": "0123456789abcdef0123",
        "TESSERA_SANDBOX": sandbox_setting,
    }
    return subprocess.run(
        [sys.executable, "-c", "import tessera.settings"],
        env=env,
        cwd=sandbox.PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_production_settings_refuse_unshare_at_startup():
    refused = _production_settings("unshare")
    assert refused.returncode != 0
    assert "TESSERA_SANDBOX=unshare gives no filesystem isolation" in refused.stderr
    assert "TESSERA_SANDBOX" not in _production_settings("bwrap").stderr


def test_none_is_refused_unless_network_is_allowed():
    with pytest.raises(SandboxUnavailable):
        sandbox_mode(setting="none", allow_network=False)
    assert sandbox_mode(setting="none", allow_network=True) == "none"


def test_an_allowed_network_falls_back_to_no_isolation(no_sandbox_tools):
    assert sandbox_mode(setting="auto", allow_network=True) == "none"


def test_auto_prefers_bubblewrap_then_unshare():
    expected = "bwrap" if _available("bwrap") else "unshare" if _available("unshare") else None
    if expected is None:
        pytest.skip("no sandbox works here")
    assert sandbox_mode(setting="auto", allow_network=False) == expected


def test_the_workdir_copy_is_read_only_and_removed_cleanly():
    path, adapter_dir = workdir_create(files={"adapter_model.safetensors": b"w"})
    assert oct((adapter_dir / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o444"
    assert oct(adapter_dir.stat().st_mode & 0o777) == "0o555"
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    workdir_remove(path)
    assert not path.exists()


def test_stale_workdirs_of_a_killed_attempt_are_removed():
    from evaluation.worker.sandbox import workdirs_remove_stale

    left, _ = workdir_create(files={"adapter_model.safetensors": b"w"}, prefix="tessera-run-999-")
    other, _ = workdir_create(files={"adapter_model.safetensors": b"w"}, prefix="tessera-run-9990-")
    try:
        assert workdirs_remove_stale("tessera-run-999-") == 1
        assert not left.exists()
        assert other.exists()
    finally:
        workdir_remove(other)
