"""Fairness and abuse limits, hit through the real portal and API endpoints: uploads per
hour and live evaluations per contributor, test sets per adapter and per contributor and
each example's size, and the throttled log-in and sign-up. Each refusal has its status and
code and leaves nothing stored; under each limit the same request works."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connections
from django.test import Client
from django.urls import reverse

from contributions import services
from contributions.models import AdapterVersion, ApiToken, AuditEvent, Contributor
from evaluation.models import ContributorTestSet, EvaluationRun
from evaluation.services import test_sets as test_set_services
from tessera.errors import DomainError
from tests.conftest import media_files
from tests.contributions.test_api import client_for as api_client_for
from tests.contributions.test_api import multipart_files
from tests.contributions.test_portal import adapter_files, signup_data, text
from tests.factories import PASSWORD, AdapterFactory
from tests.support.crafted import real_adapter

pytestmark = pytest.mark.django_db

RunStatus = EvaluationRun.Status


@pytest.fixture
def adapter(contributor, base_model):
    return AdapterFactory(owner=contributor, slug="adder")


@pytest.fixture
def api(contributor):
    return api_client_for(contributor)


@pytest.fixture
def portal(contributor) -> Client:
    client = Client()
    client.force_login(contributor)
    return client


def api_upload(api, adapter, seed: int):
    url = reverse("api:version-list", kwargs={"adapter_id": adapter.pk})
    return api.post(url, multipart_files(real_adapter(seed=seed).files()), format="multipart")


def portal_upload(portal, adapter, seed: int):
    url = reverse("portal:version-upload", args=[adapter.pk])
    return portal.post(url, adapter_files(real_adapter(seed=seed).files()))


def error_code(response) -> str:
    return response.json()["error"]["code"]


# --- uploads per hour ----------------------------------------------------------------------


def test_the_upload_past_the_hourly_limit_is_refused_with_429_and_stores_nothing(
    api, portal, adapter, settings, media_root
):
    settings.TESSERA_UPLOADS_PER_HOUR = 2
    assert api_upload(api, adapter, 1).status_code == 201
    assert portal_upload(portal, adapter, 2).status_code == 302
    files_before = len(media_files(media_root))

    refused = api_upload(api, adapter, 3)
    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "upload_rate_limited"
    assert 3500 <= int(refused["Retry-After"]) <= 3600
    assert refused.json()["error"]["details"]["limit"] == 2

    page = portal_upload(portal, adapter, 4)
    assert page.status_code == 429
    assert "upload_rate_limited" in text(page)
    assert int(page["Retry-After"]) >= 1

    assert AdapterVersion.objects.count() == 2
    assert EvaluationRun.objects.count() == 2
    assert len(media_files(media_root)) == files_before


def test_over_the_hourly_limit_even_a_malformed_upload_is_refused_before_it_is_parsed(
    api, adapter, settings
):
    settings.TESSERA_UPLOADS_PER_HOUR = 1
    assert api_upload(api, adapter, 1).status_code == 201
    url = reverse("api:version-list", kwargs={"adapter_id": adapter.pk})
    files = multipart_files({"adapter_model.safetensors": b"junk"})
    junk = api.post(url, files, format="multipart")
    assert junk.status_code == 429
    assert error_code(junk) == "upload_rate_limited"


def test_uploads_older_than_an_hour_no_longer_count(api, adapter, settings):
    settings.TESSERA_UPLOADS_PER_HOUR = 1
    assert api_upload(api, adapter, 1).status_code == 201
    assert api_upload(api, adapter, 2).status_code == 429
    AdapterVersion.objects.update(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=61))
    assert api_upload(api, adapter, 3).status_code == 201


def test_the_hourly_limit_is_per_contributor_across_their_adapters(
    api, adapter, contributor, other_contributor, settings
):
    settings.TESSERA_UPLOADS_PER_HOUR = 1
    second = AdapterFactory(owner=contributor, slug="second")
    assert api_upload(api, adapter, 1).status_code == 201
    assert error_code(api_upload(api, second, 2)) == "upload_rate_limited"
    theirs = AdapterFactory(owner=other_contributor, slug="theirs")
    assert api_upload(api_client_for(other_contributor), theirs, 3).status_code == 201


# --- live evaluations per contributor ----------------------------------------------------------


def test_an_upload_past_the_live_evaluation_limit_is_refused_with_409_and_stores_nothing(
    api, portal, adapter, settings, media_root
):
    settings.TESSERA_LIVE_RUNS_PER_CONTRIBUTOR = 2
    assert api_upload(api, adapter, 1).status_code == 201
    assert api_upload(api, adapter, 2).status_code == 201
    EvaluationRun.objects.filter(version__number=2).update(status=RunStatus.RUNNING)
    files_before = len(media_files(media_root))

    refused = api_upload(api, adapter, 3)
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "too_many_live_evaluations"
    assert refused.json()["error"]["details"] == {"limit": 2, "live": 2}
    page = portal_upload(portal, adapter, 3)
    assert page.status_code == 409
    assert "too_many_live_evaluations" in text(page)

    assert AdapterVersion.objects.count() == 2
    assert not AuditEvent.objects.filter(version__number=3).exists()
    assert len(media_files(media_root)) == files_before


def test_a_finished_evaluation_frees_a_place(api, adapter, settings):
    settings.TESSERA_LIVE_RUNS_PER_CONTRIBUTOR = 1
    assert api_upload(api, adapter, 1).status_code == 201
    assert api_upload(api, adapter, 2).status_code == 409
    EvaluationRun.objects.update(status=RunStatus.SUCCEEDED)
    assert api_upload(api, adapter, 2).status_code == 201


def test_another_contributors_evaluations_do_not_count(api, adapter, other_contributor, settings):
    settings.TESSERA_LIVE_RUNS_PER_CONTRIBUTOR = 1
    theirs = AdapterFactory(owner=other_contributor, slug="theirs")
    assert api_upload(api_client_for(other_contributor), theirs, 1).status_code == 201
    assert api_upload(api, adapter, 2).status_code == 201


# --- test sets ------------------------------------------------------------------------------


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


SUMS = jsonl({"prompt": "What is 1 + 2?", "target": "3"}, {"prompt": "2 + 2?", "target": "4"})


def attach(client, adapter, name: str, data: bytes = SUMS):
    body = {
        "name": name,
        "metric": "exact_match",
        "file": SimpleUploadedFile("sums.jsonl", data, content_type="application/jsonl"),
    }
    url = reverse("evaluation-api:test-sets", kwargs={"adapter_id": adapter.pk})
    return client.post(url, body, format="multipart")


def attach_on_portal(portal, adapter, name: str, data: bytes = SUMS):
    body = {
        "name": name,
        "metric": "exact_match",
        "file": SimpleUploadedFile("sums.jsonl", data, content_type="application/jsonl"),
    }
    return portal.post(reverse("evaluation:test-sets", args=[adapter.pk]), body)


def test_a_test_set_past_the_per_adapter_limit_is_refused_with_409(api, portal, adapter, settings):
    settings.TESSERA_TEST_SETS_PER_ADAPTER = 2
    assert attach(api, adapter, "one").status_code == 201
    assert attach_on_portal(portal, adapter, "two").status_code == 302
    refused = attach(api, adapter, "three")
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "test_set_limit_reached"
    assert refused.json()["error"]["details"]["scope"] == "adapter"
    page = attach_on_portal(portal, adapter, "three")
    assert page.status_code == 409
    assert "test_set_limit_reached" in text(page)
    assert ContributorTestSet.objects.count() == 2
    assert AuditEvent.objects.filter(action="test_set.created").count() == 2


def test_a_test_set_past_the_per_contributor_limit_is_refused_on_any_adapter(
    api, adapter, contributor, settings
):
    settings.TESSERA_TEST_SETS_PER_CONTRIBUTOR = 2
    second = AdapterFactory(owner=contributor, slug="second")
    assert attach(api, adapter, "one").status_code == 201
    assert attach(api, second, "two").status_code == 201
    refused = attach(api, second, "three")
    assert refused.status_code == 409
    assert refused.json()["error"]["details"]["scope"] == "contributor"
    assert ContributorTestSet.objects.count() == 2


def test_a_test_set_with_too_many_examples_is_refused(api, adapter, settings):
    settings.TESSERA_TEST_SET_MAX_EXAMPLES = 2
    rows = [{"prompt": f"{i} + 1?", "target": str(i + 1)} for i in range(3)]
    refused = attach(api, adapter, "big", jsonl(*rows))
    assert refused.status_code == 400
    assert error_code(refused) == "test_set_too_many_lines"
    assert attach(api, adapter, "small", jsonl(*rows[:2])).status_code == 201
    assert list(ContributorTestSet.objects.values_list("name", flat=True)) == ["small"]


def test_an_example_over_the_size_bound_is_refused_with_its_line(api, adapter, settings):
    settings.TESSERA_TEST_SET_EXAMPLE_MAX_CHARS = 100
    long = jsonl(
        {"prompt": "short", "target": "ok"},
        {"prompt": "x" * 60, "target": "y", "choices": ["y", "z" * 40]},
    )
    refused = attach(api, adapter, "long", long)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "test_set_example_too_long"
    assert error["details"]["line"] == 2
    assert not ContributorTestSet.objects.exists()
    fits = jsonl({"prompt": "x" * 60, "target": "y", "choices": ["y", "z" * 38]})
    assert attach(api, adapter, "fits", fits).status_code == 201


# --- log-in and sign-up ---------------------------------------------------------------------


def log_in(client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(
        reverse("portal:login"), {"username": username, "password": password}, REMOTE_ADDR=ip
    )


def test_failed_log_ins_for_one_username_are_throttled_even_with_the_right_password(
    client, contributor, settings
):
    settings.TESSERA_LOGIN_FAILURES_PER_USERNAME = 3
    for attempt in range(3):
        assert log_in(client, "owner", "wrong", ip=f"10.0.0.{attempt}").status_code == 200
    refused = log_in(client, "owner", PASSWORD, ip="10.0.0.9")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= settings.TESSERA_AUTH_THROTTLE_WINDOW_SECONDS
    page = text(refused)
    assert "login_throttled" in page and "Too many failed log-ins" in page
    assert "_auth_user_id" not in client.session
    # Another account is not held back by this one's failures.
    other = get_user_model().objects.create_user(username="someone", password=PASSWORD)
    assert log_in(client, "someone", PASSWORD, ip="10.0.0.9").status_code == 302
    assert client.session["_auth_user_id"] == str(other.pk)


def test_failed_log_ins_from_one_address_are_throttled_across_usernames(
    client, contributor, settings
):
    settings.TESSERA_LOGIN_FAILURES_PER_IP = 3
    for name in ("a", "b", "c"):
        assert log_in(client, name, "guess").status_code == 200
    assert log_in(client, "owner", PASSWORD).status_code == 429
    assert log_in(client, "owner", PASSWORD, ip="10.9.9.9").status_code == 302


def test_a_successful_log_in_clears_its_usernames_failures(client, contributor, settings):
    settings.TESSERA_LOGIN_FAILURES_PER_USERNAME = 2
    assert log_in(client, "owner", "typo").status_code == 200
    assert log_in(client, "owner", PASSWORD).status_code == 302
    client.logout()
    assert log_in(client, "owner", "typo").status_code == 200
    assert log_in(client, "owner", PASSWORD).status_code == 302


def test_sign_ups_from_one_address_are_throttled_and_store_nothing(client, settings):
    settings.TESSERA_SIGNUPS_PER_IP = 2
    url = reverse("portal:signup")
    first = client.post(url, signup_data(username="first"), REMOTE_ADDR="10.1.1.1")
    assert first.status_code == 302
    client.logout()
    typo = client.post(
        url, signup_data(username="second", password2="nope"), REMOTE_ADDR="10.1.1.1"
    )
    assert typo.status_code == 400  # a submitted form counts, valid or not
    refused = client.post(url, signup_data(username="third"), REMOTE_ADDR="10.1.1.1")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    page = text(refused)
    assert "signup_throttled" in page
    assert 'value="third"' in page  # what was typed comes back, passwords excepted
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["first"]
    assert Contributor.objects.count() == 1
    elsewhere = client.post(url, signup_data(username="third"), REMOTE_ADDR="10.2.2.2")
    assert elsewhere.status_code == 302


# --- two requests racing for the last place ---------------------------------------------------


def race(count: int, action) -> list[str]:
    """Run ``action()`` in ``count`` threads released together; each outcome, or its code."""
    start = threading.Barrier(count)
    outcomes: list[str] = []

    def one() -> None:
        try:
            start.wait()
            action()
            outcomes.append("ok")
        except DomainError as exc:
            outcomes.append(exc.code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(outcomes)


@pytest.mark.django_db(transaction=True)
def test_two_keys_created_at_once_for_the_last_place_make_one(contributor, settings):
    settings.TESSERA_API_KEYS_PER_USER = 1
    outcomes = race(2, lambda: services.api_token_create(user=contributor, name="racer"))
    assert outcomes == ["api_key_limit_reached", "ok"]
    assert ApiToken.objects.filter(user=contributor).count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_test_sets_attached_at_once_for_the_last_place_make_one(
    contributor, base_model, settings
):
    settings.TESSERA_TEST_SETS_PER_ADAPTER = 1
    adapter = AdapterFactory(owner=contributor, slug="adder")
    names = iter(["first", "second"])

    def attach_one() -> None:
        test_set_services.contributor_test_set_create(
            adapter=adapter, actor=contributor, name=next(names), metric="exact_match", jsonl=SUMS
        )

    assert race(2, attach_one) == ["ok", "test_set_limit_reached"]
    assert ContributorTestSet.objects.count() == 1


def test_the_test_sets_page_states_the_limits_from_the_settings(portal, adapter, settings):
    settings.TESSERA_TEST_SET_MAX_EXAMPLES = 42
    settings.TESSERA_TEST_SETS_PER_ADAPTER = 3
    page = text(portal.get(reverse("evaluation:test-sets", args=[adapter.pk])))
    assert "At most 42 lines" in page
    assert "at most 3 test sets an adapter" in page
