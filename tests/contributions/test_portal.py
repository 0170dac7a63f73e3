"""The server-rendered portal, through Django's test client.

Personas: anonymous, the owner (``contributor``), another contributor and a maintainer;
every page is checked for each. Uploads are real PEFT adapters for the tiny base model
(tests.support.crafted), validated by the real intake and stored by the real services.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from contributions import services
from contributions.models import Adapter, AdapterVersion, ApiToken, AuditEvent, Contributor
from tests.conftest import media_files
from tests.factories import PASSWORD, AdapterFactory, UserFactory
from tests.support.crafted import mutated_config, real_adapter, tar_gz_bytes, zip_bytes

pytestmark = pytest.mark.django_db

Status = AdapterVersion.Status


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def adapter(contributor):
    return AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")


@pytest.fixture
def other_adapter(other_contributor):
    return AdapterFactory(owner=other_contributor, slug="secret-sauce", title="Secret sauce")


@pytest.fixture
def version(adapter, contributor, base_model):
    return services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=real_adapter().parts()
    )


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture
def owner_client(contributor) -> Client:
    return client_for(contributor)


@pytest.fixture
def other_client(other_contributor) -> Client:
    return client_for(other_contributor)


@pytest.fixture
def maintainer_client(maintainer) -> Client:
    return client_for(maintainer)


def file_upload(name: str, data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


def adapter_files(files: dict[str, bytes]) -> dict:
    return {"files": [file_upload(name, data) for name, data in files.items()]}


def adapter_form_data(**overrides) -> dict:
    data = {
        "slug": "sql-helper",
        "title": "SQL helper",
        "description": "Writes SQL.",
        "task_tags": "sql, Code",
        "languages": "en, fr",
        "license": "MIT",
        "intended_use": "Turn questions into SQL.",
        "training_data_summary": "Spider, CC-BY-SA.",
        "example_prompts": "List all users.\n\nCount orders per day.\nFind the top seller.\n",
        "visibility": "public",
    }
    data.update(overrides)
    return data


def text(response) -> str:
    return response.content.decode()


# --- who may see which page ---------------------------------------------------------------

PUBLIC_PAGES = ["portal:home", "portal:rules", "portal:signup", "portal:login"]
LOGIN_PAGES = ["portal:dashboard", "portal:adapter-new", "routing:tokens"]
ADAPTER_PAGES = ["portal:adapter-detail", "portal:adapter-edit", "portal:version-upload"]


@pytest.mark.parametrize("name", PUBLIC_PAGES)
def test_public_pages_load_for_anonymous_visitors(client, base_model, name):
    response = client.get(reverse(name))
    assert response.status_code == 200
    assert "Tessera" in text(response)


def test_home_invites_anonymous_visitors_to_sign_up_and_shows_the_base_model(client, base_model):
    page = text(client.get(reverse("portal:home")))
    assert reverse("portal:signup") in page
    assert "tiny-llama" in page
    assert "q_proj" in page


def test_home_works_before_a_base_model_exists(client):
    response = client.get(reverse("portal:home"))
    assert response.status_code == 200
    assert "No base model is configured yet" in text(response)


@pytest.mark.parametrize("name", LOGIN_PAGES)
def test_private_pages_send_anonymous_visitors_to_login(client, name):
    url = reverse(name)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('portal:login')}?next={url}"


@pytest.mark.parametrize("name", ADAPTER_PAGES)
def test_adapter_pages_send_anonymous_visitors_to_login(client, adapter, name):
    response = client.get(reverse(name, args=[adapter.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("portal:login"))


def test_post_only_endpoints_send_anonymous_visitors_to_login(client, version, contributor):
    token, _ = services.api_token_create(user=contributor, name="ci")
    for url in (
        reverse("portal:version-withdraw", args=[version.adapter_id, 1]),
        reverse("routing:token-revoke", args=[token.pk]),
    ):
        response = client.post(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("portal:login"))
    version.refresh_from_db()
    token.refresh_from_db()
    assert version.status == Status.QUEUED
    assert token.revoked_at is None


@pytest.mark.parametrize("name", [*LOGIN_PAGES])
def test_private_pages_load_for_a_signed_in_contributor(owner_client, base_model, name):
    assert owner_client.get(reverse(name)).status_code == 200


@pytest.mark.parametrize("name", ADAPTER_PAGES)
def test_the_owner_sees_every_page_of_their_adapter(owner_client, version, name):
    response = owner_client.get(reverse(name, args=[version.adapter_id]))
    assert response.status_code == 200
    assert "Three-digit adder" in text(response)


@pytest.mark.parametrize("name", ADAPTER_PAGES)
def test_someone_elses_adapter_is_a_404_for_another_contributor(other_client, version, name):
    response = other_client.get(reverse(name, args=[version.adapter_id]))
    assert response.status_code == 404
    assert "Three-digit adder" not in text(response)


def test_another_contributor_cannot_withdraw_upload_or_edit(other_client, version, base_model):
    adapter_id = version.adapter_id
    withdraw = other_client.post(reverse("portal:version-withdraw", args=[adapter_id, 1]))
    upload = other_client.post(
        reverse("portal:version-upload", args=[adapter_id]),
        adapter_files(real_adapter(rank=8).files()),
    )
    edit = other_client.post(
        reverse("portal:adapter-edit", args=[adapter_id]), adapter_form_data(title="Mine now")
    )
    assert (withdraw.status_code, upload.status_code, edit.status_code) == (404, 404, 404)
    version.refresh_from_db()
    assert version.status == Status.QUEUED
    assert AdapterVersion.objects.count() == 1
    assert Adapter.objects.get(pk=adapter_id).title == "Three-digit adder"


def test_a_maintainer_may_view_any_adapter_but_not_change_it(maintainer_client, version):
    adapter_id = version.adapter_id
    detail = maintainer_client.get(reverse("portal:adapter-detail", args=[adapter_id]))
    assert detail.status_code == 200
    assert "Three-digit adder" in text(detail)
    # No buttons that would only end in a 403.
    assert reverse("portal:version-upload", args=[adapter_id]) not in text(detail)
    assert reverse("portal:version-withdraw", args=[adapter_id, 1]) not in text(detail)

    for name in ("portal:adapter-edit", "portal:version-upload"):
        assert maintainer_client.get(reverse(name, args=[adapter_id])).status_code == 403
    withdraw = maintainer_client.post(reverse("portal:version-withdraw", args=[adapter_id, 1]))
    edit = maintainer_client.post(
        reverse("portal:adapter-edit", args=[adapter_id]), adapter_form_data(title="Mine now")
    )
    assert (withdraw.status_code, edit.status_code) == (403, 403)
    version.refresh_from_db()
    assert version.status == Status.QUEUED
    assert Adapter.objects.get(pk=adapter_id).title == "Three-digit adder"


def test_a_missing_adapter_is_a_404(owner_client):
    assert owner_client.get(reverse("portal:adapter-detail", args=[999999])).status_code == 404


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_lists_my_adapters_with_their_latest_status(owner_client, version):
    AdapterFactory(owner=version.adapter.owner, slug="empty-one", title="Nothing uploaded")
    page = text(owner_client.get(reverse("portal:dashboard")))
    assert "Three-digit adder" in page
    assert "v1" in page
    assert "status-queued" in page
    assert "Nothing uploaded" in page
    assert "none yet" in page


def test_dashboard_never_shows_other_contributors_adapters(owner_client, adapter, other_adapter):
    page = text(owner_client.get(reverse("portal:dashboard")))
    assert "Three-digit adder" in page
    assert "Secret sauce" not in page
    assert "All adapters" not in page


def test_maintainer_dashboard_lists_every_adapter_with_its_owner(
    maintainer_client, adapter, other_adapter
):
    page = text(maintainer_client.get(reverse("portal:dashboard")))
    assert "All adapters" in page
    assert "Three-digit adder" in page
    assert "Secret sauce" in page
    assert ">owner<" in page
    assert ">other<" in page


# --- sign up, log in, log out -------------------------------------------------------------


def signup_data(**overrides) -> dict:
    data = {
        "username": "newbie",
        "email": "newbie@example.org",
        "display_name": "New Bie",
        "affiliation": "Garage Lab",
        "is_public": "on",
        "password1": "a long enough passphrase 42",
        "password2": "a long enough passphrase 42",
    }
    data.update(overrides)
    return data


def test_sign_up_creates_the_user_and_profile_and_logs_them_in(client):
    response = client.post(reverse("portal:signup"), signup_data())
    assert response.status_code == 302
    assert response["Location"] == reverse("portal:dashboard")
    contributor = Contributor.objects.get(user__username="newbie")
    assert contributor.display_name == "New Bie"
    assert contributor.affiliation == "Garage Lab"
    assert contributor.is_public is True
    assert contributor.user.check_password("a long enough passphrase 42")
    dashboard = client.get(reverse("portal:dashboard"))
    assert dashboard.status_code == 200
    assert "Signed in as <strong>newbie</strong>" in text(dashboard)


def test_sign_up_without_the_public_checkbox_makes_a_private_profile(client):
    data = signup_data()
    del data["is_public"]
    client.post(reverse("portal:signup"), data)
    assert Contributor.objects.get(user__username="newbie").is_public is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"password2": "something else entirely"}, "The two passwords differ."),
        ({"password1": "short", "password2": "short"}, "too short"),
        ({"username": "owner"}, "username_taken"),
        ({"email": "not-an-email"}, "valid email"),
    ],
)
def test_sign_up_refuses_bad_input_and_creates_nothing(client, contributor, overrides, message):
    users_before = get_user_model().objects.count()
    response = client.post(reverse("portal:signup"), signup_data(**overrides))
    assert response.status_code in (400, 409)
    assert message in text(response)
    assert get_user_model().objects.count() == users_before
    assert "_auth_user_id" not in client.session


def test_login_and_logout_by_post(client, contributor):
    response = client.post(reverse("portal:login"), {"username": "owner", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("portal:dashboard")
    page = text(client.get(reverse("portal:dashboard")))
    assert f'action="{reverse("portal:logout")}"' in page
    assert client.post(reverse("portal:logout")).status_code == 302
    assert client.get(reverse("portal:dashboard")).status_code == 302


def test_every_post_form_requires_a_csrf_token(contributor, adapter):
    client = Client(enforce_csrf_checks=True)
    client.force_login(contributor)
    for url in (
        reverse("portal:adapter-new"),
        reverse("portal:adapter-edit", args=[adapter.pk]),
        reverse("portal:version-upload", args=[adapter.pk]),
        reverse("routing:tokens"),
        reverse("portal:logout"),
    ):
        assert client.post(url, {}).status_code == 403, url
    assert Adapter.objects.count() == 1
    assert not ApiToken.objects.exists()


# --- adapters -----------------------------------------------------------------------------


def test_creating_an_adapter_stores_it_and_leads_to_the_upload_page(owner_client, contributor):
    response = owner_client.post(reverse("portal:adapter-new"), adapter_form_data())
    adapter = Adapter.objects.get(owner=contributor, slug="sql-helper")
    assert response.status_code == 302
    assert response["Location"] == reverse("portal:version-upload", args=[adapter.pk])
    assert adapter.task_tags == ["sql", "code"]
    assert adapter.languages == ["en", "fr"]
    assert adapter.example_prompts == [
        "List all users.",
        "Count orders per day.",
        "Find the top seller.",
    ]
    assert adapter.license == "MIT"
    assert AuditEvent.objects.filter(adapter=adapter, action="adapter.created").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"example_prompts": "One.\nTwo.\n\n"}, "at least 3 different example prompts"),
        ({"example_prompts": "Same.\nSame.\nSame.\nOther."}, "you gave 2"),
        ({"example_prompts": "\n".join(f"Prompt {i}" for i in range(51))}, "At most 50"),
        ({"slug": "Bad Slug!"}, "lowercase letters, digits and hyphens"),
        ({"slug": "-leading"}, "lowercase letters, digits and hyphens"),
        ({"license": "WTFPL"}, "Select a valid choice"),
        ({"intended_use": ""}, "This field is required"),
    ],
)
def test_creating_an_adapter_refuses_bad_input_and_stores_nothing(owner_client, overrides, message):
    response = owner_client.post(reverse("portal:adapter-new"), adapter_form_data(**overrides))
    assert response.status_code == 400
    assert message in text(response)
    assert not Adapter.objects.exists()


def test_creating_an_adapter_with_a_slug_i_already_use_is_refused(owner_client, adapter):
    response = owner_client.post(reverse("portal:adapter-new"), adapter_form_data(slug="adder"))
    assert response.status_code == 409
    assert "slug_taken" in text(response)
    assert "You already have an adapter named" in text(response)
    assert Adapter.objects.count() == 1


def test_another_contributor_may_reuse_my_slug(other_client, adapter, other_contributor):
    response = other_client.post(reverse("portal:adapter-new"), adapter_form_data(slug="adder"))
    assert response.status_code == 302
    assert Adapter.objects.filter(slug="adder").count() == 2


def test_editing_an_adapter_changes_its_metadata_and_records_it(owner_client, adapter):
    url = reverse("portal:adapter-edit", args=[adapter.pk])
    form = text(owner_client.get(url))
    assert "What is 123 + 456?" in form  # prompts prefilled, one a line
    assert 'name="slug"' not in form  # the slug never changes
    response = owner_client.post(
        url, adapter_form_data(title="Adder, improved", visibility="private")
    )
    assert response.status_code == 302
    adapter.refresh_from_db()
    assert adapter.title == "Adder, improved"
    assert adapter.visibility == "private"
    assert adapter.slug == "adder"
    event = AuditEvent.objects.get(adapter=adapter, action="adapter.updated")
    assert "title" in event.reason


def test_editing_refuses_too_few_prompts_and_changes_nothing(owner_client, adapter):
    response = owner_client.post(
        reverse("portal:adapter-edit", args=[adapter.pk]),
        adapter_form_data(title="Changed", example_prompts="only one"),
    )
    assert response.status_code == 400
    adapter.refresh_from_db()
    assert adapter.title == "Three-digit adder"


# --- uploads ------------------------------------------------------------------------------


def test_uploading_the_two_files_creates_a_validated_version(
    owner_client, adapter, base_model, media_root
):
    url = reverse("portal:version-upload", args=[adapter.pk])
    response = owner_client.post(url, adapter_files(real_adapter().files()), follow=True)
    assert response.redirect_chain == [(reverse("portal:adapter-detail", args=[adapter.pk]), 302)]
    version = AdapterVersion.objects.get(adapter=adapter)
    assert version.status == Status.QUEUED
    page = text(response)
    assert "Version 1 uploaded: status queued" in page
    assert "status-queued" in page
    assert version.weights_sha256[:12] in page
    assert "q_proj" in page and "v_proj" in page
    # The audit trail: uploaded by the owner, then validated by the system.
    assert "uploaded → validated" in page
    assert "Intake checks passed" in page
    assert len(media_files(media_root)) == 2


def test_uploading_a_zip_with_a_model_card_creates_a_validated_version(
    owner_client, adapter, base_model, media_root
):
    archive = zip_bytes(real_adapter(rank=8).files(card=True))
    response = owner_client.post(
        reverse("portal:version-upload", args=[adapter.pk]),
        adapter_files({"adapter.zip": archive}),
        follow=True,
    )
    version = AdapterVersion.objects.get(adapter=adapter)
    assert (version.status, version.rank) == (Status.QUEUED, 8)
    assert version.card_sha256
    assert "status queued" in text(response)
    assert len(media_files(media_root)) == 3


def test_uploading_a_tar_gz_creates_the_next_version(owner_client, version, media_root):
    archive = tar_gz_bytes(real_adapter("float16").files())
    response = owner_client.post(
        reverse("portal:version-upload", args=[version.adapter_id]),
        adapter_files({"adapter.tar.gz": archive}),
        follow=True,
    )
    assert "Version 2 uploaded: status queued" in text(response)
    assert AdapterVersion.objects.get(adapter_id=version.adapter_id, number=2).dtype == "float16"


def _bad_config() -> bytes:
    return mutated_config(
        real_adapter().config, {"auto_mapping": {"parent_library": "os", "base_model_class": "x"}}
    )


BAD_UPLOADS = {
    "pickle": (
        lambda: {"adapter_config.json": real_adapter().config, "adapter_model.bin": b"\x80\x04."},
        "upload_pickle_refused",
    ),
    "config that imports code": (
        lambda: {
            "adapter_config.json": _bad_config(),
            "adapter_model.safetensors": real_adapter().weights,
        },
        "config_forbidden_key",
    ),
    "config that is not JSON": (
        lambda: {
            "adapter_config.json": b"{not json",
            "adapter_model.safetensors": real_adapter().weights,
        },
        "config_invalid_json",
    ),
    "weights missing": (
        lambda: {"adapter_config.json": real_adapter().config},
        "upload_missing_file",
    ),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_a_refused_upload_shows_its_code_with_400_and_stores_nothing(
    owner_client, adapter, base_model, media_root, case
):
    files, code = BAD_UPLOADS[case]
    response = owner_client.post(
        reverse("portal:version-upload", args=[adapter.pk]), adapter_files(files())
    )
    assert response.status_code == 400
    page = text(response)
    assert re.search(rf'Refused \(<code class="error-code">{code}</code>\):', page)
    assert "Nothing was stored" in page
    assert 'enctype="multipart/form-data"' in page  # the form is there to try again
    assert not AdapterVersion.objects.exists()
    assert media_files(media_root) == []


def test_a_rank_over_the_cap_is_refused_by_its_code(owner_client, adapter, base_model, settings):
    settings.TESSERA_MAX_LORA_RANK = 2
    response = owner_client.post(
        reverse("portal:version-upload", args=[adapter.pk]), adapter_files(real_adapter().files())
    )
    assert response.status_code == 400
    assert "config_rank_out_of_range" in text(response)
    assert not AdapterVersion.objects.exists()


def test_uploading_identical_weights_again_is_a_409_duplicate(owner_client, version, media_root):
    files_before = sorted(media_files(media_root))
    response = owner_client.post(
        reverse("portal:version-upload", args=[version.adapter_id]),
        adapter_files(real_adapter().files()),
    )
    assert response.status_code == 409
    assert "duplicate_upload" in text(response)
    assert AdapterVersion.objects.count() == 1
    assert sorted(media_files(media_root)) == files_before


def test_uploading_no_file_is_a_400_form_error(owner_client, adapter, base_model):
    response = owner_client.post(reverse("portal:version-upload", args=[adapter.pk]), {})
    assert response.status_code == 400
    assert "This field is required" in text(response)


@pytest.mark.parametrize(
    "size",
    [2048, 300 * 1024],
    ids=["cut off while streaming", "refused by Content-Length unread"],
)
def test_an_upload_over_the_size_cap_is_a_413_even_with_csrf_enforced(
    contributor, adapter, base_model, settings, media_root, size
):
    settings.TESSERA_MAX_UPLOAD_BYTES = 1024
    client = Client(enforce_csrf_checks=True)
    client.force_login(contributor)
    url = reverse("portal:version-upload", args=[adapter.pk])
    client.get(url)
    data = {"csrfmiddlewaretoken": client.cookies["csrftoken"].value}
    data["files"] = [file_upload("adapter_model.safetensors", b"\0" * size)]
    response = client.post(url, data)
    assert response.status_code == 413
    assert "upload_too_large" in text(response)
    assert not AdapterVersion.objects.exists()
    assert media_files(media_root) == []


def test_the_size_cap_answer_still_checks_who_is_asking(other_client, adapter, settings):
    settings.TESSERA_MAX_UPLOAD_BYTES = 1024
    response = other_client.post(
        reverse("portal:version-upload", args=[adapter.pk]),
        {"files": [file_upload("big.zip", b"\0" * 4096)]},
    )
    assert response.status_code == 404


# --- withdrawing --------------------------------------------------------------------------


def test_withdrawing_a_version_records_the_reason_and_shows_it(owner_client, version):
    url = reverse("portal:version-withdraw", args=[version.adapter_id, 1])
    response = owner_client.post(url, {"reason": "Found a data leak."}, follow=True)
    version.refresh_from_db()
    assert version.status == Status.WITHDRAWN
    event = AuditEvent.objects.get(version=version, to_status=Status.WITHDRAWN)
    assert event.reason == "Found a data leak."
    assert event.actor == version.adapter.owner
    page = text(response)
    assert "Version 1 withdrawn" in page
    assert "queued → withdrawn" in page
    assert "Found a data leak." in page
    assert url not in page  # no withdraw button for a withdrawn version


def test_withdrawing_twice_says_so_and_changes_nothing(owner_client, version):
    url = reverse("portal:version-withdraw", args=[version.adapter_id, 1])
    owner_client.post(url)
    response = owner_client.post(url, follow=True)
    assert "already_withdrawn" in text(response)
    assert AuditEvent.objects.filter(version=version, to_status=Status.WITHDRAWN).count() == 1


def test_withdraw_is_post_only_and_a_missing_version_is_a_404(owner_client, version):
    adapter_id = version.adapter_id
    get = owner_client.get(reverse("portal:version-withdraw", args=[adapter_id, 1]))
    missing = owner_client.post(reverse("portal:version-withdraw", args=[adapter_id, 7]))
    assert (get.status_code, missing.status_code) == (405, 404)


# --- API tokens ---------------------------------------------------------------------------


def test_a_new_token_key_is_shown_once_and_only_its_hash_is_stored(owner_client, contributor):
    response = owner_client.post(reverse("routing:tokens"), {"name": "laptop CLI"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    page = text(response)
    key = re.search(r'value="(tsr_[0-9a-f]+_[A-Za-z0-9_-]+)"', page).group(1)
    assert "shown this once" in page
    assert f'curl -H "Authorization: Bearer {key}" http://testserver/api/v1/me/' in page
    # ...and how to reach the inference API with it.
    assert f'OpenAI(base_url="http://localhost:8001/v1", api_key="{key}")' in page

    token = ApiToken.objects.get(user=contributor)
    _, prefix, secret = key.split("_", 2)
    assert token.prefix == prefix
    assert token.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in token.key_hash and secret not in token.name

    again = text(owner_client.get(reverse("routing:tokens")))
    assert "laptop CLI" in again
    assert f"tsr_{prefix}_…" in again
    assert secret not in again

    me = Client().get("/api/v1/me/", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert me.status_code == 200
    assert me.json()["username"] == "owner"


def test_a_token_needs_a_name(owner_client):
    response = owner_client.post(reverse("routing:tokens"), {"name": "  "})
    assert response.status_code == 400
    assert not ApiToken.objects.exists()


def test_revoking_a_token_stops_it_working(owner_client, contributor):
    token, key = services.api_token_create(user=contributor, name="ci")
    response = owner_client.post(reverse("routing:token-revoke", args=[token.pk]), follow=True)
    token.refresh_from_db()
    assert token.revoked_at is not None
    page = text(response)
    assert "revoked" in page
    assert reverse("routing:token-revoke", args=[token.pk]) not in page
    assert Client().get("/api/v1/me/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401


def test_the_token_page_never_lists_someone_elses_tokens(other_client, contributor):
    services.api_token_create(user=contributor, name="owner's secret job")
    page = text(other_client.get(reverse("routing:tokens")))
    assert "owner&#x27;s secret job" not in page
    assert "You have no tokens yet" in page


def test_someone_elses_token_cannot_be_revoked(other_client, maintainer_client, contributor):
    token, _ = services.api_token_create(user=contributor, name="ci")
    url = reverse("routing:token-revoke", args=[token.pk])
    assert other_client.post(url).status_code == 404
    assert maintainer_client.post(url).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


# --- rules and navigation -----------------------------------------------------------------


def test_rules_page_lists_limits_targets_and_licenses(client, base_model, settings):
    settings.TESSERA_MAX_LORA_RANK = 32
    page = text(client.get(reverse("portal:rules")))
    assert "<dd>32</dd>" in page
    assert "at most 1024, and <code>lora_alpha / r</code> between 0.0078 and 64" in page
    assert "<dd>0 to 0.5</dd>" in page
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"<code>{module}</code>" in page
    assert "Apache-2.0" in page and "OpenRAIL-M" in page
    assert "adapter_config.json" in page and ".pt" in page


def test_nav_links_admin_only_for_staff(owner_client):
    assert "/admin/" not in text(owner_client.get(reverse("portal:home")))
    staff = UserFactory(username="staffer", is_staff=True)
    assert "/admin/" in text(client_for(staff).get(reverse("portal:home")))


# --- admin --------------------------------------------------------------------------------


@pytest.fixture
def admin_client_(db) -> Client:
    superuser = get_user_model().objects.create_superuser("root", "root@example.org", "pw")
    return client_for(superuser)


ADMIN_MODELS = ["basemodel", "contributor", "adapter", "adapterversion", "auditevent", "apitoken"]


@pytest.mark.parametrize("model", ADMIN_MODELS)
def test_admin_changelists_load_for_a_superuser(admin_client_, version, contributor, model):
    services.api_token_create(user=contributor, name="ci")
    url = f"/admin/contributions/{model}/"
    assert admin_client_.get(url).status_code == 200


def test_admin_shows_versions_read_only_so_status_cannot_be_edited(admin_client_, version):
    page = text(admin_client_.get(f"/admin/contributions/adapter/{version.adapter_id}/change/"))
    assert "validated" in page
    assert version.weights_sha256 in page
    assert 'name="versions-0-status"' not in page
    assert "<select" not in page
    response = admin_client_.post(
        f"/admin/contributions/adapter/{version.adapter_id}/change/",
        {"versions-0-status": "admitted"},
    )
    assert response.status_code == 403
    version.refresh_from_db()
    assert version.status == Status.QUEUED


def test_admin_token_list_shows_the_prefix_never_the_hash(admin_client_, contributor):
    token, _ = services.api_token_create(user=contributor, name="ci")
    for url in (
        "/admin/contributions/apitoken/",
        f"/admin/contributions/apitoken/{token.pk}/change/",
    ):
        page = text(admin_client_.get(url))
        assert f"tsr_{token.prefix}_…" in page
        assert token.key_hash not in page


def test_a_maintainer_changes_a_keys_limits_in_the_admin_and_nothing_else(contributor):
    maintainer = UserFactory()
    services.maintainer_grant(user=maintainer)
    token, _ = services.api_token_create(user=contributor, name="ci")
    url = f"/admin/contributions/apitoken/{token.pk}/change/"
    client = client_for(maintainer)
    response = client.post(
        url, {"requests_per_minute": "5", "tokens_per_day": "1000", "name": "renamed"}
    )
    assert response.status_code == 302, text(response)
    token.refresh_from_db()
    assert (token.requests_per_minute, token.tokens_per_day) == (5, 1000)
    assert token.name == "ci"  # read-only fields ignore what is posted
    refused = client.post(url, {"requests_per_minute": "0", "tokens_per_day": ""})
    assert refused.status_code == 200  # the form again, with the error
    token.refresh_from_db()
    assert token.requests_per_minute == 5
    assert client.get("/admin/contributions/apitoken/add/").status_code == 403


def test_admin_filters_audit_events(admin_client_, version):
    response = admin_client_.get("/admin/contributions/auditevent/?to_status=validated")
    assert response.status_code == 200
    assert "version.validated" in text(response)
