"""Children that try to get out of the bubblewrap sandbox: real bwrap, real processes.

Each test runs a small Python script through ``run_sandboxed`` exactly as the evaluation
child runs (same argv prefix, limits, mounts and uid), has it try one way out, and checks
both that it failed and what the contributor would be told.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from evaluation.worker import sandbox
from evaluation.worker.sandbox import (
    PROJECT_ROOT,
    SandboxLimits,
    run_sandboxed,
    workdir_create,
    workdir_remove,
)

pytestmark = pytest.mark.skipif(
    sandbox._probe("bwrap") is not None,
    reason=f"bubblewrap does not work here: {sandbox._probe('bwrap')}",
)

GiB = 1024**3
VAR_DIR = PROJECT_ROOT / "var"

RESULT = (
    "import json, os, sys\n"
    "def result(value):\n"
    "    print(json.dumps({'result': value}), flush=True)\n"
)


def limits(**changes) -> SandboxLimits:
    values = {
        "memory_bytes": 4 * GiB,
        "cpu_seconds": 60,
        "open_files": 256,
        "file_bytes": 16 * 1024 * 1024,
        "wall_seconds": 30.0,
        "processes": 64,
        "tmpfs_bytes": 64 * 1024 * 1024,
    }
    values.update(changes)
    return SandboxLimits(**values)


@pytest.fixture
def workdir():
    path, _adapter_dir = workdir_create(files={"adapter_model.safetensors": b"weights"})
    yield path
    workdir_remove(path)


@pytest.fixture
def model_dir(tmp_path):
    """A stand-in for the base model's folder: the one host folder the child reads."""
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def run(code: str, workdir: Path, *, inputs=(), **limit_changes):
    return run_sandboxed(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin_bytes=b"",
        limits=limits(**limit_changes),
        workdir=workdir,
        mode="bwrap",
        readonly=[workdir / "adapter"],
        inputs=inputs,
    )


def processes_with(token: str) -> list[int]:
    """Host pids whose command line holds ``token`` (every PID namespace shows in ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --- sockets -------------------------------------------------------------------------------


@pytest.fixture
def tcp_listener():
    """A loopback TCP port that records every connection it accepts."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(timeout=2)
    server.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def unix_listeners():
    """Listening UNIX sockets where a host has them: in the project's var/, in /tmp, and
    one in the abstract namespace (no path at all: bound to the network namespace)."""
    token = uuid.uuid4().hex[:12]
    VAR_DIR.mkdir(exist_ok=True)
    paths = [str(VAR_DIR / f"sandbox-test-{token}.sock"), f"/tmp/sandbox-test-{token}.sock"]
    abstract = f"\0sandbox-test-{token}"
    servers = []
    for address in [*paths, abstract]:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(8)
        servers.append(server)
    yield paths, abstract
    for server in servers:
        server.close()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_a_child_cannot_reach_a_tcp_port_listening_on_the_hosts_loopback(workdir, tcp_listener):
    port, accepted = tcp_listener
    socket.create_connection(("127.0.0.1", port), timeout=3).close()  # the host can
    time.sleep(0.3)
    assert len(accepted) == 1
    code = RESULT + textwrap.dedent(
        f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
            result("connected")
        except OSError as exc:
            result(exc.errno)
        """
    )
    outcome = run(code, workdir)
    assert outcome.failure() is None, outcome.log
    # Its own network namespace: loopback there is not the host's (down, or up and empty).
    assert outcome.result in (errno.ENETUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL)
    time.sleep(0.3)
    assert len(accepted) == 1, "the child's connection reached the host's port"


def test_a_child_cannot_reach_a_unix_socket_of_the_host(workdir, unix_listeners):
    paths, abstract = unix_listeners
    for address in [*paths, abstract]:  # the host can
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(address)
        client.close()
    code = RESULT + textwrap.dedent(
        f"""
        import socket
        found = {{}}
        for address in {[*paths, abstract]!r}:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(address)
                found[repr(address)] = "connected"
            except OSError as exc:
                found[repr(address)] = exc.errno
        # Where the host's daemons keep theirs.
        found["run"] = [p for p in ("/run", "/var/run", "/var") if os.path.exists(p)]
        result(found)
        """
    )
    outcome = run(code, workdir)
    assert outcome.failure() is None, outcome.log
    found = outcome.result
    for path in paths:  # the path does not exist in the child's filesystem
        assert found[repr(path)] == errno.ENOENT
    assert found[repr(abstract)] == errno.ECONNREFUSED  # another network namespace's
    assert found["run"] == []


# --- the host's files ----------------------------------------------------------------------


@pytest.fixture
def secrets_on_the_host():
    """The project's .env (made when there is none, holding only a comment, so that any
    other process reading it meanwhile gets no setting), a database file in var/ and a
    file in the media folder, where contributors' private adapters are kept."""
    token = uuid.uuid4().hex
    made: list[Path] = []
    env_file = PROJECT_ROOT / ".env"
    if not env_file.exists():
        env_file.write_text(f"# sandbox test {token}\n")
        made.append(env_file)
    VAR_DIR.mkdir(exist_ok=True)
    database = VAR_DIR / f"sandbox-test-{token}.sqlite3"
    database.write_text(f"SQLite format 3 {token}")
    made.append(database)
    media = Path(settings.MEDIA_ROOT)
    media.mkdir(parents=True, exist_ok=True)
    private = media / f"sandbox-test-{token}.safetensors"
    private.write_text(token)
    made.append(private)
    yield {"env": env_file, "database": database, "private adapter": private}
    for path in made:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def test_a_child_cannot_read_the_env_file_the_database_or_other_adapters(
    workdir, secrets_on_the_host
):
    for path in secrets_on_the_host.values():
        assert path.read_bytes()  # the host can
    code = RESULT + textwrap.dedent(
        f"""
        found = {{}}
        for name, path in { ({k: str(v) for k, v in secrets_on_the_host.items()})!r}.items():
            try:
                open(path, "rb").read()
                found[name] = "read"
            except OSError as exc:
                found[name] = exc.errno
        found["project"] = sorted(os.listdir({str(PROJECT_ROOT)!r}))
        found["root"] = sorted(os.listdir("/"))
        found["etc"] = sorted(os.listdir("/etc"))
        result(found)
        """
    )
    outcome = run(code, workdir)
    assert outcome.failure() is None, outcome.log
    found = outcome.result
    for name in secrets_on_the_host:
        assert found[name] == errno.ENOENT, name
    # Of the repository, only the Python environment and the packages the child imports.
    assert set(found["project"]) <= {".venv", "evaluation", "multilora"}
    assert not {"var", "run", "home", "srv", "mnt", "opt", "boot"} & set(found["root"])
    assert set(found["etc"]) <= {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime"}


def test_a_child_sees_only_its_own_processes(workdir):
    code = RESULT + textwrap.dedent(
        """
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        result({"pids": pids, "uid": os.getuid()})
        """
    )
    outcome = run(code, workdir)
    assert outcome.failure() is None, outcome.log
    # Its own PID namespace: bwrap's pid 1 and the child itself, nothing of the host's.
    assert sorted(outcome.result["pids"]) == [1, 2]
    if os.geteuid() == 0:
        assert outcome.result["uid"] == sandbox.sandbox_uid()


def test_a_child_cannot_write_outside_its_folder(workdir, model_dir):
    token = uuid.uuid4().hex
    targets = {
        "project": str(PROJECT_ROOT / f"sandbox-test-{token}"),
        "package": str(PROJECT_ROOT / "evaluation" / f"sandbox-test-{token}"),
        "venv": os.path.join(sys.prefix, f"sandbox-test-{token}"),
        "base model": str(model_dir / "config.json"),
        "adapter": str(workdir / "adapter" / "adapter_model.safetensors"),
        "usr": f"/usr/sandbox-test-{token}",
        "root": f"/sandbox-test-{token}",
    }
    code = RESULT + textwrap.dedent(
        f"""
        found = {{}}
        for name, path in {targets!r}.items():
            try:
                open(path, "ab").write(b"x")
                found[name] = "written"
            except OSError as exc:
                found[name] = exc.errno
        # /tmp and the work folder are its own tmpfs: writable, and gone with it.
        open("/tmp/{token}", "w").write("x")
        open("scratch-{token}", "w").write("x")
        found["model"] = open({str(model_dir / "config.json")!r}).read()
        result(found)
        """
    )
    outcome = run(code, workdir, inputs=[model_dir])
    assert outcome.failure() is None, outcome.log
    found = outcome.result
    for name in targets:
        assert found[name] in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT), name
    assert found["model"] == '{"model_type": "llama"}'  # its input, read-only
    assert not Path(f"/tmp/{token}").exists()
    assert not (workdir / f"scratch-{token}").exists()
    assert not any(Path(p).exists() for p in targets.values() if token in p)
    assert (workdir / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


def test_filling_the_scratch_space_fails_with_a_disk_space_reason(workdir):
    code = textwrap.dedent(
        """
        for i in range(100):
            with open(f"/tmp/fill-{i}", "wb") as handle:
                handle.write(b"x" * (4 * 1024 * 1024))
        """
    )
    outcome = run(code, workdir, tmpfs_bytes=16 * 1024 * 1024)
    code, reason = outcome.failure()
    assert code == "sandbox_disk_space"
    assert reason == "The evaluation wrote more than its 16 MiB of scratch space."


# --- processes -----------------------------------------------------------------------------


def test_a_fork_bomb_is_bounded_by_the_process_limit(workdir):
    token = uuid.uuid4().hex
    code = f"""
        # {token}
        import os
        while True:
            os.fork()
    """
    started = time.monotonic()
    outcome = run(code, workdir, processes=32)
    assert time.monotonic() - started < 20
    assert not outcome.timed_out
    code, reason = outcome.failure()
    assert code == "sandbox_processes"
    assert reason == "The evaluation tried to run more than 32 processes and threads at once."
    time.sleep(0.5)
    assert not processes_with(token), "a forked process outlived the sandbox"


def test_the_process_limit_counts_the_childs_threads_too(workdir):
    code = textwrap.dedent(
        """
        import threading, time
        for _ in range(100):
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        """
    )
    outcome = run(code, workdir, processes=16)
    assert outcome.failure()[0] == "sandbox_processes"


DETACH = """
    # A grandchild in a new session, reparented away from the child: the classic daemon.
    import os, subprocess, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            sleeper = [sys.executable, "-c", "import time; time.sleep(300)", "TOKEN"]
            os.execv(sys.executable, sleeper)
        os._exit(0)
    os.wait()
    time.sleep(1)  # the grandchild is running
"""


def test_a_detached_grandchild_dies_at_the_deadline(workdir):
    token = uuid.uuid4().hex
    code = DETACH.replace("TOKEN", token) + "    time.sleep(300)\n"
    started = time.monotonic()
    outcome = run(code, workdir, wall_seconds=3.0)
    assert time.monotonic() - started < 15
    code, reason = outcome.failure()
    assert code == "sandbox_deadline"
    assert reason == "The evaluation was stopped at its wall-clock deadline of 3 s."
    time.sleep(0.5)
    assert not processes_with(token), "a detached grandchild outlived the deadline"


def test_a_detached_grandchild_dies_when_the_child_exits(workdir):
    token = uuid.uuid4().hex
    code = DETACH.replace("TOKEN", token) + "    print('{\"result\": {}}', flush=True)\n"
    started = time.monotonic()
    outcome = run(code, workdir)
    assert time.monotonic() - started < 15
    assert outcome.failure() is None, outcome.log
    assert outcome.result == {}
    time.sleep(0.5)
    assert not processes_with(token), "a detached grandchild outlived its sandbox"


def test_memory_past_the_limit_fails_with_a_memory_reason(workdir):
    outcome = run("block = bytearray(3 * 1024**3)\n", workdir, memory_bytes=2 * GiB)
    code, reason = outcome.failure()
    assert code == "sandbox_memory"
    assert reason == "The evaluation ran out of memory (limit 2 GiB)."


def test_the_child_cannot_raise_its_process_limit(workdir):
    code = RESULT + textwrap.dedent(
        """
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY,) * 2)
            result("raised")
        except (ValueError, OSError):
            result(resource.getrlimit(resource.RLIMIT_NPROC))
        """
    )
    outcome = run(code, workdir, processes=48)
    assert outcome.failure() is None, outcome.log
    if os.geteuid() == 0:  # else the limit adds what the worker's user already runs
        assert outcome.result == [48, 48]
    else:
        assert outcome.result[0] == outcome.result[1] >= 48


def test_a_worker_that_is_not_root_gives_its_child_room_above_what_its_user_runs():
    own_threads = len(os.listdir("/proc/self/task"))
    assert sandbox._tasks_of(os.getuid()) >= own_threads
    assert sandbox._tasks_of(2**31 - 7) == 0  # no such user


# --- the kernel's surface ------------------------------------------------------------------


@pytest.mark.skipif(
    sandbox.seccomp_program() is None, reason="no seccomp table for this architecture"
)
def test_a_child_cannot_make_a_user_namespace_or_reach_keyrings_bpf_or_io_uring(workdir):
    """In a user namespace of its own a process holds every capability over it: the start
    of most kernel privilege escalations. The seccomp filter refuses it, and the other
    system calls no evaluation needs; threads, fork and subprocess still work."""
    _arch, numbers = sandbox._SECCOMP_ARCHES[os.uname().machine]
    code = RESULT + textwrap.dedent(
        f"""
        import ctypes, subprocess, threading
        libc = ctypes.CDLL(None, use_errno=True)
        numbers = {numbers!r}
        def call(name, *args):
            ctypes.set_errno(0)
            value = libc.syscall(numbers[name], *[ctypes.c_long(a) for a in args])
            return "allowed" if value >= 0 else ctypes.get_errno()
        buffer = ctypes.create_string_buffer(256)
        found = {{
            "unshare user": call("unshare", {sandbox._CLONE_NEWUSER}),
            "clone user": call("clone", {sandbox._CLONE_NEWUSER} | 17, 0, 0, 0, 0),
            "clone3": call("clone3", ctypes.addressof(buffer), 88),
            "keyctl": call("keyctl", 0, -3, 0),
            "add_key": call("add_key", 0, 0, 0, 0, -3),
            "bpf": call("bpf", 0, 0, 0),
            "perf_event_open": call("perf_event_open", ctypes.addressof(buffer), 0, -1, -1, 0),
            "userfaultfd": call("userfaultfd", 0),
            "io_uring_setup": call("io_uring_setup", 1, ctypes.addressof(buffer)),
        }}
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        found["subprocess"] = subprocess.run(["/bin/sh", "-c", "echo ok"],
                                             capture_output=True, text=True).stdout.strip()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        found["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        result(found)
        """
    )
    outcome = run(code, workdir)
    assert outcome.failure() is None, outcome.log
    found = outcome.result
    assert found.pop("clone3") == errno.ENOSYS  # glibc falls back to clone
    assert found.pop("subprocess") == "ok" and found.pop("fork") == 7
    assert found == dict.fromkeys(found, errno.EPERM)


def test_the_seccomp_program_is_a_whole_number_of_instructions():
    for machine in sandbox._SECCOMP_ARCHES:
        program = sandbox.seccomp_program(machine)
        assert program and len(program) % 8 == 0
    assert sandbox.seccomp_program("riscv64") is None
