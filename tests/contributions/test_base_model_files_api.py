"""``GET /api/v1/base-model/`` and ``/api/v1/base-model/files/<name>``: the active base
model's prepared folder as a manifest and one download per file, for a token holder only,
and only the manifest's names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from contributions import services
from contributions.base_models import MANIFEST_NAME
from tests.contributions.test_api import assert_error, client_for
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    model_cache,
    tiny_base_model,
    tiny_model_source,
)
from tests.factories import BaseModelFactory

pytestmark = pytest.mark.django_db

MANIFEST_URL = "/api/v1/base-model/"


def file_url(name: str) -> str:
    return f"/api/v1/base-model/files/{name}"


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


def hand_made_copy(folder: Path, files: dict[str, bytes], *, weights_sha256: str) -> Path:
    """A prepared folder as base_model_prepare leaves it: the files and a manifest."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    }
    manifest = {"format": 1, "weights_sha256": weights_sha256, "files": listed}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def small_copy(db, tmp_path: Path):
    weights = b"\x00weights" * 100
    digest = hashlib.sha256(weights).hexdigest()
    folder = hand_made_copy(
        tmp_path / "model",
        {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights},
        weights_sha256=digest,
    )
    (tmp_path / "secret.txt").write_text("outside the folder")
    return BaseModelFactory(local_path=str(folder), weights_sha256=digest)


def test_the_manifest_lists_the_prepared_files_and_each_downloads_as_listed(
    tiny_base_model,  # noqa: F811 (the fixture imported above)
    contributor,
):
    client = client_for(contributor)
    response = client.get(MANIFEST_URL)
    assert response.status_code == 200, response.content
    body = response.json()
    folder = Path(tiny_base_model.local_path)
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    assert [f["name"] for f in body["files"]] == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(on_disk)
    assert body["name"] == tiny_base_model.name
    assert body["aliases"] == tiny_base_model.aliases
    assert body["adapter_base_model_name"] in tiny_base_model.aliases
    assert body["weights_sha256"] == tiny_base_model.weights_sha256
    assert body["total_size"] == sum(f["size"] for f in body["files"])
    listing = "".join(f"{f['sha256']}  {f['name']}\n" for f in body["files"])
    assert body["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    for entry in body["files"]:
        assert entry["url"] == f"http://testserver{file_url(entry['name'])}"
        download = client.get(file_url(entry["name"]))
        assert download.status_code == 200
        assert download["Content-Type"] == "application/octet-stream"
        assert int(download["Content-Length"]) == entry["size"]
        data = body_of(download)
        assert data == (folder / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("url", [MANIFEST_URL, file_url("config.json")])
def test_without_a_valid_token_nothing_is_served(small_copy, contributor, url):
    anonymous = APIClient().get(url)
    assert_error(anonymous, 401, "not_authenticated")
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Bearer tsr_nothere_0123456789")
    assert_error(wrong.get(url), 401, "authentication_failed")
    token, key = services.api_token_create(user=contributor, name="laptop")
    services.api_token_revoke(token=token, actor=contributor)
    revoked = APIClient()
    revoked.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert_error(revoked.get(url), 401, "authentication_failed")


@pytest.mark.parametrize(
    "name",
    [
        MANIFEST_NAME,  # in the folder, not in the manifest
        "nope.safetensors",
        "../secret.txt",
        "..%2Fsecret.txt",
        "%2E%2E/secret.txt",
        "model/../config.json",
        "/etc/passwd",
        "..",
        "CONFIG.JSON",
    ],
)
def test_only_the_manifests_names_are_served(small_copy, contributor, name):
    response = client_for(contributor).get(file_url(name))
    assert_error(response, 404, "base_model_file_unknown")
    assert "lists its files" in response.json()["error"]["message"]


def test_without_an_active_base_model_both_say_so_with_503(db, contributor):
    client = client_for(contributor)
    for url in (MANIFEST_URL, file_url("config.json")):
        response = client.get(url)
        assert_error(response, 503, "base_model_missing")
        assert "prepare_base_model" in response.json()["error"]["message"]


def test_an_active_base_model_without_a_prepared_copy_here_is_503(base_model, contributor):
    client = client_for(contributor)  # the factory's row points at /nonexistent/tiny-llama
    for url in (MANIFEST_URL, file_url("config.json")):
        response = client.get(url)
        assert_error(response, 503, "base_model_not_prepared")
        assert "no prepared copy on this server" in response.json()["error"]["message"]


def test_a_copy_that_differs_from_its_manifest_is_not_served(small_copy, contributor):
    client = client_for(contributor)
    assert client.get(MANIFEST_URL).status_code == 200
    weights = Path(small_copy.local_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # truncated
    assert_error(client.get(MANIFEST_URL), 503, "base_model_not_prepared")
    assert_error(client.get(file_url("model.safetensors")), 503, "base_model_not_prepared")
    small_copy.weights_sha256 = "f" * 64  # a manifest for other weights than the row's
    small_copy.save()
    weights.write_bytes(b"\x00weights" * 100)
    assert_error(client.get(MANIFEST_URL), 503, "base_model_not_prepared")


def test_the_endpoints_are_in_the_openapi_schema(db):
    schema = APIClient().get(reverse("schema"), {"format": "json"}).json()
    manifest = schema["paths"]["/api/v1/base-model/"]["get"]
    assert manifest["operationId"] == "base_model_manifest"
    assert {"200", "401", "503"} <= set(manifest["responses"])
    download = schema["paths"]["/api/v1/base-model/files/{name}"]["get"]
    assert download["operationId"] == "base_model_file"
    assert "application/octet-stream" in download["responses"]["200"]["content"]
    assert {"404", "503"} <= set(download["responses"])
