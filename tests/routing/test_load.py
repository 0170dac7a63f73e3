"""Load shedding: past the scheduler's queue bound the inference API answers 503 with a
Retry-After, never a hang or another 5xx, and a shed request does not count toward the
key's requests per minute.

The rate-limit refund runs against the suite's real Redis, over the in-process server of
tests/routing/conftest; the load test runs the inference server as a process of its own
(uvicorn on loopback) and locust as another (benchmarks/locustfile.py; locust's gevent
patching stays out of the test process).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from contributions import services
from contributions.models import ApiToken
from routing import limits

pytestmark = pytest.mark.django_db(transaction=True)


def run(coroutine_function, /, **kwargs):
    async def main():
        try:
            return await coroutine_function(**kwargs)
        finally:
            await limits.redis_async_close()

    return asyncio.run(main())


def acquire(token_id: int, rpm: int) -> limits.LimitResult:
    return run(limits.rate_limit_acquire, token_id=token_id, requests_per_minute=rpm)


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
