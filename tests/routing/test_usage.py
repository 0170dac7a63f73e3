"""Usage counting against the suite's real Redis and PostgreSQL: usage_record counts in
Redis, usage_flush moves the counts into the daily tables exactly once (repeated, racing,
crashed halfway), the Celery task runs it, and the selectors read it back."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import threading

import pytest
from django.db import connection
from django.utils import timezone

from contributions import services
from contributions.models import AdapterVersion
from routing import limits, usage, usage_selectors
from routing.models import AdapterUsageDaily, KeyUsageDaily, UsageBatch
from routing.tasks import flush_usage
from tessera.celery import app
from tests.conftest import redis_url
from tests.factories import AdapterFactory
from tests.routing.test_limits import run, unused_port

pytestmark = pytest.mark.django_db


def make_version(adapter, number: int = 1) -> AdapterVersion:
    """A version row without files: usage only needs it to exist."""
    return AdapterVersion.objects.create(
        adapter=adapter,
        number=number,
        base_model=adapter_base_model(),
        status=AdapterVersion.Status.ADMITTED,
        status_changed_at=timezone.now(),
        config_file="unused/adapter_config.json",
        weights_file="unused/adapter_model.safetensors",
        config_sha256="0" * 64,
        weights_sha256=secrets.token_hex(32),
        size_bytes=1,
        rank=8,
        alpha=16.0,
        dropout=0.0,
        target_modules=["q_proj"],
        dtype="float32",
        tensor_count=2,
        parameter_count=16,
        adapter_config={},
    )


def adapter_base_model():
    from tests.factories import BaseModelFactory

    return BaseModelFactory()


@pytest.fixture
def adapter(contributor):
    return AdapterFactory(owner=contributor, slug="adder", title="Adder")


@pytest.fixture
def versions(adapter):
    return make_version(adapter, 1), make_version(adapter, 2)


@pytest.fixture
def token(contributor):
    return services.api_token_create(user=contributor, name="ci")[0]


def record(**kwargs) -> None:
    fields = {"token_id": None, "user_id": None, "version_ids": [], **kwargs}
    fields.setdefault("prompt_tokens", 0)
    fields.setdefault("completion_tokens", 0)
    run(usage.usage_record, **fields)


def key_row(token) -> tuple[int, int, int]:
    row = KeyUsageDaily.objects.get(api_token=token)
    return row.requests, row.prompt_tokens, row.completion_tokens


def version_row(version) -> tuple[int, int, int]:
    row = AdapterUsageDaily.objects.get(adapter_version=version)
    return row.requests, row.prompt_tokens, row.completion_tokens


def redis_is_drained(client) -> bool:
    return not client.exists(usage.LIVE_KEY) and client.scard(usage.BATCHES_KEY) == 0


# --- recording and flushing ---------------------------------------------------------------


def test_each_version_is_credited_its_weighted_share_of_a_composed_answer(
    api_redis_db, token, contributor, versions
):
    v1, v2 = versions
    record(
        token_id=token.pk,
        version_ids=[v1.pk, v2.pk],
        weights=[0.75, 0.25],
        prompt_tokens=10,
        completion_tokens=7,
    )
    # An Arrow candidate that never received weight took no part: it is not credited.
    record(token_id=token.pk, version_ids=[v1.pk, v2.pk], weights=[1.0, 0.0], prompt_tokens=3)
    usage.usage_flush()
    assert key_row(token) == (2, 13, 7)
    assert version_row(v1) == (2, 8 + 3, 5)  # 7.5 -> 8 and 5.25 -> 5: the parts add up
    assert version_row(v2) == (1, 2, 2)


@pytest.mark.parametrize(
    ("total", "shares", "parts"),
    [
        (10, {1: 0.5, 2: 0.5}, {1: 5, 2: 5}),
        (7, {1: 0.5, 2: 0.5}, {1: 4, 2: 3}),
        (1, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}, {1: 1, 2: 0, 3: 0}),
        (100, {1: 0.667, 2: 0.333}, {1: 67, 2: 33}),
        (0, {1: 0.2, 2: 0.8}, {1: 0, 2: 0}),
    ],
)
def test_apportioned_tokens_always_add_up_to_the_total(total, shares, parts):
    assert usage.apportion(total, shares) == parts
    assert sum(usage.apportion(total, shares).values()) == total


@pytest.mark.parametrize("weights", [[0.5], [-1.0, 2.0], [float("nan"), 1.0]])
def test_weights_that_do_not_fit_the_versions_are_refused(weights):
    with pytest.raises(ValueError):
        usage._version_shares([1, 2], weights)


def test_recorded_usage_lands_in_the_daily_tables_with_exact_sums(
    api_redis_db, token, contributor, versions
):
    v1, v2 = versions
    mine = {"token_id": token.pk, "user_id": contributor.pk}
    record(**mine, version_ids=[v1.pk], prompt_tokens=10, completion_tokens=5)
    record(**mine, version_ids=[v1.pk, v2.pk], prompt_tokens=7, completion_tokens=3)
    record(**mine, version_ids=[], prompt_tokens=2, completion_tokens=1)
    # Nothing reaches the database per request.
    assert not KeyUsageDaily.objects.exists() and not AdapterUsageDaily.objects.exists()

    assert usage.usage_flush() == 4  # one key row, two version rows, one base-model row

    today = limits.utc_today()
    row = KeyUsageDaily.objects.get(api_token=token)
    assert (row.day, row.user_id) == (today, contributor.pk)
    assert key_row(token) == (3, 19, 9)
    # Two versions answering together split the tokens (equal shares without weights; the
    # odd token goes to the first), and each counts the request.
    assert version_row(v1) == (2, 14, 7)
    assert version_row(v2) == (1, 3, 1)
    base = AdapterUsageDaily.objects.get(adapter_version=None)
    assert (base.day, base.requests, base.prompt_tokens) == (today, 1, 2)
    assert base.completion_tokens == 1
    assert redis_is_drained(api_redis_db)


def test_a_second_flush_adds_nothing(api_redis_db, token, versions):
    record(token_id=token.pk, version_ids=[versions[0].pk], prompt_tokens=4, completion_tokens=4)
    assert usage.usage_flush() == 2
    assert usage.usage_flush() == 0
    assert key_row(token) == (1, 4, 4)
    assert version_row(versions[0]) == (1, 4, 4)


def test_usage_recorded_between_flushes_is_added_not_lost(api_redis_db, token, versions):
    record(token_id=token.pk, version_ids=[versions[0].pk], prompt_tokens=1, completion_tokens=2)
    usage.usage_flush()
    record(token_id=token.pk, version_ids=[versions[0].pk], prompt_tokens=3, completion_tokens=4)
    record(token_id=token.pk, version_ids=[versions[1].pk], prompt_tokens=5, completion_tokens=6)
    usage.usage_flush()
    assert key_row(token) == (3, 9, 12)
    assert version_row(versions[0]) == (2, 4, 6)
    assert version_row(versions[1]) == (1, 5, 6)
    assert KeyUsageDaily.objects.count() == 1


def test_requests_without_a_key_count_for_the_user(api_redis_db, contributor, token):
    record(user_id=contributor.pk, prompt_tokens=8, completion_tokens=2)
    record(token_id=token.pk, user_id=contributor.pk, prompt_tokens=1, completion_tokens=1)
    usage.usage_flush()
    keyless = KeyUsageDaily.objects.get(api_token=None)
    assert (keyless.user_id, keyless.requests, keyless.prompt_tokens) == (contributor.pk, 1, 8)
    assert key_row(token) == (1, 1, 1)


def test_the_flush_refreshes_last_used_at_of_the_keys_it_saw(api_redis_db, token, contributor):
    other, _ = services.api_token_create(user=contributor, name="idle")
    before = timezone.now() - dt.timedelta(seconds=2)
    record(token_id=token.pk, prompt_tokens=1)
    usage.usage_flush()
    token.refresh_from_db()
    other.refresh_from_db()
    assert token.last_used_at is not None and token.last_used_at >= before
    assert other.last_used_at is None


def test_usage_of_a_key_deleted_before_the_flush_is_dropped_and_the_rest_lands(
    api_redis_db, token, contributor, versions
):
    doomed, _ = services.api_token_create(user=contributor, name="doomed")
    record(token_id=doomed.pk, version_ids=[versions[0].pk], prompt_tokens=1)
    record(token_id=token.pk, version_ids=[versions[0].pk], prompt_tokens=2)
    doomed.delete()
    usage.usage_flush()
    assert key_row(token) == (1, 2, 0)
    assert version_row(versions[0]) == (2, 3, 0)
    assert redis_is_drained(api_redis_db)


def test_negative_token_counts_are_refused(api_redis_db, token):
    with pytest.raises(ValueError, match="negative"):
        record(token_id=token.pk, prompt_tokens=-1)
    assert not api_redis_db.exists(usage.LIVE_KEY)


@pytest.mark.django_db(transaction=True)
def test_without_redis_usage_is_written_to_the_database_directly(
    settings, monkeypatch, token, versions
):
    settings.TESSERA_API_REDIS_URL = f"redis://127.0.0.1:{unused_port()}/0"
    monkeypatch.setattr(limits, "_last_warning", 0.0)
    record(token_id=token.pk, version_ids=[versions[1].pk], prompt_tokens=6, completion_tokens=1)
    usage.usage_record_sync(
        token_id=token.pk, user_id=None, version_ids=[], prompt_tokens=1, completion_tokens=1
    )
    assert key_row(token) == (2, 7, 2)
    assert version_row(versions[1]) == (1, 6, 1)
    assert AdapterUsageDaily.objects.get(adapter_version=None).requests == 1


# --- a flush that crashes, or runs beside another -----------------------------------------


class Crash(Exception):
    pass


def test_a_flush_that_crashed_before_its_commit_is_completed_by_the_next(
    api_redis_db, token, monkeypatch
):
    record(token_id=token.pk, prompt_tokens=5, completion_tokens=5)

    def crash(counters):
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(usage, "_apply_counters", crash)
        with pytest.raises(Crash):
            usage.usage_flush()
    assert not KeyUsageDaily.objects.exists()
    assert not UsageBatch.objects.exists()  # rolled back with the increments
    record(token_id=token.pk, prompt_tokens=1, completion_tokens=0)  # after the crash

    usage.usage_flush()
    assert key_row(token) == (2, 6, 5)
    assert redis_is_drained(api_redis_db)


def test_a_flush_that_crashed_after_its_commit_is_not_applied_twice(
    api_redis_db, token, monkeypatch
):
    record(token_id=token.pk, prompt_tokens=5, completion_tokens=5)

    def crash(client, batch_id):
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(usage, "_forget_batch", crash)
        with pytest.raises(Crash):
            usage.usage_flush()
    assert key_row(token) == (1, 5, 5)
    assert api_redis_db.scard(usage.BATCHES_KEY) == 1  # still in Redis, already applied

    assert usage.usage_flush() == 0
    assert key_row(token) == (1, 5, 5)
    assert redis_is_drained(api_redis_db)


@pytest.mark.django_db(transaction=True)
def test_concurrent_flushes_while_requests_arrive_count_everything_once(
    api_redis_db, token, versions
):
    requests_per_writer, writers, flushers = 150, 2, 3
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(requests_per_writer):
                usage.usage_record_sync(
                    token_id=token.pk,
                    user_id=None,
                    version_ids=[versions[i % 2].pk],
                    prompt_tokens=3,
                    completion_tokens=2,
                )
        except BaseException as exc:
            errors.append(exc)

    def flush() -> None:
        try:
            while not done.is_set():
                usage.usage_flush()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    flush_threads = [threading.Thread(target=flush) for _ in range(flushers)]
    write_threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in flush_threads + write_threads:
        thread.start()
    for thread in write_threads:
        thread.join()
    done.set()
    for thread in flush_threads:
        thread.join()
    assert errors == []
    usage.usage_flush()

    total = requests_per_writer * writers
    assert key_row(token) == (total, 3 * total, 2 * total)
    assert version_row(versions[0]) == (total // 2, 3 * total // 2, total)
    assert version_row(versions[1]) == (total // 2, 3 * total // 2, total)
    assert KeyUsageDaily.objects.count() == 1 and AdapterUsageDaily.objects.count() == 2
    assert UsageBatch.objects.count() >= 1
    assert redis_is_drained(api_redis_db)


# --- the Celery task ----------------------------------------------------------------------


def test_the_flush_task_runs_the_service(api_redis_db, token):
    record(token_id=token.pk, prompt_tokens=2, completion_tokens=3)
    result = flush_usage.apply()
    assert result.successful()
    assert result.result == 2  # the key's row and the base model's
    assert key_row(token) == (1, 2, 3)


def test_beat_flushes_usage_on_the_maintenance_queue(settings):
    # Its own queue, so 25-minute evaluations on a shared worker never hold it back.
    entry = settings.CELERY_BEAT_SCHEDULE["flush-api-usage"]
    assert entry["task"] == "routing.flush_usage"
    assert entry["schedule"] == settings.TESSERA_USAGE_FLUSH_SECONDS
    route = app.amqp.router.route({}, "routing.flush_usage", args=(), kwargs={})
    assert route["queue"].name == "maintenance"
    assert entry["options"]["expires"] <= settings.TESSERA_USAGE_FLUSH_SECONDS


# --- selectors ----------------------------------------------------------------------------


def _row(model, days_ago: int, **fields) -> None:
    model.objects.create(
        day=limits.utc_today() - dt.timedelta(days=days_ago),
        requests=fields.pop("requests"),
        prompt_tokens=fields.pop("prompt_tokens", 0),
        completion_tokens=fields.pop("completion_tokens", 0),
        **fields,
    )


def test_key_usage_totals_cover_the_last_n_days_only(token, contributor):
    other, _ = services.api_token_create(user=contributor, name="other")
    _row(KeyUsageDaily, 0, user=contributor, api_token=token, requests=2, prompt_tokens=5)
    _row(KeyUsageDaily, 29, user=contributor, api_token=token, requests=3, completion_tokens=1)
    _row(KeyUsageDaily, 30, user=contributor, api_token=token, requests=100)
    _row(KeyUsageDaily, 1, user=contributor, api_token=other, requests=1)
    totals = usage_selectors.key_usage_totals(token_ids=[token.pk], days=30)
    assert totals == {token.pk: usage_selectors.UsageTotals(5, 5, 1)}
    assert totals[token.pk].total_tokens == 6
    assert usage_selectors.key_usage_totals(token_ids=[token.pk], days=1)[token.pk].requests == 2
    daily = usage_selectors.key_usage_daily(token_id=token.pk, days=30)
    assert len(daily) == 30
    assert daily[0].totals.requests == 3 and daily[-1].totals.requests == 2


def test_adapter_usage_sums_its_versions_per_day_with_empty_days_as_zero(adapter, versions):
    v1, v2 = versions
    _row(AdapterUsageDaily, 0, adapter_version=v1, requests=1, prompt_tokens=1)
    _row(AdapterUsageDaily, 0, adapter_version=v2, requests=2, completion_tokens=4)
    _row(AdapterUsageDaily, 3, adapter_version=v1, requests=5)
    _row(AdapterUsageDaily, 14, adapter_version=v1, requests=50)  # outside 14 days
    _row(AdapterUsageDaily, 0, adapter_version=None, requests=7)  # the base model

    daily = usage_selectors.adapter_usage_daily(adapter_id=adapter.pk, days=14)
    assert [d.day for d in daily] == [
        limits.utc_today() - dt.timedelta(days=13 - i) for i in range(14)
    ]
    assert [d.totals.requests for d in daily] == [0] * 10 + [5, 0, 0, 3]
    assert daily[-1].totals == usage_selectors.UsageTotals(3, 1, 4)

    assert usage_selectors.adapter_usage_totals(days=14) == {
        adapter.pk: usage_selectors.UsageTotals(8, 1, 4)
    }
    assert usage_selectors.base_model_usage_totals(days=14).requests == 7


def test_one_row_per_day_and_key_is_a_database_invariant(token, contributor):
    from django.db import IntegrityError, transaction

    _row(KeyUsageDaily, 0, user=contributor, api_token=token, requests=1)
    _row(KeyUsageDaily, 0, user=contributor, api_token=None, requests=1)
    for fields in ({"api_token": token}, {"api_token": None}):
        with pytest.raises(IntegrityError), transaction.atomic():
            _row(KeyUsageDaily, 0, user=contributor, requests=1, **fields)
    _row(AdapterUsageDaily, 0, adapter_version=None, requests=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        _row(AdapterUsageDaily, 0, adapter_version=None, requests=1)


def test_the_api_redis_url_defaults_to_the_broker_when_it_is_redis(redis_proc):
    import os
    import subprocess
    import sys

    url = redis_url(redis_proc, 5)
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_API_REDIS_URL"}
    env.update(CELERY_BROKER_URL=url, DJANGO_SETTINGS_MODULE="tessera.settings")
    code = "from django.conf import settings; print(settings.TESSERA_API_REDIS_URL)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == url


def test_usage_record_runs_in_the_servers_event_loop_across_calls(api_redis_db, token):
    async def two_requests() -> None:
        try:
            for _ in range(2):
                await usage.usage_record(
                    token_id=token.pk,
                    user_id=None,
                    version_ids=[],
                    prompt_tokens=1,
                    completion_tokens=1,
                )
        finally:
            await limits.redis_async_close()

    asyncio.run(two_requests())
    usage.usage_flush()
    assert key_row(token) == (2, 2, 2)
