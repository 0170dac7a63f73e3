"""Load shedding: past the scheduler's queue bound the inference API answers 503 with a
Retry-After, never a hang or another 5xx, and a shed request does not count toward the
key's requests per minute.

The rate-limit refund runs against the suite's real Redis, over the in-process server of
tests/routing/conftest; the load test runs the inference server as a process of its own
(uvicorn on loopback) and locust as another (benchmarks/locustfile.py; locust's gevent
patching stays out of the test process).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from benchmarks.bench_load import free_port, run_locust, serve, stop, wait_healthy
from contributions import services
from contributions.models import MAX_REQUESTS_PER_MINUTE, ApiToken
from routing import limits
from tests.routing.conftest import DATES_PROMPTS, UNITS_PROMPTS, admitted_version
from tests.routing.test_limits import acquire, run

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT_TIMEOUT = 20.0  # seconds; a response slower than this counts as a hang


def logged(redis_client, token_id: int) -> int:
    return redis_client.zcard(limits.RATE_KEY.format(token_id=token_id))


# --- Giving a slot back -------------------------------------------------------------------


def test_a_released_slot_is_free_again_and_only_that_slot_leaves(api_redis_db):
    first, second, third = (acquire(7, 3) for _ in range(3))
    assert not acquire(7, 3).allowed
    assert len({first.slot, second.slot, third.slot}) == 3

    run(limits.rate_limit_release, token_id=7, slot=second.slot)
    members = {m.decode() for m in api_redis_db.zrange(limits.RATE_KEY.format(token_id=7), 0, -1)}
    assert members == {first.slot, third.slot}
    assert acquire(7, 3).allowed
    assert not acquire(7, 3).allowed


def test_releasing_twice_another_keys_slot_or_no_slot_changes_nothing(api_redis_db):
    mine = acquire(1, 5)
    theirs = acquire(2, 5)
    limits.rate_limit_release_sync(token_id=1, slot=mine.slot)
    limits.rate_limit_release_sync(token_id=1, slot=mine.slot)
    limits.rate_limit_release_sync(token_id=1, slot=theirs.slot)
    limits.rate_limit_release_sync(token_id=2, slot="")
    assert logged(api_redis_db, 1) == 0
    assert logged(api_redis_db, 2) == 1


def test_a_refused_acquire_has_no_slot_to_give_back(api_redis_db):
    acquire(3, 1)
    refused = acquire(3, 1)
    assert not refused.allowed
    assert refused.slot == ""


def test_releasing_with_redis_unreachable_fails_open_quietly(settings):
    settings.TESSERA_API_REDIS_URL = "redis://127.0.0.1:1/0"
    run(limits.rate_limit_release, token_id=1, slot="abc")  # no exception
    limits.rate_limit_release_sync(token_id=1, slot="abc")


# --- Through the API: a 503 leaves the key's minute unchanged ---------------------------------


@pytest.fixture
def key(contributor) -> tuple[ApiToken, str]:
    token, secret = services.api_token_create(user=contributor, name="client")
    ApiToken.objects.filter(pk=token.pk).update(requests_per_minute=2)
    return token, secret


def chat(http: httpx.Client) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={
            "model": "tessera",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "temperature": 0,
        },
    )


def test_a_request_shed_at_capacity_gives_its_rate_limit_slot_back(server, key, api_redis_db):
    token, secret = key
    scheduler = server.runtime.scheduler
    bound = scheduler.max_queue
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    ) as http:
        scheduler.max_queue = 0  # a real bound, reached by every request
        try:
            shed = [chat(http) for _ in range(5)]  # more than the key's 2 a minute
        finally:
            scheduler.max_queue = bound
        for response in shed:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "server_overloaded"
            assert int(response.headers["Retry-After"]) >= 1
        assert logged(api_redis_db, token.pk) == 0

        # The key's whole minute is still there: two answers, then the 429.
        assert [chat(http).status_code for _ in range(2)] == [200, 200]
        assert logged(api_redis_db, token.pk) == 2
        limited = chat(http)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"


# --- Locust past the queue bound: 200 or 503 + Retry-After, nothing else, no hang -------------


@pytest.fixture
def inference_process(tiny_base_model, pg_server, api_redis_db, no_evaluation, settings, tmp_path):
    """``start(**env)``: the inference server as a process of its own on a free port, over
    the suite's PostgreSQL and Redis; returns its URL once healthy. Stopped after the test."""
    processes = []

    def start(**env: str) -> str:
        port = free_port()
        process = serve(
            port,
            {
                "DATABASE_URL": (
                    f"postgres://{pg_server.user}@{pg_server.host}:{pg_server.port}/test_tessera"
                ),
                "TESSERA_API_REDIS_URL": settings.TESSERA_API_REDIS_URL,
                "TESSERA_MEDIA_ROOT": str(settings.MEDIA_ROOT),
                "TESSERA_SERVING_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                **env,
            },
            tmp_path / "server.log",
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, timeout=90)
        except RuntimeError as error:
            pytest.fail(f"{error}; log:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        return url

    yield start
    for process in processes:
        stop(process)


def test_past_the_queue_bound_the_api_answers_200_or_503_with_retry_after_and_never_hangs(
    contributor, inference_process, tmp_path, api_redis_db
):
    units = admitted_version(contributor, slug="unit-conversion", prompts=UNITS_PROMPTS, seed=1)
    dates = admitted_version(contributor, slug="date-formatting", prompts=DATES_PROMPTS, seed=2)
    token, secret = services.api_token_create(user=contributor, name="load")
    # Rate limits are not under test here: the key's minute is far above what is sent.
    ApiToken.objects.filter(pk=token.pk).update(requests_per_minute=MAX_REQUESTS_PER_MINUTE)
    # One waiting request and one running at a time: 16 clients are far past the bound.
    url = inference_process(TESSERA_SERVING_MAX_QUEUE="1", TESSERA_SERVING_MAX_BATCH="1")
    owner = contributor.username
    models = ["tessera", f"{owner}/{units.adapter.slug}", f"{owner}/{dates.adapter.slug}"]

    started = time.monotonic()
    result = run_locust(
        host=url,
        key=secret,
        users=16,
        seconds=6,
        workdir=tmp_path / "locust",
        models=models,
        max_tokens=32,
        client_timeout=CLIENT_TIMEOUT,
        stop_timeout=CLIENT_TIMEOUT,
        limit=60,
    )
    elapsed = time.monotonic() - started

    assert result.requests > 0, result.output
    # Only answers and polite refusals: no other status (no 500), no 503 without an integer
    # Retry-After >= 1 (the locustfile names those apart), no 429 at this key's limit.
    assert result.errors == {}, (result.errors, result.failures, result.output)
    assert result.limited == 0
    assert result.ok > 0
    assert result.shed > 0, "the load never reached the queue bound"
    assert result.ok + result.shed == result.requests
    # No hang: every response came well within the client's timeout, and locust, which
    # waits for the requests in flight at the end, was done soon after its 6 s.
    assert result.max_any < CLIENT_TIMEOUT * 1000
    assert elapsed < 6 + CLIENT_TIMEOUT + 15

    # The server still answers afterwards.
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as http:
        answer = http.post(
            "/v1/chat/completions",
            json={
                "model": models[1],
                "messages": [{"role": "user", "content": "Convert 4 km to metres."}],
                "max_tokens": 4,
            },
            timeout=CLIENT_TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] is not None
    # Every shed request gave its slot back: the key's minute holds the answered ones alone.
    assert logged(api_redis_db, token.pk) == result.ok + 1, result.output


# --- The load test's own check: what it counts as an error is one --------------------------

ANSWER = {"choices": [{"message": {"role": "assistant", "content": "4000"}}]}
# (status, headers, body, seconds before answering), served in turn.
CANNED = [
    (200, {}, ANSWER, 0),
    (503, {"Retry-After": "2"}, {"error": {"code": "server_overloaded"}}, 0),
    (429, {"Retry-After": "30"}, {"error": {"code": "rate_limit_exceeded"}}, 0),
    (503, {}, {"error": {"code": "server_overloaded"}}, 0),
    (503, {"Retry-After": "0"}, {"error": {"code": "server_overloaded"}}, 0),
    (500, {}, {"error": {"code": "engine_error"}}, 0),
    (200, {}, {"object": "not a completion"}, 0),
    (200, {}, ANSWER, 1.5),  # past the client's timeout: a hang
]


@pytest.fixture
def canned_server():
    """A stand-in API on loopback answering CANNED in turn, whatever is asked."""
    turns = itertools.cycle(CANNED)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                status, headers, body, delay = next(turns)
            time.sleep(delay)
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_load_test_counts_every_other_status_a_bad_retry_after_and_a_timeout_as_errors(
    canned_server, tmp_path
):
    result = run_locust(
        host=canned_server,
        key="tsk_test",
        users=2,
        seconds=3,
        workdir=tmp_path / "locust",
        models=["tessera"],
        client_timeout=0.5,
        stop_timeout=5,
        limit=40,
    )
    assert result.ok > 0 and result.shed > 0 and result.limited > 0, result.output
    assert set(result.errors) == {
        "503 without Retry-After",
        "error 500",
        "bad answer",
        "error 0",
    }, (result.errors, result.output)
    # The canned answers come in turn: each outcome's count follows its share of the turns.
    turns = result.requests / len(CANNED)
    shares = {"ok": 1, "shed": 1, "limited": 1, "503 without Retry-After": 2}
    counts = {"ok": result.ok, "shed": result.shed, "limited": result.limited, **result.errors}
    for name, count in counts.items():
        assert abs(count - shares.get(name, 1) * turns) <= 4, (name, counts)
