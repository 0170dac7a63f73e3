"""API keys' limits and usage in the portal: the tokens page, the key limits a contributor
may choose, the usage panel of an adapter page, the read-only usage admin, and the
database's own guard on the limits."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.urls import reverse

from contributions import services
from contributions.models import ApiToken
from routing.limits import utc_today
from routing.models import AdapterUsageDaily, KeyUsageDaily
from tessera.errors import DomainError
from tests.contributions.test_portal import client_for, text
from tests.factories import AdapterFactory
from tests.support.crafted import real_adapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner_client(contributor):
    return client_for(contributor)


@pytest.fixture
def maintainer_client(maintainer):
    return client_for(maintainer)


@pytest.fixture
def version(contributor, base_model):
    adapter = AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")
    return services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=real_adapter().parts()
    )


@pytest.fixture
def defaults(settings):
    settings.TESSERA_API_REQUESTS_PER_MINUTE = 60
    settings.TESSERA_API_TOKENS_PER_DAY = 200_000


def token_row(page: str, name: str) -> str:
    """The table row of the token named ``name``."""
    match = re.search(rf"<tr>\s*<td>{re.escape(name)}</td>.*?</tr>", page, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


def cell(row: str, css_class: str) -> str:
    match = re.search(rf'<td class="{css_class}"[^>]*>(.*?)</td>', row, re.S)
    assert match, css_class
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", match.group(1))).strip()


# --- the tokens page ----------------------------------------------------------------------


def test_the_tokens_page_shows_each_keys_limits_and_last_30_days_of_usage(
    owner_client, contributor, defaults
):
    busy, _ = services.api_token_create(user=contributor, name="busy", requests_per_minute=10)
    services.api_token_create(user=contributor, name="idle")
    today = utc_today()
    for days_ago, requests in ((0, 4), (29, 2), (30, 1000)):
        KeyUsageDaily.objects.create(
            day=today.fromordinal(today.toordinal() - days_ago),
            user=contributor,
            api_token=busy,
            requests=requests,
            prompt_tokens=100 * requests,
            completion_tokens=10 * requests,
        )

    page = text(owner_client.get(reverse("routing:tokens")))
    busy_row = token_row(page, "busy")
    assert cell(busy_row, "token-requests") == "6"  # the row 30 days ago is outside
    assert cell(busy_row, "token-tokens") == "660"
    assert cell(busy_row, "token-limits") == "10 requests/min 200000 tokens/day (default)"
    idle_row = token_row(page, "idle")
    assert cell(idle_row, "token-requests") == "0"
    assert cell(idle_row, "token-limits") == (
        "60 requests/min (default) 200000 tokens/day (default)"
    )
    assert "Requests (30 days)" in page


def test_the_tokens_page_says_when_there_is_no_daily_quota(owner_client, contributor, settings):
    settings.TESSERA_API_TOKENS_PER_DAY = 0
    services.api_token_create(user=contributor, name="ci")
    row = token_row(text(owner_client.get(reverse("routing:tokens"))), "ci")
    assert "no daily quota (default)" in cell(row, "token-limits")


def test_a_contributor_creates_a_key_with_lower_limits(owner_client, contributor, defaults):
    response = owner_client.post(
        reverse("routing:tokens"),
        {"name": "cron", "requests_per_minute": "5", "tokens_per_day": "1000"},
    )
    assert response.status_code == 200
    token = ApiToken.objects.get(user=contributor)
    assert (token.requests_per_minute, token.tokens_per_day) == (5, 1000)
    assert "5 requests/min" in cell(token_row(text(response), "cron"), "token-limits")


def test_empty_limits_follow_the_default(owner_client, contributor, defaults):
    owner_client.post(
        reverse("routing:tokens"), {"name": "ci", "requests_per_minute": "", "tokens_per_day": ""}
    )
    token = ApiToken.objects.get(user=contributor)
    assert (token.requests_per_minute, token.tokens_per_day) == (None, None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("requests_per_minute", "61", "at most 60, the deployment&#x27;s default"),
        ("requests_per_minute", "0", "greater than or equal to 1"),
        ("requests_per_minute", "-3", "greater than or equal to 1"),
        ("requests_per_minute", "many", "Enter a whole number"),
        ("tokens_per_day", "200001", "at most 200000, the deployment&#x27;s default"),
        ("tokens_per_day", "0", "greater than or equal to 1"),
    ],
)
def test_an_out_of_range_limit_is_a_form_error_and_creates_nothing(
    owner_client, defaults, field, value, message
):
    response = owner_client.post(reverse("routing:tokens"), {"name": "ci", field: value})
    assert response.status_code == 400
    page = text(response)
    # The error is shown next to its field, not only above the form.
    error = re.search(rf'<ul class="errorlist" id="id_{field}_error">(.*?)</ul>', page, re.S)
    assert error, page
    assert message in error.group(1)
    assert not ApiToken.objects.exists()
    assert "shown this once" not in page


def test_a_maintainer_may_give_a_key_more_than_the_default(maintainer_client, maintainer, defaults):
    response = maintainer_client.post(
        reverse("routing:tokens"),
        {"name": "load test", "requests_per_minute": "600", "tokens_per_day": "5000000"},
    )
    assert response.status_code == 200
    token = ApiToken.objects.get(user=maintainer)
    assert (token.requests_per_minute, token.tokens_per_day) == (600, 5_000_000)
    refused = maintainer_client.post(
        reverse("routing:tokens"), {"name": "too much", "requests_per_minute": "10001"}
    )
    assert refused.status_code == 400
    assert "at most 10000" in text(refused)
    assert ApiToken.objects.filter(user=maintainer).count() == 1


def test_the_form_explains_the_defaults(owner_client, settings):
    settings.TESSERA_API_REQUESTS_PER_MINUTE = 30
    settings.TESSERA_API_TOKENS_PER_DAY = 1234
    page = text(owner_client.get(reverse("routing:tokens")))
    assert "the default, 30 a minute" in page
    assert "the default, 1,234 prompt and completion tokens a UTC day" in page


def test_the_service_refuses_a_limit_above_the_default_for_a_contributor(contributor, defaults):
    with pytest.raises(DomainError) as refused:
        services.api_token_create(user=contributor, name="ci", requests_per_minute=61)
    assert refused.value.code == "requests_per_minute_too_high"
    with pytest.raises(DomainError) as refused:
        services.api_token_create(user=contributor, name="ci", tokens_per_day=200_001)
    assert refused.value.code == "tokens_per_day_too_high"
    assert not ApiToken.objects.exists()


def test_any_quota_is_lower_than_no_quota(contributor, settings):
    settings.TESSERA_API_TOKENS_PER_DAY = 0
    token, _ = services.api_token_create(user=contributor, name="ci", tokens_per_day=10**9)
    assert token.tokens_per_day == 10**9


def test_a_revoked_key_keeps_its_limits_and_usage_on_the_page(owner_client, contributor):
    token, _ = services.api_token_create(user=contributor, name="old", requests_per_minute=3)
    KeyUsageDaily.objects.create(day=utc_today(), user=contributor, api_token=token, requests=9)
    services.api_token_revoke(token=token, actor=contributor)
    row = token_row(text(owner_client.get(reverse("routing:tokens"))), "old")
    assert "revoked" in row
    assert cell(row, "token-requests") == "9"
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None


# --- the database's guard -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"requests_per_minute": 0},
        {"requests_per_minute": 10_001},
        {"tokens_per_day": 0},
    ],
)
def test_the_database_refuses_impossible_limits(contributor, fields):
    token, _ = services.api_token_create(user=contributor, name="ci")
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiToken.objects.filter(pk=token.pk).update(**fields)
    token.refresh_from_db()
    assert (token.requests_per_minute, token.tokens_per_day) == (None, None)


@pytest.mark.parametrize("fields", [{"requests_per_minute": -1}, {"tokens_per_day": -5}])
def test_the_database_refuses_negative_limits(contributor, fields):
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiToken.objects.create(user=contributor, name="ci", prefix="p1", key_hash="x", **fields)
    assert not ApiToken.objects.exists()


# --- the adapter page's usage panel -------------------------------------------------------


def test_the_adapter_page_shows_requests_and_tokens_per_day(
    owner_client, maintainer_client, version
):
    today = utc_today()
    AdapterUsageDaily.objects.create(
        day=today, adapter_version=version, requests=12, prompt_tokens=340, completion_tokens=56
    )
    AdapterUsageDaily.objects.create(
        day=today.fromordinal(today.toordinal() - 14), adapter_version=version, requests=999
    )
    url = reverse("portal:adapter-detail", args=[version.adapter_id])
    for client in (owner_client, maintainer_client):
        page = text(client.get(url))
        panel = page[page.index('id="usage-heading"') :]
        assert "12 requests and 396 tokens served" in panel
        assert f'<time datetime="{today:%Y-%m-%d}">' in panel
        row = re.search(rf'datetime="{today:%Y-%m-%d}".*?</tr>', panel, re.S).group(0)
        assert re.findall(r"<td>(?:<meter[^>]*></meter> )?(\d+)</td>", row) == ["12", "340", "56"]
        assert "999" not in panel  # 14 days ago is outside the last 14 days


def test_an_unused_adapter_says_so(owner_client, version):
    page = text(owner_client.get(reverse("portal:adapter-detail", args=[version.adapter_id])))
    assert "Not served through the inference API in the last 14 days." in page


# --- admin --------------------------------------------------------------------------------


@pytest.fixture
def superuser_client(db):
    superuser = get_user_model().objects.create_superuser("root", "root@example.org", "pw")
    return client_for(superuser)


@pytest.mark.parametrize("model", ["keyusagedaily", "adapterusagedaily"])
def test_usage_admin_lists_rows_read_only(superuser_client, contributor, version, model):
    token, _ = services.api_token_create(user=contributor, name="ci")
    key_row = KeyUsageDaily.objects.create(
        day=utc_today(), user=contributor, api_token=token, requests=31
    )
    adapter_row = AdapterUsageDaily.objects.create(
        day=utc_today(), adapter_version=version, requests=47
    )
    row = key_row if model == "keyusagedaily" else adapter_row
    changelist = superuser_client.get(f"/admin/routing/{model}/")
    assert changelist.status_code == 200
    assert str(row.requests) in text(changelist)
    assert token.key_hash not in text(changelist)
    assert superuser_client.get(f"/admin/routing/{model}/add/").status_code == 403
    response = superuser_client.post(f"/admin/routing/{model}/{row.pk}/change/", {"requests": 1})
    assert response.status_code == 403
    row.refresh_from_db()
    assert row.requests in (31, 47)


# --- how many keys a user may hold ---------------------------------------------------------


def test_the_tokens_page_refuses_a_key_past_the_live_key_limit(owner_client, contributor, settings):
    settings.TESSERA_API_KEYS_PER_USER = 2
    for name in ("laptop", "ci"):
        assert owner_client.post(reverse("routing:tokens"), {"name": name}).status_code == 200
    refused = owner_client.post(reverse("routing:tokens"), {"name": "third"})
    assert refused.status_code == 409
    page = text(refused)
    assert "api_key_limit_reached" in page
    assert "the most allowed is 2" in page
    assert "shown this once" not in page
    assert list(ApiToken.objects.filter(user=contributor).values_list("name", flat=True)) == [
        "ci",
        "laptop",
    ]


def test_a_revoked_key_frees_its_place(owner_client, contributor, settings):
    settings.TESSERA_API_KEYS_PER_USER = 1
    token, _ = services.api_token_create(user=contributor, name="old")
    with pytest.raises(DomainError) as refused:
        services.api_token_create(user=contributor, name="new")
    assert (refused.value.code, refused.value.kind) == ("api_key_limit_reached", "conflict")
    owner_client.post(reverse("routing:token-revoke", args=[token.pk]))
    response = owner_client.post(reverse("routing:tokens"), {"name": "new"})
    assert response.status_code == 200
    assert ApiToken.objects.filter(user=contributor, revoked_at__isnull=True).get().name == "new"


def test_the_key_limit_is_per_user(contributor, other_contributor, settings):
    settings.TESSERA_API_KEYS_PER_USER = 1
    services.api_token_create(user=contributor, name="mine")
    services.api_token_create(user=other_contributor, name="theirs")
    assert ApiToken.objects.count() == 2


def test_the_tokens_page_shows_what_is_left_of_the_users_daily_tokens(
    owner_client, contributor, settings, api_redis_db
):
    from routing import usage

    settings.TESSERA_API_KEYS_PER_USER = 4
    settings.TESSERA_API_USER_TOKENS_PER_DAY = 1000
    token, _ = services.api_token_create(user=contributor, name="ci")
    usage.usage_record_sync(
        token_id=token.pk,
        user_id=contributor.pk,
        version_ids=[],
        prompt_tokens=300,
        completion_tokens=50,
    )
    page = re.sub(r"\s+", " ", text(owner_client.get(reverse("routing:tokens"))))
    assert "You may hold 4 live keys" in page
    assert "share 1000 tokens a UTC day; 650 are left today" in page
