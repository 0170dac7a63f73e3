"""The contributions REST API, with owner / other contributor / maintainer / anonymous
personas on every endpoint, real intake and real files."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from contributions import services
from contributions.models import Adapter, AdapterVersion, ApiToken, AuditEvent
from tests.conftest import media_files
from tests.factories import AdapterFactory, BaseModelFactory
from tests.support import crafted

pytestmark = pytest.mark.django_db

ADAPTER_INPUT = {
    "slug": "three-digit-addition",
    "title": "Three-digit addition",
    "license": "Apache-2.0",
    "task_tags": ["Arithmetic", "math"],
    "languages": ["en"],
    "intended_use": "Answer sums of two three-digit numbers exactly.",
    "training_data_summary": "Synthetic sums from a seeded generator.",
    "example_prompts": ["What is 123 + 456?", "Add 907 and 88.", "Compute 500 + 501."],
}


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        _, key = services.api_token_create(user=user, name="tests")
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def multipart_files(files: dict[str, bytes]) -> dict:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return {"files": [SimpleUploadedFile(name, data) for name, data in files.items()]}


def upload(client: APIClient, adapter: Adapter, files: dict[str, bytes]):
    url = reverse("api:version-list", kwargs={"adapter_id": adapter.pk})
    return client.post(url, multipart_files(files), format="multipart")


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.fixture
def adapter(contributor, base_model):
    return AdapterFactory(owner=contributor, slug="adder")


@pytest.fixture
def version(adapter, contributor):
    return services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=crafted.real_adapter().parts(card=True)
    )


# --- authentication -----------------------------------------------------------------------


ENDPOINTS = [
    ("get", "api:me", {}),
    ("get", "api:adapter-list", {}),
    ("post", "api:adapter-list", {}),
    ("get", "api:adapter-detail", {"adapter_id": 1}),
    ("patch", "api:adapter-detail", {"adapter_id": 1}),
    ("get", "api:version-list", {"adapter_id": 1}),
    ("post", "api:version-list", {"adapter_id": 1}),
    ("get", "api:version-detail", {"adapter_id": 1, "number": 1}),
    ("post", "api:version-withdraw", {"adapter_id": 1, "number": 1}),
    ("get", "api:version-file", {"adapter_id": 1, "number": 1, "name": "README.md"}),
]


@pytest.mark.parametrize(("method", "name", "kwargs"), ENDPOINTS)
def test_anonymous_requests_are_refused_with_401(method, name, kwargs):
    response = getattr(APIClient(), method)(reverse(name, kwargs=kwargs))
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_token_no_longer_authenticates(contributor):
    token, key = services.api_token_create(user=contributor, name="laptop")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get(reverse("api:me")).status_code == 200
    services.api_token_revoke(token=token, actor=contributor)
    assert_error(client.get(reverse("api:me")), 401, "authentication_failed")


@pytest.mark.parametrize(
    "header", ["Bearer tsr_nothing", "Bearer tsr_abcd1234_wrong", "Bearer a b", "Token x"]
)
def test_malformed_or_unknown_tokens_are_refused(contributor, header):
    services.api_token_create(user=contributor, name="laptop")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert_error(client.get(reverse("api:me")), 401, "authentication_failed")


def test_tokens_are_stored_hashed_and_the_key_works_with_either_keyword(contributor):
    token, key = services.api_token_create(user=contributor, name="ci")
    secret = key.split("_", 2)[2]
    assert token.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps(list(ApiToken.objects.values()), default=str)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    body = client.get(reverse("api:me")).json()
    assert body["username"] == "owner"
    assert body["is_maintainer"] is False


def test_me_tells_a_maintainer_apart(maintainer):
    assert client_for(maintainer).get(reverse("api:me")).json()["is_maintainer"] is True


# --- intake rules and schema ---------------------------------------------------------------


def test_intake_rules_are_public_and_describe_the_base_model(base_model):
    body = APIClient().get(reverse("api:intake-rules")).json()
    assert body["base_model"] == "tiny-llama"
    assert body["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert body["max_rank"] == 64
    assert (body["max_alpha"], body["scale_range"], body["max_dropout"]) == (
        1024.0,
        [1 / 128, 64.0],
        0.5,
    )
    assert "Apache-2.0" in body["licenses"]


def test_intake_rules_without_a_base_model_say_so(db):
    assert_error(APIClient().get(reverse("api:intake-rules")), 409, "base_model_missing")


def test_the_openapi_schema_and_docs_are_served(db):
    schema = APIClient().get(reverse("schema"), {"format": "json"})
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/v1/adapters/{adapter_id}/versions/" in paths
    docs = APIClient().get(reverse("api-docs"))
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content


# --- adapters -------------------------------------------------------------------------------


def test_a_contributor_creates_an_adapter(contributor):
    response = client_for(contributor).post(reverse("api:adapter-list"), ADAPTER_INPUT)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["owner"] == "owner"
    assert body["task_tags"] == ["arithmetic", "math"]
    assert body["versions"] == []
    assert [e["action"] for e in body["audit_trail"]] == ["adapter.created"]
    assert Adapter.objects.get().owner == contributor


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"example_prompts": ["one", "two"]}, 400, "invalid_input"),
        ({"example_prompts": ["same", "same", "Same "]}, 400, "example_prompts_too_few"),
        ({"example_prompts": ["p"] * 51}, 400, "invalid_input"),
        ({"slug": "Not A Slug"}, 400, "invalid_input"),
        ({"slug": "-dash"}, 400, "invalid_input"),
        ({"license": "WTFPL"}, 400, "invalid_input"),
        ({"intended_use": ""}, 400, "invalid_input"),
        ({"task_tags": ["x" * 41]}, 400, "task_tags_too_long"),
    ],
)
def test_bad_adapter_metadata_is_refused_and_nothing_is_stored(contributor, change, status, code):
    response = client_for(contributor).post(
        reverse("api:adapter-list"), {**ADAPTER_INPUT, **change}
    )
    assert_error(response, status, code)
    assert not Adapter.objects.exists()
    assert not AuditEvent.objects.exists()


def test_a_taken_slug_is_a_conflict(contributor):
    client = client_for(contributor)
    client.post(reverse("api:adapter-list"), ADAPTER_INPUT)
    assert_error(client.post(reverse("api:adapter-list"), ADAPTER_INPUT), 409, "slug_taken")
    assert Adapter.objects.count() == 1


def test_two_contributors_may_use_the_same_slug(contributor, other_contributor):
    client_for(contributor).post(reverse("api:adapter-list"), ADAPTER_INPUT)
    response = client_for(other_contributor).post(reverse("api:adapter-list"), ADAPTER_INPUT)
    assert response.status_code == 201


def test_lists_show_owners_their_own_and_maintainers_everything(
    contributor, other_contributor, maintainer
):
    mine = AdapterFactory(owner=contributor)
    theirs = AdapterFactory(owner=other_contributor)

    def ids(user):
        return {
            a["id"] for a in client_for(user).get(reverse("api:adapter-list")).json()["results"]
        }

    assert ids(contributor) == {mine.pk}
    assert ids(other_contributor) == {theirs.pk}
    assert ids(maintainer) == {mine.pk, theirs.pk}


def test_adapter_detail_access(adapter, contributor, other_contributor, maintainer):
    url = reverse("api:adapter-detail", kwargs={"adapter_id": adapter.pk})
    assert client_for(contributor).get(url).status_code == 200
    assert_error(client_for(other_contributor).get(url), 404, "not_found")
    assert client_for(maintainer).get(url).json()["slug"] == "adder"


def test_the_owner_edits_metadata_and_the_change_is_audited(adapter, contributor):
    url = reverse("api:adapter-detail", kwargs={"adapter_id": adapter.pk})
    response = client_for(contributor).patch(url, {"title": "Quick adder", "status": "admitted"})
    assert response.status_code == 200
    adapter.refresh_from_db()
    assert adapter.title == "Quick adder"
    assert AuditEvent.objects.filter(action="adapter.updated", reason="title").exists()


def test_others_cannot_edit_an_adapter(adapter, other_contributor, maintainer):
    url = reverse("api:adapter-detail", kwargs={"adapter_id": adapter.pk})
    assert_error(client_for(other_contributor).patch(url, {"title": "Mine"}), 404, "not_found")
    assert_error(client_for(maintainer).patch(url, {"title": "Mine"}), 403, "not_owner")
    adapter.refresh_from_db()
    assert adapter.title != "Mine"


def test_an_invalid_edit_changes_nothing(adapter, contributor):
    url = reverse("api:adapter-detail", kwargs={"adapter_id": adapter.pk})
    response = client_for(contributor).patch(url, {"license": "nope"})
    assert_error(response, 400, "invalid_input")
    adapter.refresh_from_db()
    assert adapter.license == "Apache-2.0"


# --- uploads ---------------------------------------------------------------------------------


def test_an_upload_of_two_files_is_stored_validated_and_queued(adapter, contributor, media_root):
    files = crafted.real_adapter().files(card=True)
    response = upload(client_for(contributor), adapter, files)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["number"] == 1
    # Validated by intake, then queued for evaluation in the same transaction.
    assert body["status"] == "queued"
    assert body["rank"] == 4
    assert body["target_modules"] == ["q_proj", "v_proj"]
    assert body["weights_sha256"] == hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    assert [(e["action"], e["to_status"]) for e in body["audit_trail"]] == [
        ("version.uploaded", "uploaded"),
        ("version.validated", "validated"),
        ("version.queued", "queued"),
    ]
    stored = {p.name: p.read_bytes() for p in media_files(media_root)}
    assert stored == files


def test_an_upload_as_one_tar_gz_gets_the_next_number(version, adapter, contributor):
    other = crafted.real_adapter("bfloat16")
    archive = crafted.tar_gz_bytes(other.files())
    response = upload(client_for(contributor), adapter, {"adapter.tar.gz": archive})
    assert response.status_code == 201, response.content
    assert response.json()["number"] == 2
    assert response.json()["dtype"] == "bfloat16"


def test_the_same_weights_cannot_be_uploaded_twice(version, adapter, contributor, media_root):
    before = media_files(media_root)
    response = upload(client_for(contributor), adapter, crafted.real_adapter().files())
    assert_error(response, 409, "duplicate_upload")
    assert AdapterVersion.objects.count() == 1
    assert media_files(media_root) == before


def test_another_contributor_reuploading_someone_elses_weights_is_refused(
    version, other_contributor, base_model
):
    theirs = AdapterFactory(owner=other_contributor)
    response = upload(client_for(other_contributor), theirs, crafted.real_adapter().files())
    assert_error(response, 409, "duplicate_upload")
    assert "adder" not in response.json()["error"]["message"]


def _refusals():
    real = crafted.real_adapter()
    return [
        ("pickle weights", {"adapter_model.bin": b"\x80\x04pickle"}, "upload_pickle_refused"),
        ("config only", {"adapter_config.json": real.config}, "upload_missing_file"),
        (
            "rank too large",
            {
                "adapter_config.json": crafted.mutated_config(real.config, {"r": 128}),
                "adapter_model.safetensors": real.weights,
            },
            "config_rank_out_of_range",
        ),
        (
            "scale far beyond a real LoRA's",
            {
                "adapter_config.json": crafted.mutated_config(real.config, {"lora_alpha": 1000}),
                "adapter_model.safetensors": real.weights,
            },
            "config_scale_out_of_range",
        ),
        (
            "code-loading key",
            {
                "adapter_config.json": crafted.mutated_config(
                    real.config, {"auto_mapping": {"parent_library": "os"}}
                ),
                "adapter_model.safetensors": real.weights,
            },
            "config_forbidden_key",
        ),
        (
            "path traversal",
            {"a.zip": crafted.zip_bytes({"../adapter_config.json": real.config})},
            "archive_unsafe_path",
        ),
        (
            "hostile header",
            {
                "adapter_config.json": real.config,
                "adapter_model.safetensors": crafted.safetensors_bytes(b"{}", header_length=2**40),
            },
            "weights_header_too_large",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_a_refused_upload_answers_400_with_its_code_and_leaves_nothing(
    adapter, contributor, media_root, case
):
    _, files, code = _refusals()[case]
    response = upload(client_for(contributor), adapter, files)
    assert_error(response, 400, code)
    assert not AdapterVersion.objects.exists()
    assert not AuditEvent.objects.exclude(action="adapter.created").exists()
    assert media_files(media_root) == []


def test_an_upload_without_files_is_refused(adapter, contributor):
    url = reverse("api:version-list", kwargs={"adapter_id": adapter.pk})
    response = client_for(contributor).post(url, {}, format="multipart")
    assert_error(response, 400, "invalid_input")


def test_an_upload_over_the_cap_is_refused_while_streaming(
    adapter, contributor, settings, media_root
):
    settings.TESSERA_MAX_UPLOAD_BYTES = 1024
    files = crafted.real_adapter().files()
    response = upload(client_for(contributor), adapter, files)
    assert_error(response, 413, "upload_too_large")
    assert not AdapterVersion.objects.exists()
    assert media_files(media_root) == []


def test_upload_without_a_base_model_is_refused(contributor, media_root):
    adapter = AdapterFactory(owner=contributor)
    response = upload(client_for(contributor), adapter, crafted.real_adapter().files())
    assert_error(response, 409, "base_model_missing")
    assert media_files(media_root) == []


def test_only_the_owner_uploads(adapter, other_contributor, maintainer):
    files = crafted.real_adapter().files()
    assert_error(upload(client_for(other_contributor), adapter, files), 404, "not_found")
    assert_error(upload(client_for(maintainer), adapter, files), 403, "not_owner")
    assert not AdapterVersion.objects.exists()


def test_uploads_are_throttled_per_user(adapter, contributor, settings):
    from rest_framework.settings import api_settings

    rates = {**api_settings.DEFAULT_THROTTLE_RATES, "uploads": "1/hour"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    from rest_framework.throttling import ScopedRateThrottle

    # The class reads its rates once, at import: swap them in, and put the very same
    # object back after (api_settings still holds the overridden rates at that point).
    original = ScopedRateThrottle.THROTTLE_RATES
    ScopedRateThrottle.THROTTLE_RATES = rates
    try:
        client = client_for(contributor)
        upload(client, adapter, {"adapter_model.bin": b"x"})
        assert_error(upload(client, adapter, {"adapter_model.bin": b"x"}), 429, "throttled")
    finally:
        ScopedRateThrottle.THROTTLE_RATES = original


# --- versions, withdrawal, files ------------------------------------------------------------


def test_version_detail_access(version, contributor, other_contributor, maintainer):
    url = reverse("api:version-detail", kwargs={"adapter_id": version.adapter_id, "number": 1})
    body = client_for(contributor).get(url).json()
    assert body["status"] == "queued"
    assert body["adapter_config"]["r"] == 4
    assert_error(client_for(other_contributor).get(url), 404, "not_found")
    assert client_for(maintainer).get(url).status_code == 200
    missing = reverse("api:version-detail", kwargs={"adapter_id": version.adapter_id, "number": 9})
    assert_error(client_for(contributor).get(missing), 404, "not_found")


def test_the_owner_withdraws_a_version_once(version, contributor):
    url = reverse("api:version-withdraw", kwargs={"adapter_id": version.adapter_id, "number": 1})
    client = client_for(contributor)
    response = client.post(url, {"reason": "superseded by v2"})
    assert response.status_code == 200
    assert response.json()["status"] == "withdrawn"
    event = AuditEvent.objects.get(action="version.withdrawn")
    assert (event.actor, event.from_status, event.reason) == (
        contributor,
        "queued",
        "superseded by v2",
    )
    assert_error(client.post(url, {}), 409, "already_withdrawn")


def test_others_cannot_withdraw(version, other_contributor, maintainer):
    url = reverse("api:version-withdraw", kwargs={"adapter_id": version.adapter_id, "number": 1})
    assert_error(client_for(other_contributor).post(url), 404, "not_found")
    assert_error(client_for(maintainer).post(url), 403, "not_owner")
    version.refresh_from_db()
    assert version.status == "queued"


def test_version_files_download_for_owner_and_maintainers(
    version, contributor, other_contributor, maintainer
):
    def url(name):
        return reverse(
            "api:version-file",
            kwargs={"adapter_id": version.adapter_id, "number": 1, "name": name},
        )

    weights = crafted.real_adapter().weights
    response = client_for(contributor).get(url("adapter_model.safetensors"))
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == weights
    assert client_for(maintainer).get(url("README.md")).status_code == 200
    assert_error(client_for(other_contributor).get(url("README.md")), 404, "not_found")
    assert_error(client_for(contributor).get(url("secrets.txt")), 404, "not_found")


# --- the state machine ---------------------------------------------------------------------


def test_a_stale_transition_loses_the_compare_and_set(version, contributor):
    stale = AdapterVersion.objects.get(pk=version.pk)
    services.adapter_version_transition(version=version, to_status="evaluating", actor=None)
    with pytest.raises(services.DomainError) as excinfo:
        services.adapter_version_transition(version=stale, to_status="evaluating", actor=None)
    assert excinfo.value.code == "status_conflict"
    assert AuditEvent.objects.filter(action="version.evaluating").count() == 1


def test_a_transition_not_in_the_life_cycle_is_refused(version):
    with pytest.raises(services.DomainError) as excinfo:
        services.adapter_version_transition(version=version, to_status="admitted", actor=None)
    assert excinfo.value.code == "status_conflict"
    version.refresh_from_db()
    assert version.status == "queued"


def test_a_second_active_base_model_replaces_nothing_silently(base_model):
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        BaseModelFactory(source="another", is_active=True)
