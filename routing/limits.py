"""Per-key limits of the public inference API, kept in Redis: one round trip per check.

Two limits, both per API key (``contributions.ApiToken``):

* **requests per minute**, a sliding-window log (``rate_limit_acquire``): a sorted set of
  the key's accepted request times, trimmed to the last 60 s and counted in one Lua script
  that reads Redis's own clock, so every API replica shares one clock and one count.
  Chosen over a fixed window because a fixed window lets a client send 2N requests across
  a minute boundary, and over GCRA because "at most N in any 60 s" is what the key's
  owner is told; the price is N timestamps per key, a few kilobytes at these limits
  (contributions.models.MAX_REQUESTS_PER_MINUTE caps N). Refused requests are not
  logged, so hammering a full window does not push the retry further away; a request the
  server sheds at capacity (503) gives its slot back (``rate_limit_release``), so a busy
  server does not use up its clients' minute.
* **tokens per UTC day** (``token_quota_check``): reads the day's counter that
  ``routing.usage.usage_record`` adds each answered request's prompt and completion tokens
  to. It is checked before a request, so the request that crosses the quota finishes; the
  next one is refused until midnight UTC.

A third check sums the second over all of a user's keys (``user_quota_check``): the day's
tokens of every key they hold, or revoked today, against TESSERA_API_USER_TOKENS_PER_DAY,
so a user with five keys gets the same tokens a day as with one (and revoking a spent key
for a fresh one gains nothing).

When Redis is unreachable the checks **fail open** with a logged warning: the key was
already authenticated against the database, the limits are about fairness rather than
security (throttle counters are not atomic enough to be a security boundary), and a cache
outage should not take the whole public API down with it. Timeouts are short for the same reason.

The async functions are for the ASGI API server's hot path; the ``_sync`` twins share the
same script and keys for synchronous callers (Django views, management commands, tests).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
import secrets
import time
import weakref
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from contributions.models import MAX_REQUESTS_PER_MINUTE, ApiToken

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
# Hot-path timeouts: a stalled Redis must cost a request milliseconds, not seconds.
HOT_PATH_TIMEOUT_SECONDS = 0.5
# The day's token counter outlives its day by a day, so a clock a little behind still
# finds it; after that it expires on its own.
QUOTA_COUNTER_TTL_SECONDS = 2 * 24 * 3600
# At most one "Redis is down" warning per this many seconds, not one per request.
WARNING_INTERVAL_SECONDS = 30.0

KEY_PREFIX = "tessera:api"


@dataclass(frozen=True)
class LimitResult:
    """A limit's answer. ``retry_after`` is in whole seconds, 0 when allowed; ``limit`` 0
    means there is no limit (a quota of 0 in settings)."""

    allowed: bool
    retry_after: int
    limit: int
    remaining: int
    # The request's entry in the key's minute (``rate_limit_acquire`` only, when it took
    # one): what ``rate_limit_release`` removes. Empty when nothing was logged.
    slot: str = ""


@dataclass(frozen=True)
class TokenLimits:
    requests_per_minute: int
    tokens_per_day: int  # 0: no daily quota


def token_limits(*, token: ApiToken) -> TokenLimits:
    """The key's own limits, or the deployment's defaults where it has none."""
    return TokenLimits(
        requests_per_minute=token.requests_per_minute or settings.TESSERA_API_REQUESTS_PER_MINUTE,
        tokens_per_day=token.tokens_per_day or settings.TESSERA_API_TOKENS_PER_DAY,
    )


# --- Redis clients ------------------------------------------------------------------------
# One asyncio client per event loop: redis.asyncio connections belong to the loop that
# opened them (the API server has one loop; each asyncio.run() in a test has its own).
# Both kinds are rebuilt when TESSERA_API_REDIS_URL changes (tests point it elsewhere).
# One retry without backoff replaces a pooled connection Redis closed; a longer retry
# loop would only stretch an outage into every request.

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, aioredis.Redis]]
_async_clients = weakref.WeakKeyDictionary()
_sync_clients: dict[str, redis.Redis] = {}


def redis_async() -> aioredis.Redis:
    """The API Redis client for the running event loop."""
    loop = asyncio.get_running_loop()
    url = settings.TESSERA_API_REDIS_URL
    cached = _async_clients.get(loop)
    if cached is not None and cached[0] == url:
        return cached[1]
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=HOT_PATH_TIMEOUT_SECONDS,
        socket_connect_timeout=HOT_PATH_TIMEOUT_SECONDS,
        retry=AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
    _async_clients[loop] = (url, client)
    return client


async def redis_async_close() -> None:
    """Close this loop's client (the API server's shutdown; the end of an asyncio.run)."""
    cached = _async_clients.pop(asyncio.get_running_loop(), None)
    if cached is not None:
        await cached[1].aclose()


def redis_sync() -> redis.Redis:
    """The API Redis client for synchronous code; thread-safe (it pools connections)."""
    url = settings.TESSERA_API_REDIS_URL
    client = _sync_clients.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        client = _sync_clients.setdefault(url, client)
    return client


_last_warning = 0.0


def warn_redis_down(what: str, exc: BaseException) -> None:
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= WARNING_INTERVAL_SECONDS:
        _last_warning = now
        logger.warning("API Redis unavailable, %s: %s: %s", what, type(exc).__name__, exc)


# --- Requests per minute ------------------------------------------------------------------

RATE_KEY = KEY_PREFIX + ":rate:{token_id}"

# KEYS[1]: the key's log, a sorted set of accepted request times (microseconds, scores).
# ARGV: limit, window in microseconds, a unique member for this request.
# Returns {allowed (1/0), microseconds until a slot frees (0 when allowed), remaining}.
RATE_LIMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return {1, 0, limit - count - 1}
end
-- Full (or over a limit that was lowered): a slot frees when the entry that would bring
-- the count below the limit leaves the window.
local entry = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {0, tonumber(entry[2]) + window - now, 0}
"""


RATE_LIMIT_SHA = hashlib.sha1(RATE_LIMIT_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis's id)


def _rate_args(token_id: int, requests_per_minute: int) -> tuple[list[str], list]:
    if not 1 <= requests_per_minute <= MAX_REQUESTS_PER_MINUTE:
        raise ValueError(f"requests_per_minute must be 1..{MAX_REQUESTS_PER_MINUTE}")
    keys = [RATE_KEY.format(token_id=token_id)]
    # The member only has to be unique among this key's requests in one minute.
    return keys, [requests_per_minute, WINDOW_SECONDS * 1_000_000, secrets.token_hex(8)]


def _rate_result(reply: list, requests_per_minute: int, member: str) -> LimitResult:
    allowed, wait_us, remaining = (int(x) for x in reply)
    retry_after = 0 if allowed else max(1, -(-wait_us // 1_000_000))
    return LimitResult(
        allowed=bool(allowed),
        retry_after=retry_after,
        limit=requests_per_minute,
        remaining=remaining,
        slot=member if allowed else "",
    )


def _rate_open(requests_per_minute: int) -> LimitResult:
    return LimitResult(
        allowed=True, retry_after=0, limit=requests_per_minute, remaining=requests_per_minute
    )


async def rate_limit_acquire(*, token_id: int, requests_per_minute: int) -> LimitResult:
    """Take one request slot of the key's minute, or say how long until one frees."""
    keys, args = _rate_args(token_id, requests_per_minute)
    client = redis_async()
    try:
        try:
            reply = await client.evalsha(RATE_LIMIT_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # First use on this Redis (or after a restart): EVAL also caches the script.
            reply = await client.eval(RATE_LIMIT_SCRIPT, len(keys), *keys, *args)
    except redis.RedisError as exc:
        warn_redis_down("rate limits not enforced", exc)
        return _rate_open(requests_per_minute)
    return _rate_result(reply, requests_per_minute, args[2])


def rate_limit_acquire_sync(*, token_id: int, requests_per_minute: int) -> LimitResult:
    """``rate_limit_acquire`` for synchronous callers."""
    keys, args = _rate_args(token_id, requests_per_minute)
    client = redis_sync()
    try:
        try:
            reply = client.evalsha(RATE_LIMIT_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            reply = client.eval(RATE_LIMIT_SCRIPT, len(keys), *keys, *args)
    except redis.RedisError as exc:
        warn_redis_down("rate limits not enforced", exc)
        return _rate_open(requests_per_minute)
    return _rate_result(reply, requests_per_minute, args[2])


async def rate_limit_release(*, token_id: int, slot: str) -> None:
    """Give back a slot ``rate_limit_acquire`` took, for a request that was refused before
    any work was done for it (the server at capacity answered 503): the key's minute then
    counts it as never made. Removes exactly that request's entry; a slot already trimmed
    out of the window, or none (the limiter was open), is a no-op."""
    if not slot:
        return
    try:
        await redis_async().zrem(RATE_KEY.format(token_id=token_id), slot)
    except redis.RedisError as exc:
        warn_redis_down("a refused request's rate-limit slot not given back", exc)


def rate_limit_release_sync(*, token_id: int, slot: str) -> None:
    """``rate_limit_release`` for synchronous callers."""
    if not slot:
        return
    try:
        redis_sync().zrem(RATE_KEY.format(token_id=token_id), slot)
    except redis.RedisError as exc:
        warn_redis_down("a refused request's rate-limit slot not given back", exc)


# --- Tokens per day -----------------------------------------------------------------------

QUOTA_KEY = KEY_PREFIX + ":quota:{day}:{token_id}"


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def quota_key(*, token_id: int, day: dt.date) -> str:
    """The day's token counter; routing.usage writes it, the quota check reads it."""
    return QUOTA_KEY.format(day=day.isoformat(), token_id=token_id)


def _seconds_to_midnight_utc() -> int:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


def _quota_result(used: bytes | None, tokens_per_day: int) -> LimitResult:
    spent = int(used or 0)
    if spent < tokens_per_day:
        return LimitResult(
            allowed=True, retry_after=0, limit=tokens_per_day, remaining=tokens_per_day - spent
        )
    return LimitResult(
        allowed=False, retry_after=_seconds_to_midnight_utc(), limit=tokens_per_day, remaining=0
    )


def _quota_open(tokens_per_day: int) -> LimitResult:
    # What is left is unknown while Redis is away; the full quota is the honest upper bound.
    return LimitResult(allowed=True, retry_after=0, limit=tokens_per_day, remaining=tokens_per_day)


def _quota_unlimited(tokens_per_day: int) -> LimitResult | None:
    if tokens_per_day < 0:
        raise ValueError("tokens_per_day must be 0 (no quota) or positive")
    if tokens_per_day == 0:
        return LimitResult(allowed=True, retry_after=0, limit=0, remaining=0)
    return None


async def token_quota_check(*, token_id: int, tokens_per_day: int) -> LimitResult:
    """Whether the key has tokens left today (UTC). ``tokens_per_day`` 0: no quota."""
    unlimited = _quota_unlimited(tokens_per_day)
    if unlimited is not None:
        return unlimited
    try:
        used = await redis_async().get(quota_key(token_id=token_id, day=utc_today()))
    except redis.RedisError as exc:
        warn_redis_down("token quotas not enforced", exc)
        return _quota_open(tokens_per_day)
    return _quota_result(used, tokens_per_day)


def token_quota_check_sync(*, token_id: int, tokens_per_day: int) -> LimitResult:
    """``token_quota_check`` for synchronous callers."""
    unlimited = _quota_unlimited(tokens_per_day)
    if unlimited is not None:
        return unlimited
    try:
        used = redis_sync().get(quota_key(token_id=token_id, day=utc_today()))
    except redis.RedisError as exc:
        warn_redis_down("token quotas not enforced", exc)
        return _quota_open(tokens_per_day)
    return _quota_result(used, tokens_per_day)


# --- Tokens per day, all of a user's keys together ------------------------------------------


@dataclass(frozen=True)
class UserQuotaPlan:
    """Which counters make up a user's day, and their total's limit (0: no quota)."""

    tokens_per_day: int
    token_ids: tuple[int, ...]


def user_quota_plan(*, user_id: int) -> UserQuotaPlan:
    """The user's keys that can have spent tokens today (live, or revoked since midnight
    UTC) and the limit on their sum: TESSERA_API_USER_TOKENS_PER_DAY, or more when a
    maintainer gave one of the live keys a larger quota of its own (that key's quota would
    mean nothing under a smaller total)."""
    default = settings.TESSERA_API_USER_TOKENS_PER_DAY
    midnight = dt.datetime.combine(utc_today(), dt.time(), tzinfo=dt.UTC)
    rows = ApiToken.objects.filter(user_id=user_id).filter(
        Q(revoked_at__isnull=True) | Q(revoked_at__gte=midnight)
    )
    keys = list(rows.values_list("pk", "tokens_per_day", "revoked_at"))
    if not default:
        return UserQuotaPlan(tokens_per_day=0, token_ids=())
    own = [quota for _, quota, revoked in keys if quota and revoked is None]
    return UserQuotaPlan(
        tokens_per_day=max([default, *own]), token_ids=tuple(pk for pk, _, _ in keys)
    )


def _user_quota_keys(plan: UserQuotaPlan) -> list[str]:
    day = utc_today()
    return [quota_key(token_id=token_id, day=day) for token_id in plan.token_ids]


def _user_quota_result(used: list, plan: UserQuotaPlan) -> LimitResult:
    return _quota_result(sum(int(value or 0) for value in used), plan.tokens_per_day)


async def user_quota_check(*, user_id: int) -> LimitResult:
    """Whether the user's keys together have tokens left today (UTC): one indexed read of
    their keys, one MGET of those keys' counters."""
    plan = await sync_to_async(user_quota_plan)(user_id=user_id)
    unlimited = _quota_unlimited(plan.tokens_per_day)
    if unlimited is not None or not plan.token_ids:
        return unlimited or _quota_open(plan.tokens_per_day)
    try:
        used = await redis_async().mget(_user_quota_keys(plan))
    except redis.RedisError as exc:
        warn_redis_down("token quotas not enforced", exc)
        return _quota_open(plan.tokens_per_day)
    return _user_quota_result(used, plan)


def user_quota_check_sync(*, user_id: int) -> LimitResult:
    """``user_quota_check`` for synchronous callers (the tokens page, tests)."""
    plan = user_quota_plan(user_id=user_id)
    unlimited = _quota_unlimited(plan.tokens_per_day)
    if unlimited is not None or not plan.token_ids:
        return unlimited or _quota_open(plan.tokens_per_day)
    try:
        used = redis_sync().mget(_user_quota_keys(plan))
    except redis.RedisError as exc:
        warn_redis_down("token quotas not enforced", exc)
        return _quota_open(plan.tokens_per_day)
    return _user_quota_result(used, plan)
