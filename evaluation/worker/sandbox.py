"""Running a child process isolated, under rlimits and a wall-clock deadline.

The evaluation worker never touches a contributor's tensors itself: it runs
``python -m evaluation.worker.child`` through ``run_sandboxed``, which any command can go through
(tests run small Python snippets under the very same limits and isolation).

Isolation, by mode (``settings.TESSERA_SANDBOX``; "auto" takes the first that works, and
outside development only bwrap):

* ``bwrap``: the child starts from an empty root (a tmpfs) holding only, read-only: the
  system libraries (``/usr`` and its ``/bin``, ``/lib`` links, the dynamic loader's cache),
  the Python environment (the venv and the interpreter's prefix), the project packages the
  child imports (``evaluation/__init__.py``, ``evaluation/worker``, ``multilora``: never the
  repository root with its ``.env``, ``var/`` and database), the run's ``inputs`` (the base
  model's folder) and the adapter copies; a private size-capped tmpfs for ``/tmp`` and one
  for its work folder; its own ``/proc`` and a minimal ``/dev``. New network, PID, IPC, UTS
  and cgroup namespaces (no interface but a down loopback, no UNIX socket of the host is
  reachable since no host folder holding one is mounted), ``--die-with-parent
  --new-session``. As root, bwrap itself runs without a user namespace (one mapping only
  root would keep the child root, and root ignores RLIMIT_NPROC) and the child is switched to
  an unprivileged uid (``TESSERA_SANDBOX_UID_BASE`` + the worker's pid, so concurrent
  workers never share a process budget) with no capabilities and ``no_new_privs``; as
  another user, ``--unshare-all`` (its user namespace) does that part. A seccomp filter
  (``seccomp_program``) refuses it a user namespace of its own, the keyrings, eBPF, perf
  events, userfaultfd, io_uring and other architectures' system calls. bubblewrap 0.8 or
  later (``--size``).
* ``unshare`` (development only: settings refuse it with DEBUG off): ``unshare --net --ipc
  --uts --mount --pid --fork --kill-child --mount-proc``: the network, PID and /proc
  isolation of bwrap, but the host's filesystem stays readable (a child could read the
  ``.env`` file), and as root RLIMIT_NPROC does not bind. Capabilities dropped.
* ``none``: no isolation; only when ``TESSERA_SANDBOX_ALLOW_NETWORK`` is true (never in
  production: settings refuse it with DEBUG off).

If no isolating mode works and network is not allowed, nothing runs: ``SandboxUnavailable``
(code ``sandbox_unavailable``).

Limits, in every mode, set by ``prlimit`` on the process it then executes (no preexec_fn:
the worker may have threads):

* RLIMIT_AS: address space. Python raises MemoryError (torch: "can't allocate memory") past
  it, and the run fails with a memory reason. Keep it well above the child's baseline
  (``import torch`` alone maps hundreds of MiB of address space).
* RLIMIT_CPU: CPU seconds. SIGXCPU at the soft limit, SIGKILL 5 s later.
* RLIMIT_NPROC: processes and threads of the child's uid (a fork bomb gets EAGAIN).
* RLIMIT_NOFILE: open file descriptors.
* RLIMIT_FSIZE: the largest file the child may write (SIGXFSZ past it).
* RLIMIT_CORE 0: no core dumps of a process holding contributors' weights.
* the tmpfs size: what the child may write in all (``/tmp`` and its work folder each).
* the wall clock: past ``wall_seconds`` the sandbox is SIGKILLed; its PID namespace ends
  with it, so every descendant dies too, one that called setsid included.

The child dies with its parent (``setpriv --pdeathsig KILL`` / ``--die-with-parent``): when
a Celery pool process is killed, its evaluation does not carry on as an orphan.

Protocol: stdin gets ``stdin_bytes``; stdout carries JSON lines only: ``{"progress": done,
"total": n, "label": ...}`` and one final ``{"result": {...}}``; stderr is the log (its last
``LOG_CAP_BYTES`` are kept). Nothing the child writes leaves here raw: the log, the progress
labels, every string of the result and the protocol errors are cleaned of control
characters, terminal escape sequences and host paths (``clean_text``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import queue
import re
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.worker.child import EXIT_MEMORY
from tessera.errors import DomainError

MODES = ("bwrap", "unshare", "none")
LOG_CAP_BYTES = 200 * 1024
MAX_STDOUT_LINE_BYTES = 32 * 1024 * 1024
MAX_STDOUT_BYTES = 64 * 1024 * 1024
# The evaluation's result nests 4 levels; the cleaning and the checks walk it recursively.
MAX_RESULT_DEPTH = 32
CPU_HARD_GRACE_SECONDS = 5
_POLL_SECONDS = 0.2
_MEMORY_WORDS = (
    "MemoryError",
    "can't allocate memory",
    "Cannot allocate memory",
    "std::bad_alloc",
    "failed to map segment",
    "out of memory",
)


# What a process or thread refused by RLIMIT_NPROC (EAGAIN) leaves in the log: Python's
# fork and subprocess, its threads, OpenMP's and a shell's.
_PROCESS_WORDS = (
    "BlockingIOError: [Errno 11]",
    "can't start new thread",
    "Thread creation failed",
    "fork: Resource temporarily unavailable",
    "fork: retry",
)


class SandboxUnavailable(DomainError):
    def __init__(self, message: str) -> None:
        super().__init__("sandbox_unavailable", message, kind="conflict")


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int
    cpu_seconds: int
    open_files: int
    file_bytes: int
    wall_seconds: float
    # Processes and threads of the child's uid (torch starts about one thread per core).
    processes: int = 512
    # The size of each of the child's two tmpfs (/tmp and its work folder).
    tmpfs_bytes: int = 512 * 1024 * 1024

    @classmethod
    def from_settings(cls, *, wall_seconds: float | None = None) -> SandboxLimits:
        from django.conf import settings

        return cls(
            memory_bytes=settings.TESSERA_SANDBOX_MEMORY_BYTES,
            cpu_seconds=settings.TESSERA_SANDBOX_CPU_SECONDS,
            open_files=settings.TESSERA_SANDBOX_OPEN_FILES,
            file_bytes=settings.TESSERA_SANDBOX_FILE_BYTES,
            processes=settings.TESSERA_SANDBOX_PROCESSES,
            tmpfs_bytes=settings.TESSERA_SANDBOX_TMPFS_BYTES,
            wall_seconds=float(
                wall_seconds if wall_seconds is not None else settings.TESSERA_EVAL_DEADLINE_SECONDS
            ),
        )


@dataclass
class SandboxResult:
    """What happened to the child. ``failure()`` turns it into (code, reason) or None."""

    mode: str
    limits: SandboxLimits
    returncode: int | None = None
    signal: int | None = None
    timed_out: bool = False
    aborted: bool = False  # the caller's tick() asked to stop
    result: Any = None  # the payload of the one {"result": ...} line
    result_lines: int = 0
    protocol_errors: list[str] = field(default_factory=list)
    log: str = ""
    duration_seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of the child and what it waited for

    def failure(self) -> tuple[str, str] | None:
        return describe_failure(self)


# --- Choosing the mode ----------------------------------------------------------------------


def sandbox_mode(
    *,
    setting: str | None = None,
    allow_network: bool | None = None,
    allow_unshare: bool | None = None,
) -> str:
    """The isolation to use, from the settings; raises SandboxUnavailable if none works.

    ``unshare`` isolates the network and the processes but not the filesystem: it is a
    candidate only where ``TESSERA_SANDBOX_ALLOW_UNSHARE`` (DEBUG on) says so."""
    from django.conf import settings

    setting = setting if setting is not None else settings.TESSERA_SANDBOX
    allow_network = (
        allow_network if allow_network is not None else settings.TESSERA_SANDBOX_ALLOW_NETWORK
    )
    allow_unshare = (
        allow_unshare if allow_unshare is not None else settings.TESSERA_SANDBOX_ALLOW_UNSHARE
    )
    if setting == "none":
        if not allow_network:
            raise SandboxUnavailable(
                "TESSERA_SANDBOX is 'none' but TESSERA_SANDBOX_ALLOW_NETWORK is false: "
                "refusing to evaluate without network isolation."
            )
        return "none"
    if setting == "unshare" and not allow_unshare:
        raise SandboxUnavailable(
            "TESSERA_SANDBOX is 'unshare', which leaves the host's files readable to the "
            "evaluation: refused outside development. Install bubblewrap."
        )
    if setting == "auto":
        candidates = ("bwrap", "unshare") if allow_unshare else ("bwrap",)
    else:
        candidates = (setting,)
    problems = []
    for mode in candidates:
        problem = _probe(mode)
        if problem is None:
            return mode
        problems.append(f"{mode}: {problem}")
    if allow_network:
        return "none"
    raise SandboxUnavailable(
        "No network sandbox works on this machine ("
        + "; ".join(problems)
        + "). Install bubblewrap 0.8 or later (and, for a worker that is not root, allow "
        "unprivileged user namespaces), or allow evaluation without isolation (never in "
        "production)."
    )


_probe_cache: dict[str, str | None] = {}
_probe_lock = threading.Lock()


def _probe(mode: str) -> str | None:
    """None when ``mode`` can start a process here, else why not. Cached per process."""
    with _probe_lock:
        if mode not in _probe_cache:
            _probe_cache[mode] = _probe_uncached(mode)
        return _probe_cache[mode]


def _probe_uncached(mode: str) -> str | None:
    tool = {"bwrap": "bwrap", "unshare": "unshare"}[mode]
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        return "setpriv and prlimit (util-linux) are needed"
    with tempfile.TemporaryDirectory(prefix="tessera-probe-") as workdir, _seccomp_fd(mode) as fd:
        argv = _wrap(mode, ["/bin/sh", "-c", "exit 0"], workdir=workdir, readonly=(), seccomp_fd=fd)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                timeout=20,
                check=False,
                pass_fds=() if fd is None else (fd,),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
    if done.returncode != 0:
        return (done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}")[:300]
    return None


def sandbox_probe_reset() -> None:
    """Forget what the probes found (tests that install or hide a tool)."""
    with _probe_lock:
        _probe_cache.clear()


# The project packages the evaluation child imports (relative to the project root): bound
# read-only, file by file or folder by folder, never the root with its .env, var/ and db.
CHILD_PACKAGES = ("evaluation/__init__.py", "evaluation/worker", "multilora")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The uid of an unprivileged child is this plus the worker's pid (unique among the live
# workers of a host): RLIMIT_NPROC counts per uid, so two workers' children never share it.
DEFAULT_UID_BASE = 2_000_000_000
# What the dynamic loader and Python read from /etc; nothing else of /etc is mounted.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


def sandbox_uid() -> int:
    """The unprivileged uid a root worker's children run as (see DEFAULT_UID_BASE)."""
    try:
        from django.conf import settings

        base = int(getattr(settings, "TESSERA_SANDBOX_UID_BASE", DEFAULT_UID_BASE))
    except Exception:  # no settings configured (a script using the sandbox alone)
        base = DEFAULT_UID_BASE
    return base + os.getpid()


def python_roots() -> list[str]:
    """The folders the interpreter needs: the venv, the interpreter's own prefix, and where
    the executable really lives (the venv's python is a link to it)."""
    import sys

    roots = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    real = Path(os.path.realpath(sys.executable))
    roots.add(str(real.parent.parent))  # <prefix>/bin/python3 -> <prefix>
    found: list[str] = []
    for root in sorted(roots, key=len):
        if root in ("/", "/usr") or not os.path.isdir(root):
            continue  # a system Python lives in /usr, which is mounted anyway
        if not any(root == f or root.startswith(f + "/") for f in found):
            found.append(root)
    return found


# --- The seccomp filter (bwrap) ----------------------------------------------------------------

# What no evaluation needs and a process escaping through the kernel reaches for first: a
# user namespace of its own (in which it holds every capability, the door to most kernel
# privilege escalations), the kernel keyrings (not namespaced), eBPF, perf events,
# userfaultfd (a classic race widener), io_uring. Refused with EPERM; clone3 with ENOSYS,
# since its flags sit in memory a filter cannot read (glibc then falls back to clone, whose
# flags are checked). Numbers per architecture; on another one no filter is loaded.
_CLONE_NEWUSER = 0x10000000
_SECCOMP_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,  # AUDIT_ARCH_X86_64
        {
            "clone": 56,
            "unshare": 272,
            "clone3": 435,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "perf_event_open": 298,
            "bpf": 321,
            "userfaultfd": 323,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
    "aarch64": (
        0xC00000B7,  # AUDIT_ARCH_AARCH64
        {
            "clone": 220,
            "unshare": 97,
            "clone3": 435,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "perf_event_open": 241,
            "bpf": 280,
            "userfaultfd": 282,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
}
_X32_SYSCALL_BIT = 0x40000000


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The classic-BPF seccomp program bwrap loads (``--seccomp FD``) for this machine's
    architecture, or None where it has no table. Any other architecture's system calls
    (i386's int 0x80 on x86_64, x32's numbers) are refused outright: their numbers differ,
    so a table of one architecture would not cover them."""
    machine = machine or os.uname().machine
    if machine not in _SECCOMP_ARCHES:
        return None
    arch, numbers = _SECCOMP_ARCHES[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|…|K, BPF_RET
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS  # SECCOMP_RET_ERRNO
    refused = [n for name, n in numbers.items() if name not in ("clone", "unshare", "clone3")]
    # The layout: the checks, the clone/unshare flags block, then the shared returns. A jump
    # counts from the instruction after it.
    n_checks = 7 + len(refused) + 1
    flags_at = n_checks
    eperm_at, enosys_at, kill_at = flags_at + 3, flags_at + 4, flags_at + 5

    def to(target: int, at: int) -> int:
        return target - (at + 1)

    program = [
        (ld, 0, 0, 4),  # 0: seccomp_data.arch
        (jeq, 0, to(kill_at, 1), arch),  # 1
        (ld, 0, 0, 0),  # 2: seccomp_data.nr
        (jge, to(kill_at, 3), 0, _X32_SYSCALL_BIT),  # 3: x32's numbers
        (jeq, to(flags_at, 4), 0, numbers["clone"]),  # 4
        (jeq, to(flags_at, 5), 0, numbers["unshare"]),  # 5
        (jeq, to(enosys_at, 6), 0, numbers["clone3"]),  # 6
    ]
    for number in refused:
        program.append((jeq, to(eperm_at, len(program)), 0, number))
    program.append((ret, 0, 0, allow))
    if len(program) != flags_at:
        raise ValueError("the seccomp program's layout is off")
    # The flags block: the low 32 bits of the first argument (little-endian machines).
    program += [(ld, 0, 0, 16), (jset, to(eperm_at, flags_at + 1), 0, _CLONE_NEWUSER)]
    program += [(ret, 0, 0, allow)]
    program += [(ret, 0, 0, eperm), (ret, 0, 0, enosys), (ret, 0, 0, kill)]
    if any(not 0 <= jt <= 255 or not 0 <= jf <= 255 for _code, jt, jf, _k in program):
        raise ValueError("a seccomp jump out of range")
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)


@contextlib.contextmanager
def _seccomp_fd(mode: str):
    """A memory file holding the seccomp program for bwrap to read, or None."""
    program = seccomp_program() if mode == "bwrap" else None
    if program is None:
        yield None
        return
    fd = os.memfd_create("tessera-seccomp", 0)  # not CLOEXEC: bwrap inherits it
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _system_binds() -> list[str]:
    """/usr, the merged-/usr links (or folders, on systems without them) and /etc's few."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--perms", "0755", "--dir", "/etc"]  # bwrap would make it 0700
    for path in _ETC_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def _bwrap_argv(
    argv: Sequence[str],
    *,
    workdir: str,
    readonly: Sequence[str],
    inputs: Sequence[str],
    tmpfs_bytes: int,
    uid: int | None,
    seccomp_fd: int | None = None,
) -> list[str]:
    if uid is None:  # not root: a user namespace is what lets bwrap mount at all
        wrapper = ["bwrap", "--unshare-all"]
    else:
        # As root, no user namespace: its only mapping would be root, which keeps the
        # child root (and root ignores RLIMIT_NPROC). setpriv switches to ``uid`` below.
        wrapper = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc"]
        wrapper += ["--unshare-uts", "--unshare-cgroup-try"]
    wrapper += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
    wrapper += _system_binds()
    wrapper += ["--dev", "/dev", "--proc", "/proc"]
    # bwrap makes a missing parent folder 0700: the child's uid could not reach what is
    # mounted below it. Each parent is made 0755 first (once; never one already mounted).
    made = {"/", "/usr", "/etc", "/dev", "/proc", "/tmp"}  # noqa: S108 (the sandbox's own)

    def parents_of(path: str) -> list[str]:
        args = []
        for parent in reversed(Path(path).parents):
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        made.add(path)
        return args

    # Writable: two private tmpfs, world-writable like any /tmp (the child's uid is the only
    # one in there), each capped: what is written there is memory the child does not map.
    size = str(max(1024 * 1024, int(tmpfs_bytes)))
    wrapper += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]  # noqa: S108 (inside)
    wrapper += parents_of(workdir)
    wrapper += ["--perms", "1777", "--size", size, "--tmpfs", workdir]
    # Read-only, after the tmpfs so that none of them is hidden by one.
    binds = [(root, root) for root in python_roots()]
    binds += [
        (str(PROJECT_ROOT / package),) * 2
        for package in CHILD_PACKAGES
        if (PROJECT_ROOT / package).exists()
    ]
    binds += [(os.path.realpath(path), path) for path in inputs]
    binds += [(path, path) for path in readonly]  # the adapter copies, inside the work folder
    for source, dest in binds:
        wrapper += [*parents_of(dest), "--ro-bind", source, dest]
    devices = sorted(glob.glob("/dev/nvidia*"))
    for device in devices:  # GPU workers: the devices, and what CUDA reads of the hardware
        wrapper += ["--dev-bind", device, device]
    if devices:
        wrapper += ["--ro-bind-try", "/sys", "/sys"]
    wrapper += ["--chdir", workdir]
    if seccomp_fd is not None:
        wrapper += ["--seccomp", str(seccomp_fd)]
    if uid is None:
        return [*wrapper, "--", *argv]
    # The child keeps only what setpriv needs to switch uid, then loses even that.
    wrapper += ["--cap-drop", "ALL"]
    wrapper += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    return [*wrapper, "--", *_drop_to(uid), *argv]


def _drop_to(uid: int) -> list[str]:
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def _wrap(
    mode: str,
    argv: Sequence[str],
    *,
    workdir: str,
    readonly: Sequence[str],
    inputs: Sequence[str] = (),
    tmpfs_bytes: int = 512 * 1024 * 1024,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The isolation wrapper around ``argv`` (limits are added by the caller)."""
    is_root = os.geteuid() == 0
    if mode == "bwrap":
        return _bwrap_argv(
            argv,
            workdir=workdir,
            readonly=readonly,
            inputs=inputs,
            tmpfs_bytes=tmpfs_bytes,
            uid=sandbox_uid() if is_root else None,
            seccomp_fd=seccomp_fd,
        )
    if mode == "unshare":
        wrapper = ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--ipc", "--uts"]
        # Its own PID namespace (unshare's fork is its pid 1, killed with unshare) and /proc:
        # at the deadline every descendant dies, and the worker's processes are out of sight.
        wrapper += ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if not is_root:
            wrapper.append("--map-root-user")
        wrapper.append("--")
        if is_root:
            # Capabilities off before the child runs: root without them cannot raise its
            # rlimits, write a 0444 file or read other root processes' /proc entries. It
            # stays root: the interpreter may live where only root can read (/root).
            wrapper += [
                "setpriv",
                "--bounding-set",
                "-all",
                "--inh-caps",
                "-all",
                "--no-new-privs",
                "--",
            ]
        # A shell as the namespace's pid 1, the child below it: the kernel drops signals
        # pid 1 has no handler for, SIGXCPU at the CPU limit included. It reports a child
        # killed by a signal as 128 + the signal, as bwrap does.
        return [*wrapper, "/bin/sh", "-c", '"$@"; exit $?', "sh", *argv]
    return ["setpriv", "--pdeathsig", "KILL", "--no-new-privs", "--", *argv]


def _limit_prefix(limits: SandboxLimits) -> list[str]:
    cpu = max(1, int(limits.cpu_seconds))
    # memory_bytes 0: no RLIMIT_AS. Only for GPU workers, where CUDA reserves far more
    # address space than it uses; the wall clock and the other limits still apply.
    memory = f"--as={int(limits.memory_bytes)}" if limits.memory_bytes > 0 else "--as=unlimited"
    return [
        "prlimit",
        memory,
        f"--cpu={cpu}:{cpu + CPU_HARD_GRACE_SECONDS}",
        f"--nproc={_process_budget(limits.processes)}",
        f"--nofile={int(limits.open_files)}",
        f"--fsize={int(limits.file_bytes)}",
        "--core=0",
        "--",
    ]


def _process_budget(processes: int) -> int:
    """RLIMIT_NPROC for a child allowed ``processes`` of its own. A root worker's child has
    a uid of its own (sandbox_uid), so that is the limit. The kernel counts the limit per
    real uid over the whole host, so a child of a worker that is not root shares its user's
    count: it gets what that user runs now plus ``processes``, else a developer's desktop
    (a browser alone runs hundreds of threads) could never start one."""
    processes = max(1, int(processes))
    if os.geteuid() == 0:
        return processes
    return processes + _tasks_of(os.getuid())


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(
                line.split(":", 1) for line in (entry / "status").read_text().splitlines()
            )
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # it ended meanwhile
    return count


# --- Running --------------------------------------------------------------------------------


def minimal_env(extra: dict[str, str] | None = None, *, workdir: str) -> dict[str, str]:
    """No secrets, no DATABASE_URL, no broker URL: only what Python and torch need."""
    root = str(PROJECT_ROOT)  # only CHILD_PACKAGES of it are mounted under bwrap
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONPATH": root,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONNOUSERSITE": "1",
        # getpass.getuser() reads these first: the child's uid has no passwd entry.
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": os.path.join(workdir, "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra or {})
    return env


def run_sandboxed(
    argv: Sequence[str],
    *,
    stdin_bytes: bytes,
    limits: SandboxLimits,
    workdir: str | Path,
    mode: str | None = None,
    readonly: Sequence[str | Path] = (),
    inputs: Sequence[str | Path] = (),
    env: dict[str, str] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    tick: Callable[[], bool] | None = None,
) -> SandboxResult:
    """Run ``argv`` isolated and limited; return what happened (never raises for the
    child's own failures; raises SandboxUnavailable before starting anything).

    ``on_progress(done, total, label)`` is called (in this thread) for each progress line;
    ``tick()`` about every 0.2 s: return False to stop the child (the run was taken away).
    ``readonly`` paths inside ``workdir`` are mounted read-only where the mode can;
    ``inputs`` are folders outside it the child reads (the base model's), mounted read-only
    at the same path under bwrap: nothing else of the host is there.
    What comes back (log, labels, the result's strings, protocol errors) is ``clean_text``'d.
    """
    mode = mode or sandbox_mode()
    workdir = str(workdir)
    inputs = [str(p) for p in inputs]
    hide = host_paths(workdir=workdir, inputs=inputs)
    if on_progress is not None:
        report = on_progress

        def on_progress(done: int, total: int, label: str) -> None:
            report(done, total, clean_text(label, hide=hide))

    outcome = SandboxResult(mode=mode, limits=limits)
    started = time.monotonic()
    cpu_before = _children_cpu()
    with _seccomp_fd(mode) as seccomp_fd:  # closed here once bwrap holds its own copy
        full_argv = _limit_prefix(limits) + _wrap(
            mode,
            list(argv),
            workdir=workdir,
            readonly=[str(p) for p in readonly],
            inputs=inputs,
            tmpfs_bytes=limits.tmpfs_bytes,
            seccomp_fd=seccomp_fd,
        )
        process = subprocess.Popen(
            full_argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env if env is not None else minimal_env(workdir=workdir),
            start_new_session=True,  # its own process group: one killpg ends it all
            close_fds=True,
            pass_fds=() if seccomp_fd is None else (seccomp_fd,),
        )
    events: queue.Queue = queue.Queue()
    log = _LogTail(LOG_CAP_BYTES)
    readers = [
        threading.Thread(target=_read_stdout, args=(process.stdout, events), daemon=True),
        threading.Thread(target=_read_stderr, args=(process.stderr, log), daemon=True),
        threading.Thread(target=_write_stdin, args=(process.stdin, stdin_bytes), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = started + limits.wall_seconds
    stdout_done = False
    try:
        while True:
            try:
                kind, payload = events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                kind, payload = None, None
            if kind == "line":
                _handle_line(payload, outcome, on_progress)
            elif kind == "error":
                outcome.protocol_errors.append(payload)
                _kill_group(process)
            elif kind == "eof":
                stdout_done = True
            if stdout_done and process.poll() is not None:
                break
            if time.monotonic() >= deadline and process.poll() is None:
                outcome.timed_out = True
                _kill_group(process)
            if tick is not None and process.poll() is None and not tick():
                outcome.aborted = True
                _kill_group(process)
            if len(outcome.protocol_errors) > 20:
                _kill_group(process)
            if stdout_done and process.poll() is None and time.monotonic() >= deadline + 5:
                break  # closed stdout and ignores SIGKILL: cannot happen, but never hang
    finally:
        if process.poll() is None:
            _kill_group(process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=5)
        # Whatever is still queued (the result line may race the exit).
        while True:
            try:
                kind, payload = events.get_nowait()
            except queue.Empty:
                break
            if kind == "line":
                _handle_line(payload, outcome, on_progress)
            elif kind == "error":
                outcome.protocol_errors.append(payload)
    outcome.duration_seconds = time.monotonic() - started
    outcome.cpu_seconds = max(0.0, _children_cpu() - cpu_before)
    outcome.log = clean_text(log.text(), hide=hide)
    outcome.protocol_errors = [clean_text(e, hide=hide) for e in outcome.protocol_errors]
    outcome.result = _cleaned(outcome.result, hide)
    code = process.returncode
    if code is not None and code < 0:
        outcome.signal = -code
    elif mode in ("bwrap", "unshare") and code is not None and code > 128:
        outcome.signal = code - 128  # their pid 1 reports a signalled child as 128 + signal
    else:
        outcome.returncode = code
    return outcome


def _handle_line(raw: bytes, outcome: SandboxResult, on_progress) -> None:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested past the decoder's depth
        outcome.protocol_errors.append(f"not JSON: {raw[:120]!r}")
        return
    if not isinstance(message, dict) or len(message.keys() & {"progress", "result"}) != 1:
        outcome.protocol_errors.append(f"not a progress or result message: {raw[:120]!r}")
        return
    if "result" in message:
        if _nesting(message["result"]) > MAX_RESULT_DEPTH:
            outcome.protocol_errors.append(f"a result nested over {MAX_RESULT_DEPTH} levels")
            return
        outcome.result_lines += 1
        outcome.result = message["result"]
        return
    done, total, label = message.get("progress"), message.get("total"), message.get("label", "")
    if not (_is_int(done) and _is_int(total) and isinstance(label, str) and 0 <= done <= total):
        outcome.protocol_errors.append(f"bad progress message: {raw[:120]!r}")
        return
    if on_progress is not None:
        on_progress(done, total, label[:200])


def _nesting(value: Any) -> int:
    """How deep lists and dicts nest in ``value`` (without recursion: it is the child's)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_RESULT_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_stdout(stream, events: queue.Queue) -> None:
    total = 0
    try:
        while True:
            line = stream.readline(MAX_STDOUT_LINE_BYTES + 1)
            if not line:
                break
            total += len(line)
            if len(line) > MAX_STDOUT_LINE_BYTES or total > MAX_STDOUT_BYTES:
                events.put(("error", "the child wrote more output than allowed"))
                break
            line = line.strip()
            if line:
                events.put(("line", line))
    finally:
        events.put(("eof", None))
        with contextlib.suppress(OSError):
            stream.close()


class _LogTail:
    """The last ``cap`` bytes of a stream, with a note of how much was dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buffer = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) > self.cap:
            extra = len(self.buffer) - self.cap
            del self.buffer[:extra]
            self.dropped += extra

    def text(self) -> str:
        text = self.buffer.decode("utf-8", errors="replace")
        if self.dropped:
            text = f"[… {self.dropped} earlier bytes of the log dropped]\n" + text
        return text


def _read_stderr(stream, log: _LogTail) -> None:
    try:
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            log.add(chunk)
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _write_stdin(stream, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a child that dies early closes the pipe
        stream.write(data)
    with contextlib.suppress(OSError):
        stream.close()


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


# --- Cleaning what the child wrote -----------------------------------------------------------

# Terminal escape sequences: CSI (colours, cursor moves), OSC (titles, hyperlinks), and the
# two-character ones. Then every other control character but newline and tab, and the
# bidirectional overrides that make a line read other than it is.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")


def host_paths(*, workdir: str | None = None, inputs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(host path, what it reads as) for every host folder a child's log may name: the
    run's folder, its inputs, the Python environment, the project, the home and temporary
    folders. Longest first, so that a folder inside another is named as itself."""
    named: dict[str, str] = {}

    def add(path: str | None, label: str) -> None:
        if path and path != "/":
            for form in {path.rstrip("/"), os.path.realpath(path)}:
                if form and form != "/":
                    named.setdefault(form, label)

    add(workdir, "<workdir>")
    for path in inputs:
        add(path, "<input>")
    import sys

    add(sys.prefix, "<venv>")
    for root in python_roots():
        add(root, "<python>")
    add(str(PROJECT_ROOT), "<project>")
    add(tempfile.gettempdir(), "<tmp>")
    add(os.path.expanduser("~"), "<home>")
    return sorted(named.items(), key=lambda item: -len(item[0]))


def clean_text(text: str, *, hide: Sequence[tuple[str, str]] = ()) -> str:
    """``text`` as a contributor may see it: no terminal escape sequences or control
    characters (carriage returns become newlines: a progress bar's updates read as lines),
    and each host path of ``hide`` (see host_paths) replaced by its label."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROLS.sub("", _ESCAPES.sub("", text))
    for path, label in hide:
        # A path ends where no path character follows: /tmp must not eat /tmpfoo's name.
        text = re.sub(re.escape(path) + r"(?![\w.-])", label, text)
    return text


def _cleaned(value: Any, hide: Sequence[tuple[str, str]]) -> Any:
    """Every string value of a JSON value cleaned; keys are left alone (the caller checks
    them against the job's own keys)."""
    if isinstance(value, str):
        return clean_text(value, hide=hide)
    if isinstance(value, list):
        return [_cleaned(v, hide) for v in value]
    if isinstance(value, dict):
        return {k: _cleaned(v, hide) for k, v in value.items()}
    return value


# --- Saying what happened -------------------------------------------------------------------


def describe_failure(outcome: SandboxResult) -> tuple[str, str] | None:
    """(failure code, reason in plain words), or None when the child exited 0 (its output
    is then checked by the caller)."""
    limits = outcome.limits
    tail = _last_line(outcome.log)
    if outcome.timed_out:
        return (
            "sandbox_deadline",
            f"The evaluation was stopped at its wall-clock deadline of "
            f"{_duration(limits.wall_seconds)}.",
        )
    if outcome.aborted:
        return ("run_taken_away", "The run was ended elsewhere while the evaluation ran.")
    if outcome.protocol_errors and outcome.returncode != 0:
        return (
            "sandbox_bad_output",
            "The evaluation wrote invalid output: " + outcome.protocol_errors[0],
        )
    memory_text = any(word in outcome.log[-20000:] for word in _MEMORY_WORDS)
    memory = f"The evaluation ran out of memory (limit {_bytes(limits.memory_bytes)})."
    sig = outcome.signal
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and _cpu_exhausted(outcome)):
            return (
                "sandbox_cpu_time",
                f"The evaluation used up its CPU time limit of {_duration(limits.cpu_seconds)}.",
            )
        if sig == signal.SIGXFSZ:
            return (
                "sandbox_file_size",
                f"The evaluation tried to write a file over the {_bytes(limits.file_bytes)} limit.",
            )
        if memory_text or sig == signal.SIGKILL:
            # SIGKILL we did not send: the kernel's out-of-memory killer.
            return ("sandbox_memory", memory)
        return ("sandbox_signal", f"The evaluation was killed by signal {sig} ({_signame(sig)}).")
    if outcome.returncode == EXIT_MEMORY or (outcome.returncode and memory_text):
        return ("sandbox_memory", memory)
    if outcome.returncode and any(word in outcome.log[-20000:] for word in _PROCESS_WORDS):
        return (
            "sandbox_processes",
            f"The evaluation tried to run more than {limits.processes} processes and threads "
            "at once.",
        )
    if outcome.returncode and "No space left on device" in outcome.log[-20000:]:
        return (
            "sandbox_disk_space",
            f"The evaluation wrote more than its {_bytes(limits.tmpfs_bytes)} of scratch space.",
        )
    if outcome.returncode and "File too large" in outcome.log[-20000:]:
        # Python ignores SIGXFSZ and raises OSError(EFBIG) instead.
        return (
            "sandbox_file_size",
            f"The evaluation tried to write a file over the {_bytes(limits.file_bytes)} limit.",
        )
    if outcome.returncode:
        return (
            "sandbox_crashed",
            f"The evaluation exited with status {outcome.returncode}"
            + (f": {tail}" if tail else "."),
        )
    if outcome.protocol_errors:
        return (
            "sandbox_bad_output",
            "The evaluation wrote invalid output: " + outcome.protocol_errors[0],
        )
    return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_exhausted(outcome: SandboxResult) -> bool:
    # The hard CPU limit kills with SIGKILL, like the kernel's out-of-memory killer: tell
    # them apart by the CPU time the child used. Under bwrap the sandboxed process is a
    # grandchild whose time does not reach RUSAGE_CHILDREN; then the wall time times the
    # cores is the upper bound to go by.
    limit = outcome.limits.cpu_seconds - 0.5
    if outcome.cpu_seconds >= limit:
        return True
    return outcome.cpu_seconds < 0.1 and outcome.duration_seconds * (os.cpu_count() or 1) >= limit


def _last_line(log: str) -> str:
    for line in reversed(log.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == math.floor(value) else f"{value:.1f} {unit}"
    return f"{int(n)} bytes"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:g} s"


# --- The read-only adapter copy -------------------------------------------------------------


def workdir_create(*, files: dict[str, bytes], prefix: str = "tessera-run-") -> tuple[Path, Path]:
    """A private temporary folder with a read-only copy of the adapter files in ``adapter/``.

    Returns (workdir, adapter_dir). The folder is 0700 (the worker's own), the adapter
    folder 0555 and its files 0444; the child gets only these copies, never the storage.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    return workdir, workdir_add_readonly(workdir, "adapter", files=files)


def workdir_add_readonly(workdir: Path, folder: str, *, files: dict[str, bytes]) -> Path:
    """A read-only folder ``workdir/folder`` holding ``files`` (0555, its files 0444): one
    adapter's copy. A group's workdir holds one such folder per adapter."""
    for name in (folder, *files):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
    adapter_dir = workdir / folder
    adapter_dir.mkdir()
    for name, data in files.items():
        path = adapter_dir / name
        path.write_bytes(data)
        path.chmod(0o444)
    adapter_dir.chmod(0o555)
    return adapter_dir


def workdirs_remove_stale(prefix: str) -> int:
    """Remove workdirs named ``<prefix>*`` in the temporary folder: what a worker killed
    mid-run (SIGKILL runs no cleanup) left behind on this host. Returns how many."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{glob.escape(prefix)}*"):
        if path.is_dir() and not path.is_symlink():
            workdir_remove(path)
            removed += 1
    return removed


def workdir_remove(workdir: Path) -> None:
    """Remove a workdir made by workdir_create (restoring write permission first)."""
    if not workdir.exists():
        return
    for path in workdir.rglob("*"):
        with contextlib.suppress(OSError):
            path.chmod(0o700 if path.is_dir() else 0o600)
    shutil.rmtree(workdir, ignore_errors=True)
