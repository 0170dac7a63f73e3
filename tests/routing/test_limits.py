"""Per-key limits of the inference API against the suite's real Redis: the sliding-window
request limit, the daily token quota fed by usage recording (per key, and for all of a
user's keys together), and failing open when Redis is unreachable."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket

import httpx
import pytest

from contributions import services
from contributions.models import ApiToken
from routing import limits, usage


def run(coroutine_function, /, **kwargs):
    """Run one async limit call in a fresh event loop, as a test has no server loop."""

    async def main():
        try:
            return await coroutine_function(**kwargs)
        finally:
            await limits.redis_async_close()

    return asyncio.run(main())


def acquire(token_id: int, rpm: int) -> limits.LimitResult:
    return run(limits.rate_limit_acquire, token_id=token_id, requests_per_minute=rpm)


def quota(token_id: int, tokens_per_day: int) -> limits.LimitResult:
    return run(limits.token_quota_check, token_id=token_id, tokens_per_day=tokens_per_day)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- requests per minute ------------------------------------------------------------------


def test_a_key_gets_its_requests_per_minute_then_is_refused_with_a_retry_after(api_redis_db):
    results = [acquire(7, 5) for _ in range(5)]
    assert all(r.allowed for r in results)
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0]
    assert {r.limit for r in results} == {5}

    refused = acquire(7, 5)
    assert not refused.allowed
    assert refused.remaining == 0
    # The first request leaves the window a minute after it was made: nearly 60 s from now.
    assert 55 <= refused.retry_after <= 60


def test_refused_requests_do_not_push_the_retry_further_away(api_redis_db):
    for _ in range(3):
        acquire(7, 3)
    first = acquire(7, 3)
    for _ in range(20):
        acquire(7, 3)
    assert api_redis_db.zcard(limits.RATE_KEY.format(token_id=7)) == 3
    assert acquire(7, 3).retry_after <= first.retry_after


def test_keys_are_limited_independently(api_redis_db):
    for _ in range(2):
        assert acquire(1, 2).allowed
    assert not acquire(1, 2).allowed
    assert acquire(2, 2).allowed
    assert acquire(2, 2).allowed
    assert not acquire(2, 2).allowed


def _age_requests(client, token_id: int, seconds: float, count: int | None = None) -> None:
    """Move the oldest ``count`` logged requests ``seconds`` into the past, as if made then."""
    key = limits.RATE_KEY.format(token_id=token_id)
    entries = client.zrange(key, 0, -1, withscores=True)
    for member, score in entries[: count if count is not None else len(entries)]:
        client.zadd(key, {member: score - seconds * 1_000_000})


def test_the_window_slides_a_slot_frees_when_the_oldest_request_is_a_minute_old(
    api_redis_db,
):
    for _ in range(3):
        acquire(9, 3)
    assert not acquire(9, 3).allowed
    _age_requests(api_redis_db, 9, 40, count=1)
    # The oldest is now 40 s old: 20 s until it leaves.
    assert 19 <= acquire(9, 3).retry_after <= 21
    _age_requests(api_redis_db, 9, 21, count=1)
    allowed = acquire(9, 3)
    assert allowed.allowed
    assert allowed.remaining == 0
    assert not acquire(9, 3).allowed


def test_a_lowered_limit_applies_at_once(api_redis_db):
    for _ in range(5):
        acquire(4, 5)
    _age_requests(api_redis_db, 4, 30, count=2)
    refused = acquire(4, 3)
    assert not refused.allowed
    # Five logged, limit three: a slot frees when the third oldest leaves, ~60 s away.
    assert 55 <= refused.retry_after <= 60


def test_the_request_log_expires_on_its_own(api_redis_db):
    acquire(5, 10)
    ttl = api_redis_db.pttl(limits.RATE_KEY.format(token_id=5))
    assert 0 < ttl <= 60_000


def test_the_sync_variant_shares_the_async_count(api_redis_db):
    assert acquire(3, 3).allowed
    assert limits.rate_limit_acquire_sync(token_id=3, requests_per_minute=3).allowed
    assert acquire(3, 3).allowed
    refused = limits.rate_limit_acquire_sync(token_id=3, requests_per_minute=3)
    assert not refused.allowed and refused.retry_after >= 1


def test_the_script_is_loaded_again_after_redis_forgets_it(api_redis_db):
    assert acquire(6, 2).allowed
    api_redis_db.script_flush()
    assert acquire(6, 2).allowed
    assert not limits.rate_limit_acquire_sync(token_id=6, requests_per_minute=2).allowed


@pytest.mark.parametrize("rpm", [0, -1, 10_001])
def test_an_impossible_limit_is_a_programming_error(api_redis_db, rpm):
    with pytest.raises(ValueError, match="requests_per_minute"):
        acquire(1, rpm)


# --- tokens per day -----------------------------------------------------------------------


def record(token_id: int | None, prompt: int, completion: int) -> None:
    run(
        usage.usage_record,
        token_id=token_id,
        user_id=None,
        version_ids=[],
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def test_the_quota_counts_the_tokens_usage_recording_adds(api_redis_db):
    fresh = quota(11, 1000)
    assert (fresh.allowed, fresh.remaining, fresh.limit) == (True, 1000, 1000)

    record(11, 300, 200)
    half = quota(11, 1000)
    assert half.allowed and half.remaining == 500

    record(11, 400, 100)
    spent = quota(11, 1000)
    assert not spent.allowed
    assert spent.remaining == 0
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert abs(spent.retry_after - (midnight - now).total_seconds()) <= 2
    # Another key's quota is its own.
    assert quota(12, 1000).remaining == 1000


def test_a_request_may_cross_the_quota_the_next_is_refused(api_redis_db):
    record(13, 90, 0)
    assert quota(13, 100).allowed
    record(13, 50, 10)  # the request that was allowed goes over
    assert not quota(13, 100).allowed
    assert not limits.token_quota_check_sync(token_id=13, tokens_per_day=100).allowed


def test_the_days_counter_expires_on_its_own(api_redis_db):
    record(14, 1, 1)
    key = limits.quota_key(token_id=14, day=limits.utc_today())
    assert int(api_redis_db.get(key)) == 2
    assert 0 < api_redis_db.ttl(key) <= limits.QUOTA_COUNTER_TTL_SECONDS


def test_a_quota_of_zero_means_no_quota(api_redis_db):
    record(15, 10**9, 0)
    result = quota(15, 0)
    assert result.allowed and result.limit == 0
    assert limits.token_quota_check_sync(token_id=15, tokens_per_day=0).allowed


# --- Redis unreachable --------------------------------------------------------------------


@pytest.fixture
def redis_down(settings, monkeypatch):
    settings.TESSERA_API_REDIS_URL = f"redis://127.0.0.1:{unused_port()}/0"
    monkeypatch.setattr(limits, "_last_warning", 0.0)


def test_limits_fail_open_with_a_warning_when_redis_is_unreachable(redis_down, caplog):
    caplog.set_level(logging.WARNING, logger="routing.limits")
    rate = acquire(1, 1)
    assert rate.allowed and rate.limit == 1
    assert "rate limits not enforced" in caplog.text
    assert limits.rate_limit_acquire_sync(token_id=1, requests_per_minute=1).allowed
    assert quota(1, 10).allowed
    assert limits.token_quota_check_sync(token_id=1, tokens_per_day=10).allowed


def test_the_outage_warning_is_not_repeated_per_request(redis_down, caplog):
    caplog.set_level(logging.WARNING, logger="routing.limits")
    for _ in range(5):
        acquire(1, 1)
    assert caplog.text.count("API Redis unavailable") == 1


# --- the effective limits of a key --------------------------------------------------------


@pytest.mark.django_db
def test_a_key_without_limits_follows_the_deployment_defaults(settings, contributor):
    settings.TESSERA_API_REQUESTS_PER_MINUTE = 42
    settings.TESSERA_API_TOKENS_PER_DAY = 5000
    token, _ = services.api_token_create(user=contributor, name="ci")
    assert limits.token_limits(token=token) == limits.TokenLimits(42, 5000)
    own, _ = services.api_token_create(
        user=contributor, name="cron", requests_per_minute=6, tokens_per_day=100
    )
    assert limits.token_limits(token=own) == limits.TokenLimits(6, 100)


# --- tokens per day, all of a user's keys together ------------------------------------------


def user_quota(user_id: int) -> limits.LimitResult:
    # The sync twin: the async one reads the keys in a thread of its own, with a database
    # connection that cannot see this test's uncommitted rows (the server test below uses it).
    return limits.user_quota_check_sync(user_id=user_id)


@pytest.mark.django_db
def test_a_users_keys_share_one_daily_quota(api_redis_db, settings, contributor):
    settings.TESSERA_API_TOKENS_PER_DAY = 1000
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 1000
    keys = [services.api_token_create(user=contributor, name=f"k{i}")[0] for i in range(5)]
    for token in keys[:4]:
        record(token.pk, 200, 50)
    # Each key alone is far under its own quota; together they have spent 1000.
    assert all(quota(token.pk, 1000).allowed for token in keys)
    spent = user_quota(contributor.pk)
    assert (spent.allowed, spent.limit, spent.remaining) == (False, 1000, 0)
    assert spent.retry_after >= 1


@pytest.mark.django_db
def test_revoking_a_spent_key_for_a_fresh_one_gains_no_tokens(api_redis_db, settings, contributor):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 500
    spent, _ = services.api_token_create(user=contributor, name="spent")
    record(spent.pk, 500, 0)
    services.api_token_revoke(token=spent, actor=contributor)
    services.api_token_create(user=contributor, name="fresh")
    assert not user_quota(contributor.pk).allowed


@pytest.mark.django_db
def test_under_the_user_quota_keys_work_and_other_users_are_not_counted(
    api_redis_db, settings, contributor, other_contributor
):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 500
    mine, _ = services.api_token_create(user=contributor, name="mine")
    theirs, _ = services.api_token_create(user=other_contributor, name="theirs")
    record(mine.pk, 100, 0)
    record(theirs.pk, 500, 0)
    result = user_quota(contributor.pk)
    assert (result.allowed, result.remaining) == (True, 400)
    assert not user_quota(other_contributor.pk).allowed


@pytest.mark.django_db
def test_a_key_a_maintainer_raised_raises_its_owners_total(api_redis_db, settings, contributor):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 500
    token, _ = services.api_token_create(user=contributor, name="big")
    ApiToken.objects.filter(pk=token.pk).update(tokens_per_day=5000)
    record(token.pk, 1000, 0)
    result = user_quota(contributor.pk)
    assert (result.allowed, result.limit) == (True, 5000)


@pytest.mark.django_db
def test_a_user_quota_of_zero_means_none(api_redis_db, settings, contributor):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 0
    token, _ = services.api_token_create(user=contributor, name="ci")
    record(token.pk, 10**6, 0)
    assert user_quota(contributor.pk).allowed


@pytest.mark.django_db
def test_the_user_quota_fails_open_when_redis_is_unreachable(redis_down, settings, contributor):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 10
    services.api_token_create(user=contributor, name="ci")
    assert user_quota(contributor.pk).allowed


@pytest.mark.django_db(transaction=True)
def test_the_inference_api_refuses_a_fresh_key_once_the_users_keys_spent_the_day(
    server, settings, contributor, other_contributor
):
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 300
    first, _ = services.api_token_create(user=contributor, name="first")
    second_key = services.api_token_create(user=contributor, name="second")[1]
    other_key = services.api_token_create(user=other_contributor, name="other")[1]
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

    def ask(key: str) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    assert ask(second_key).status_code == 200  # under the quota, a key works
    record(first.pk, 300, 0)
    refused = ask(second_key)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("user_quota_exceeded", "insufficient_quota")
    assert int(refused.headers["Retry-After"]) >= 1
    assert ask(other_key).status_code == 200  # another user's keys are their own
