"""Usage of the public API: counted in Redis per request, moved to the database in batches.

``usage_record`` is on the API server's hot path: one MULTI/EXEC round trip of HINCRBYs
into a single live hash, no database write. Its fields read ``<day>:<kind>:<id>:<metric>``
(kind ``k`` an API key, ``u`` a user without a key, ``v`` an adapter version with ``0`` for
the base model answering alone; metric ``r`` requests, ``p`` prompt and ``c`` completion
tokens). One hash for everything, rather than one per (day, key) or (day, version), lets
a flush take every counter at once with a single atomic RENAME, with no SCAN and no index
of dirty keys. The same transaction adds the request's tokens to the key's daily quota
counter (routing.limits.quota_key).

``usage_flush`` (Celery beat, every TESSERA_USAGE_FLUSH_SECONDS) applies the counters to
KeyUsageDaily and AdapterUsageDaily exactly once:

1. a Lua script renames the live hash to a new batch key and lists the batch in a set,
   atomically, so a request lands either wholly in the batch or wholly in the next live
   hash;
2. every listed batch (this one, and any a crashed flush left behind) is added to the
   daily rows in one transaction that also inserts a ``UsageBatch`` row named after it;
3. after the commit the batch is deleted from Redis.

A flush that crashes before its commit leaves the batch listed for the next one; one that
crashes after it leaves a batch the next flush finds in ``UsageBatch`` and only deletes.
Two flushes racing over one batch both try to insert its UsageBatch row; the unique index
makes the second wait for the first to commit and then fail, so it skips the batch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from contributions.models import AdapterVersion, ApiToken
from routing.limits import (
    KEY_PREFIX,
    QUOTA_COUNTER_TTL_SECONDS,
    quota_key,
    redis_async,
    redis_sync,
    utc_today,
    warn_redis_down,
)
from routing.models import AdapterUsageDaily, KeyUsageDaily, UsageBatch

logger = logging.getLogger(__name__)

LIVE_KEY = KEY_PREFIX + ":usage:live"
BATCH_KEY = KEY_PREFIX + ":usage:batch:{batch_id}"
BATCHES_KEY = KEY_PREFIX + ":usage:batches"
# A batch's UsageBatch row is needed only until the batch is deleted from Redis, which
# happens in the same flush or the next one; a week is a wide margin.
BATCH_MARKER_DAYS = 7
# The field in a sealed batch holding when it was sealed (Redis clock, Unix seconds).
SEALED_AT_FIELD = "sealed_at"
BASE_MODEL_VERSION_ID = 0

KIND_KEY, KIND_USER, KIND_VERSION = "k", "u", "v"
METRICS = {"r": "requests", "p": "prompt_tokens", "c": "completion_tokens"}


# --- Recording (the API server) -----------------------------------------------------------


def _increments(
    *,
    token_id: int | None,
    user_id: int | None,
    version_ids: Sequence[int],
    prompt_tokens: int,
    completion_tokens: int,
    day: dt.date,
    weights: Sequence[float] | None = None,
) -> list[tuple[str, int]]:
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    owners: list[tuple[str, dict[str, int]]] = []
    amounts = {"r": 1, "p": prompt_tokens, "c": completion_tokens}
    if token_id is not None:
        owners.append((f"{KIND_KEY}:{token_id}", amounts))
    elif user_id is not None:
        # A key's owner is known from the key; a user id matters only without one.
        owners.append((f"{KIND_USER}:{user_id}", amounts))
    shares = _version_shares(version_ids, weights)
    if not shares:  # none: the base model answered alone and gets all of it
        shares = {BASE_MODEL_VERSION_ID: 1.0}
    # Each version that took part counts the request once and is credited its share of the
    # tokens; the shares of a request's tokens add up to its tokens exactly.
    prompt_split = apportion(prompt_tokens, shares)
    completion_split = apportion(completion_tokens, shares)
    for version_id in shares:
        split = {"r": 1, "p": prompt_split[version_id], "c": completion_split[version_id]}
        owners.append((f"{KIND_VERSION}:{version_id}", split))
    return [
        (f"{day.isoformat()}:{owner}:{metric}", amount)
        for owner, counts in owners
        for metric, amount in counts.items()
        if amount
    ]


def _version_shares(
    version_ids: Sequence[int], weights: Sequence[float] | None
) -> dict[int, float]:
    """{version id: weight}, the weights normalised to sum 1 (equal without weights)."""
    if weights is None:
        weights = [1.0] * len(version_ids)
    if len(weights) != len(version_ids):
        raise ValueError("give one weight per version")
    shares: dict[int, float] = {}
    for version_id, weight in zip(version_ids, weights, strict=True):
        if not weight >= 0:  # also refuses NaN
            raise ValueError("weights cannot be negative")
        shares[version_id] = shares.get(version_id, 0.0) + float(weight)
    total = sum(shares.values())
    if total > 0:  # a version weighted 0 (an Arrow candidate never picked) took no part
        shares = {version_id: weight for version_id, weight in shares.items() if weight > 0}
    if total <= 0:
        return {version_id: 1.0 / len(shares) for version_id in shares} if shares else {}
    return {version_id: weight / total for version_id, weight in shares.items()}


def apportion(total: int, shares: dict[int, float]) -> dict[int, int]:
    """Split ``total`` into whole parts proportional to ``shares`` that add up to ``total``
    (largest remainders get the leftover units; ties go to the earlier entry)."""
    exact = {key: total * share for key, share in shares.items()}
    parts = {key: int(value) for key, value in exact.items()}
    leftover = total - sum(parts.values())
    by_remainder = sorted(exact, key=lambda key: -(exact[key] - parts[key]))
    for key in by_remainder[:leftover]:
        parts[key] += 1
    return parts


def _queue_increments(
    pipe: redis.client.Pipeline | aioredis.client.Pipeline,
    increments: list[tuple[str, int]],
    *,
    token_id: int | None,
    day: dt.date,
    total_tokens: int,
) -> None:
    for field, amount in increments:
        pipe.hincrby(LIVE_KEY, field, amount)
    if token_id is not None and total_tokens:
        key = quota_key(token_id=token_id, day=day)
        pipe.incrby(key, total_tokens)
        pipe.expire(key, QUOTA_COUNTER_TTL_SECONDS)


def _queue_request(
    pipe,
    *,
    token_id: int | None,
    user_id: int | None,
    version_ids: Sequence[int],
    prompt_tokens: int,
    completion_tokens: int,
    weights: Sequence[float] | None = None,
) -> list[tuple[str, int]]:
    """Queue one request's counts on ``pipe`` (sync or async); return the increments."""
    day = utc_today()
    increments = _increments(
        token_id=token_id,
        user_id=user_id,
        version_ids=version_ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        day=day,
        weights=weights,
    )
    _queue_increments(
        pipe,
        increments,
        token_id=token_id,
        day=day,
        total_tokens=prompt_tokens + completion_tokens,
    )
    return increments


async def usage_record(
    *,
    token_id: int | None,
    user_id: int | None,
    version_ids: Sequence[int],
    prompt_tokens: int,
    completion_tokens: int,
    weights: Sequence[float] | None = None,
) -> None:
    """Count one answered request for its key (or user) and every version that served it;
    ``weights`` (one per version) split the request's tokens between those versions.

    Redis unreachable (a connection error, in practice refused or reset before EXEC): the
    counts go straight to the database instead, the one slow path. Redis timing out: they
    are dropped with a warning, since a timed-out transaction may have been applied and
    writing it again would count it twice.
    """
    pipe = redis_async().pipeline(transaction=True)
    increments = _queue_request(
        pipe,
        token_id=token_id,
        user_id=user_id,
        version_ids=version_ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        weights=weights,
    )
    try:
        await pipe.execute()
    except redis.ConnectionError as exc:
        warn_redis_down("usage written to the database directly", exc)
        await sync_to_async(_record_in_database)(increments)
    except redis.RedisError as exc:
        logger.warning("usage of one request dropped (%s): %s", type(exc).__name__, increments)


def usage_record_sync(
    *,
    token_id: int | None,
    user_id: int | None,
    version_ids: Sequence[int],
    prompt_tokens: int,
    completion_tokens: int,
    weights: Sequence[float] | None = None,
) -> None:
    """``usage_record`` for synchronous callers."""
    pipe = redis_sync().pipeline(transaction=True)
    increments = _queue_request(
        pipe,
        token_id=token_id,
        user_id=user_id,
        version_ids=version_ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        weights=weights,
    )
    try:
        pipe.execute()
    except redis.ConnectionError as exc:
        warn_redis_down("usage written to the database directly", exc)
        _record_in_database(increments)
    except redis.RedisError as exc:
        logger.warning("usage of one request dropped (%s): %s", type(exc).__name__, increments)


def _record_in_database(increments: list[tuple[str, int]]) -> None:
    # Called from the API server's executor thread, outside Django's request cycle, which
    # is what normally drops a connection the database closed or one past CONN_MAX_AGE.
    _close_old_connections()
    try:
        with transaction.atomic():
            _, token_ids = _apply_counters(_parse_counters(dict(increments)))
        _touch_tokens(token_ids, seen_at=timezone.now())
    except Exception:
        # The request itself was answered; failing it now would not bring the counts back.
        logger.exception("usage of one request lost: %s", increments)
    finally:
        _close_old_connections()


def _close_old_connections() -> None:
    # Inside a caller's transaction the connection is in use, not old.
    if not connection.in_atomic_block:
        close_old_connections()


# --- Flushing (Celery beat) ---------------------------------------------------------------

# KEYS: the live hash, the set of pending batches, the new batch's key. ARGV: its id.
# Renames atomically, so the request being recorded right now goes wholly to one side.
SEAL_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[3], ARGV[2], redis.call('TIME')[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
SEAL_SHA = hashlib.sha1(SEAL_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis's script id)


def usage_flush() -> int:
    """Move the usage counters from Redis into the daily tables; returns the number of
    daily rows incremented. Safe to run concurrently, and again after a crash."""
    client = redis_sync()
    batch_id = uuid.uuid4().hex
    keys = [LIVE_KEY, BATCHES_KEY, BATCH_KEY.format(batch_id=batch_id)]
    args = [batch_id, SEALED_AT_FIELD]
    try:
        client.evalsha(SEAL_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        client.eval(SEAL_SCRIPT, len(keys), *keys, *args)
    rows = 0
    for pending in sorted(member.decode() for member in client.smembers(BATCHES_KEY)):
        rows += _flush_batch(client, pending)
    UsageBatch.objects.filter(
        applied_at__lt=timezone.now() - dt.timedelta(days=BATCH_MARKER_DAYS)
    ).delete()
    return rows


def _flush_batch(client: redis.Redis, batch_id: str) -> int:
    key = BATCH_KEY.format(batch_id=batch_id)
    raw = {field.decode(): int(value) for field, value in client.hgetall(key).items()}
    rows = 0
    if raw:
        sealed = raw.pop(SEALED_AT_FIELD, None)
        seen_at = dt.datetime.fromtimestamp(sealed, dt.UTC) if sealed else timezone.now()
        token_ids: set[int] = set()
        with transaction.atomic():
            try:
                with transaction.atomic():
                    UsageBatch.objects.create(batch_id=batch_id)
            except IntegrityError:
                # Applied already: by a flush that crashed before deleting it, or by one
                # running beside this one (whose commit this insert waited for).
                logger.info("usage batch %s was applied already; deleting it", batch_id)
            else:
                rows, token_ids = _apply_counters(_parse_counters(raw))
        _touch_tokens(token_ids, seen_at=seen_at)
    _forget_batch(client, batch_id)
    return rows


def _forget_batch(client: redis.Redis, batch_id: str) -> None:
    """Only after the batch's commit: from here on its UsageBatch row guards it."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(BATCH_KEY.format(batch_id=batch_id))
    pipe.srem(BATCHES_KEY, batch_id)
    pipe.execute()


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _parse_counters(raw: dict[str, int]) -> dict[tuple[dt.date, str, int], _Counts]:
    counters: dict[tuple[dt.date, str, int], _Counts] = defaultdict(_Counts)
    for field, amount in raw.items():
        try:
            day, kind, ident, metric = field.split(":")
            target = counters[(dt.date.fromisoformat(day), kind, int(ident))]
            setattr(target, METRICS[metric], getattr(target, METRICS[metric]) + amount)
        except (ValueError, KeyError):
            # Not written by usage_record; keeping it would stall every later flush.
            logger.error("usage counter %r=%s is malformed; dropped", field, amount)
    return counters


def _apply_counters(counters: dict[tuple[dt.date, str, int], _Counts]) -> tuple[int, set[int]]:
    """Add the counters to the daily rows; returns the rows touched and the API keys seen.

    Caller holds a transaction. Rows are updated in one sorted order, so two flushes over
    overlapping rows wait for each other instead of deadlocking. Counters of keys, users
    or versions deleted since are dropped: their rows would violate the foreign keys, and
    their usage is deleted with them anyway."""
    ids = defaultdict(set)
    for _, kind, ident in counters:
        ids[kind].add(ident)
    token_users = dict(ApiToken.objects.filter(pk__in=ids[KIND_KEY]).values_list("pk", "user_id"))
    users = set(get_user_model().objects.filter(pk__in=ids[KIND_USER]).values_list("pk", flat=True))
    versions = set(
        AdapterVersion.objects.filter(pk__in=ids[KIND_VERSION]).values_list("pk", flat=True)
    )
    versions.add(BASE_MODEL_VERSION_ID)

    rows = 0
    for (day, kind, ident), counts in sorted(counters.items()):
        if kind == KIND_KEY and ident in token_users:
            model, lookup = KeyUsageDaily, {"day": day, "api_token_id": ident}
            extra = {"user_id": token_users[ident]}
        elif kind == KIND_USER and ident in users:
            model, lookup, extra = KeyUsageDaily, {"day": day, "user_id": ident}, {}
            lookup["api_token"] = None
        elif kind == KIND_VERSION and ident in versions:
            version_id = None if ident == BASE_MODEL_VERSION_ID else ident
            model, lookup, extra = AdapterUsageDaily, {"day": day}, {}
            lookup["adapter_version_id"] = version_id
        else:
            logger.warning("usage of a deleted %s %s dropped: %s", kind, ident, counts)
            continue
        _upsert(model, lookup, extra, counts)
        rows += 1
    return rows, set(token_users)


def _touch_tokens(token_ids: set[int], *, seen_at: dt.datetime) -> None:
    """last_used_at to the flush's resolution, without a write per request. Outside the
    batch's transaction: it is informative, and must not hold the batch's locks longer."""
    if token_ids:
        ApiToken.objects.filter(pk__in=token_ids).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=seen_at)
        ).update(last_used_at=seen_at)


def _upsert(model, lookup: dict, extra: dict, counts: _Counts) -> None:
    increments = {
        "requests": F("requests") + counts.requests,
        "prompt_tokens": F("prompt_tokens") + counts.prompt_tokens,
        "completion_tokens": F("completion_tokens") + counts.completion_tokens,
    }
    if model.objects.filter(**lookup).update(**increments):
        return
    try:
        with transaction.atomic():
            model.objects.create(
                **lookup,
                **extra,
                requests=counts.requests,
                prompt_tokens=counts.prompt_tokens,
                completion_tokens=counts.completion_tokens,
            )
    except IntegrityError:
        # Another flush created the day's row between the update and the insert.
        model.objects.filter(**lookup).update(**increments)
