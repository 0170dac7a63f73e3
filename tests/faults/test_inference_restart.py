"""The inference server (uvicorn serving tessera.serving) SIGKILLed while requests are in
flight, then started again on the same port. Every client gets a whole answer or a clean
connection error within its timeout, never a hang; the new process serves the same
mixture; no request is counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from benchmarks.bench_load import wait_healthy
from contributions import services as contribution_services
from routing import usage
from routing.models import KeyUsageDaily, MixtureVersion
from tests.conftest import redis_url
from tests.faults.conftest import ROOT, assert_mixture_consistent, free_port, pg_url, stop
from tests.routing.conftest import DATES_PROMPTS, UNITS_PROMPTS, admitted_version

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("tiny_base_model"),
]

API_REDIS_DB = 4
CLIENT_TIMEOUT = 20.0


@pytest.fixture
def api_redis(settings, redis_proc):
    from routing.limits import redis_sync

    settings.TESSERA_API_REDIS_URL = redis_url(redis_proc, API_REDIS_DB)
    client = redis_sync()
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def start_inference(pg_server, settings, api_redis):
    processes: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        env = dict(
            os.environ,
            DATABASE_URL=pg_url(pg_server),
            TESSERA_API_REDIS_URL=settings.TESSERA_API_REDIS_URL,
            TESSERA_MEDIA_ROOT=str(settings.MEDIA_ROOT),
            TESSERA_MIXTURE_POLL_SECONDS="0.1",
            OMP_NUM_THREADS="1",
        )
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "tessera.serving:application"),
                *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop(process)


def test_in_flight_requests_end_cleanly_and_the_restarted_server_serves_the_same_mixture(
    contributor, start_inference, sent
):
    units = admitted_version(contributor, slug="unit-conversion", prompts=UNITS_PROMPTS, seed=1)
    dates = admitted_version(contributor, slug="date-formatting", prompts=DATES_PROMPTS, seed=2)
    key = contribution_services.api_token_create(user=contributor, name="client")
    token, secret = key
    mixture = MixtureVersion.objects.get(is_active=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_inference(port)
    health = wait_healthy(url, first)
    assert (health["mixture"], health["adapters"]) == (mixture.number, 2)

    outcomes: list[tuple[str, float]] = []  # ("answered" | error class, seconds)
    stop_sending = threading.Event()
    lock = threading.Lock()

    def client(prompt: str) -> None:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=CLIENT_TIMEOUT
        ) as http:
            while not stop_sending.is_set():
                started = time.monotonic()
                try:
                    response = http.post(
                        "/v1/chat/completions",
                        json={
                            "model": "tessera",
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 24,
                            "temperature": 0,
                        },
                    )
                    body = response.json()
                    assert response.status_code == 200, body
                    assert body["choices"][0]["message"]["content"] is not None
                    assert response.headers["x-tessera-mixture"] == str(mixture.number)
                    outcome = "answered"
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append((outcome, time.monotonic() - started))
                if outcome != "answered":
                    return

    threads = [
        threading.Thread(target=client, args=(prompt,), daemon=True)
        for prompt in [*UNITS_PROMPTS[:2], *DATES_PROMPTS]
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(o == "answered" for o, _ in outcomes) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
        assert not thread.is_alive(), "a client hung past its timeout"
    stop_sending.set()
    answered = sum(o == "answered" for o, _ in outcomes)
    errors = [o for o, _ in outcomes if o != "answered"]
    assert answered >= 8
    # Every client still sending when the process died got a connection error, at once.
    assert len(errors) == len(threads), outcomes
    assert set(errors) <= {"RemoteProtocolError", "ReadError", "ConnectError"}, errors
    assert max(seconds for _, seconds in outcomes) < CLIENT_TIMEOUT

    second = start_inference(port)
    health = wait_healthy(url, second)
    assert (health["mixture"], health["adapters"]) == (mixture.number, 2)
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=CLIENT_TIMEOUT
    ) as http:
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert {
            f"{contributor.username}/unit-conversion",
            f"{contributor.username}/date-formatting",
        } <= models
        after = http.post(
            "/v1/chat/completions",
            json={
                "model": "tessera",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
        )
        assert after.status_code == 200, after.text
        assert after.headers["x-tessera-mixture"] == str(mixture.number)
    answered += 1

    # Usage: each answered request counted once; a request cut off may have been counted
    # (its answer was made, not delivered) but never twice. Flushing again adds nothing.
    usage.usage_flush()
    counted = KeyUsageDaily.objects.get(api_token=token).requests
    assert answered <= counted <= answered + len(errors), (answered, counted, errors)
    usage.usage_flush()
    assert KeyUsageDaily.objects.get(api_token=token).requests == counted
    assert {units.pk, dates.pk} == set(mixture.members.values_list("pk", flat=True))
    assert_mixture_consistent()
