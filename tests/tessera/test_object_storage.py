"""Adapter files in an S3-compatible bucket (TESSERA_STORAGE=s3, django-storages' S3Storage).

The object store is a real S3 API over HTTP: moto's server, started on loopback once for
this module, with a fresh bucket per test. Uploads through the REST API land in the bucket
and nowhere under MEDIA_ROOT; the evaluation worker's and the inference server's reads
copy them back out of it; the places that delete files today delete the objects.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.urls import reverse
from moto.server import ThreadedMotoServer
from transformers import AutoModelForCausalLM

from contributions import services
from contributions.models import AdapterVersion
from evaluation.services.plans import WEIGHTS_NAME, adapter_files
from evaluation.services.runs import RunFailure
from evaluation.worker.sandbox import workdir_add_readonly
from multilora import Engine
from routing.merging.services import merge_compute_now
from routing.models import MergedAdapter, MixtureVersion
from routing.serving.sync import MixtureSync, engine_key
from tests.conftest import media_files
from tests.contributions.test_api import client_for, upload
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    model_cache,
    tiny_base_model,
    tiny_model_source,
)
from tests.factories import AdapterFactory
from tests.routing.conftest import walk_to_admitted
from tests.support import crafted
from tests.support.tiny_model import tiny_llama_config, tiny_tokenizer

REGION = "us-east-1"
KEY_ID, SECRET = "tessera-test-key", "tessera-test-secret"


@pytest.fixture(scope="module")
def s3_endpoint():
    # Its request log would fill every failing test's report.
    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    log.setLevel(level)


@pytest.fixture
def s3(s3_endpoint):
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


@pytest.fixture
def bucket(settings, s3, s3_endpoint) -> str:
    """A fresh bucket, made the default storage the way TESSERA_STORAGE=s3 configures it.

    Overriding STORAGES fires Django's setting_changed, whose receiver drops the cached
    storages and default_storage's wrapped instance; the FileFields hold default_storage
    (a lazy object), so they use the bucket from here on, and the disk again afterwards."""
    name = f"tessera-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": name,
                "access_key": KEY_ID,
                "secret_key": SECRET,
                "endpoint_url": s3_endpoint,
                "region_name": REGION,
                "addressing_style": "path",
                "location": "",
                "default_acl": None,
                "querystring_auth": True,
                "querystring_expire": 600,
                "signature_version": "s3v4",
                "file_overwrite": False,
            },
        },
    }
    assert type(default_storage._wrapped).__name__ != "S3Storage"  # not built yet
    return name


def objects(s3, bucket: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        item["Key"]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listing
    }


@pytest.fixture
def adapter(contributor, base_model):
    return AdapterFactory(owner=contributor, slug="adder")


def stored_version(adapter, contributor, *, seed: int = 1) -> AdapterVersion:
    return services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=crafted.real_adapter(seed=seed).parts()
    )


# --- Uploads and downloads through the REST API ------------------------------------------


@pytest.mark.django_db
def test_an_api_upload_lands_in_the_bucket_and_nothing_under_media_root(
    bucket, s3, adapter, contributor, media_root
):
    files = crafted.real_adapter().files(card=True)
    client = client_for(contributor)
    response = upload(client, adapter, files)
    assert response.status_code == 201, response.content

    prefix = f"adapters/{contributor.pk}/adder/v1/"
    assert objects(s3, bucket) == {prefix + name: data for name, data in files.items()}
    assert media_files(media_root) == []
    version = AdapterVersion.objects.get()
    assert version.weights_file.name == prefix + "adapter_model.safetensors"
    assert version.weights_sha256 == hashlib.sha256(files[WEIGHTS_NAME]).hexdigest()

    # The owner's download streams the object back from the bucket.
    for name, data in files.items():
        url = reverse(
            "api:version-file", kwargs={"adapter_id": adapter.pk, "number": 1, "name": name}
        )
        answer = client.get(url)
        assert answer.status_code == 200
        assert b"".join(answer.streaming_content) == data


@pytest.mark.django_db
def test_a_second_version_with_the_same_file_names_gets_its_own_objects(
    bucket, s3, adapter, contributor
):
    first, second = (
        stored_version(adapter, contributor),
        stored_version(adapter, contributor, seed=2),
    )
    stored = objects(s3, bucket)
    assert first.weights_file.name in stored and second.weights_file.name in stored
    assert stored[first.weights_file.name] != stored[second.weights_file.name]
    # No name is ever reused: the storage refuses to overwrite (a taken name gets a suffix).
    taken = default_storage.save(first.weights_file.name, ContentFile(b"other bytes"))
    assert taken != first.weights_file.name
    assert objects(s3, bucket)[first.weights_file.name] == stored[first.weights_file.name]


@pytest.mark.django_db
def test_a_refused_upload_after_its_files_were_written_removes_the_objects(
    bucket, s3, adapter, contributor, settings, media_root
):
    """Past the live-evaluation cap the upload fails inside its transaction, after its files
    were stored: the objects are deleted again, as the files on disk are."""
    settings.TESSERA_LIVE_RUNS_PER_CONTRIBUTOR = 1
    client = client_for(contributor)
    assert upload(client, adapter, crafted.real_adapter(seed=1).files()).status_code == 201
    before = objects(s3, bucket)
    assert len(before) == 2

    refused = upload(client, adapter, crafted.real_adapter(seed=2).files())
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "too_many_live_evaluations"
    assert objects(s3, bucket) == before
    assert AdapterVersion.objects.count() == 1
    assert media_files(media_root) == []


@pytest.mark.django_db
def test_withdrawing_a_version_keeps_its_objects(bucket, s3, adapter, contributor):
    """Withdrawal is a status, not a deletion (the audit trail names the files), in the
    bucket as on disk."""
    client = client_for(contributor)
    assert upload(client, adapter, crafted.real_adapter().files()).status_code == 201
    before = objects(s3, bucket)
    url = reverse("api:version-withdraw", kwargs={"adapter_id": adapter.pk, "number": 1})
    assert client.post(url, {"reason": "superseded"}, format="json").status_code == 200
    assert AdapterVersion.objects.get().status == AdapterVersion.Status.WITHDRAWN
    assert objects(s3, bucket) == before


# --- The evaluation worker's and the inference server's copies -----------------------------


@pytest.mark.django_db
def test_the_evaluation_worker_copies_the_weights_out_of_the_bucket(
    bucket, s3, adapter, contributor, tmp_path: Path
):
    version = stored_version(adapter, contributor)
    stored = objects(s3, bucket)[version.weights_file.name]
    files = adapter_files(version)
    assert files == {WEIGHTS_NAME: stored}
    # The child's read-only copy, as the worker lays it out for a run.
    folder = workdir_add_readonly(tmp_path, "adapter", files=files)
    assert (folder / WEIGHTS_NAME).read_bytes() == stored
    assert not os.access(folder / WEIGHTS_NAME, os.W_OK) or os.geteuid() == 0

    # The bucket is not trusted either: an object changed since upload is refused.
    s3.put_object(Bucket=bucket, Key=version.weights_file.name, Body=stored[:-1] + b"\1")
    with pytest.raises(RunFailure) as refused:
        adapter_files(version)
    assert refused.value.code == "weights_changed"


@pytest.fixture
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(AutoModelForCausalLM.from_config(tiny_llama_config()), tiny_tokenizer())


@pytest.mark.django_db
def test_the_inference_server_loads_admitted_adapters_from_the_bucket(
    bucket, s3, contributor, base_model, engine, monkeypatch
):
    from evaluation.tasks import evaluate_run

    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)
    good = walk_to_admitted(
        stored_version(AdapterFactory(owner=contributor, slug="good"), contributor, seed=1)
    )
    sync = MixtureSync(engine)
    assert sync.refresh() is True
    assert engine_key(good.pk) in engine.registry
    assert [served.version_id for served in sync.catalog] == [good.pk]

    # An object changed in the bucket since upload is left out; the rest is served.
    changed = stored_version(AdapterFactory(owner=contributor, slug="changed"), contributor, seed=2)
    body = objects(s3, bucket)[changed.weights_file.name]
    s3.put_object(Bucket=bucket, Key=changed.weights_file.name, Body=body[:-1] + b"\1")
    walk_to_admitted(changed)
    sync.refresh()
    assert engine_key(changed.pk) not in engine.registry
    assert engine_key(good.pk) in engine.registry


@pytest.mark.django_db
def test_a_rebuilt_merged_adapter_replaces_its_objects(
    bucket,
    s3,
    contributor,
    tiny_base_model,  # noqa: F811
    monkeypatch,
):
    """The merge reads its members' weights from the bucket and stores its own there; a
    rebuild deletes the previous build's objects first (else the new ones would get
    suffixed names beside them)."""
    from evaluation.tasks import evaluate_run

    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)
    for seed, slug in ((1, "units"), (2, "dates")):
        walk_to_admitted(
            stored_version(AdapterFactory(owner=contributor, slug=slug), contributor, seed=seed)
        )
    mixture = MixtureVersion.objects.get(is_active=True)
    first = merge_compute_now(mixture=mixture, method="dare_ties", density=0.3)
    assert first.status == MergedAdapter.Status.DONE, first.reason
    names = {first.config_file.name, first.weights_file.name}
    merged_objects = {k: v for k, v in objects(s3, bucket).items() if k.startswith("merged/")}
    assert set(merged_objects) == names

    second = merge_compute_now(mixture=mixture, method="dare_ties", density=0.9)
    assert second.status == MergedAdapter.Status.DONE, second.reason
    rebuilt = {k: v for k, v in objects(s3, bucket).items() if k.startswith("merged/")}
    assert set(rebuilt) == {second.config_file.name, second.weights_file.name} == names
    assert rebuilt[second.weights_file.name] != merged_objects[first.weights_file.name]
    assert not MergedAdapter.objects.filter(pk=first.pk).exists()


# --- The settings ------------------------------------------------------------------------


def _load_settings(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "AWS_", "TESSERA_STORAGE"))
    }
    environment.update(DJANGO_DEBUG="true", **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_s3_without_a_bucket_refuses_to_start():
    result = _load_settings("import tessera.settings", TESSERA_STORAGE="s3")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "AWS_STORAGE_BUCKET_NAME must be set when TESSERA_STORAGE is s3" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TESSERA_STORAGE", "gcs", "TESSERA_STORAGE must be one of filesystem, s3"),
        ("AWS_S3_ADDRESSING_STYLE", "sideways", "AWS_S3_ADDRESSING_STYLE must be one of"),
        ("AWS_QUERYSTRING_EXPIRE", "0", "AWS_QUERYSTRING_EXPIRE must be a positive integer"),
    ],
)
def test_a_bad_storage_value_refuses_to_start(name, value, message):
    env = {"TESSERA_STORAGE": "s3", "AWS_STORAGE_BUCKET_NAME": "adapters", name: value}
    result = _load_settings("import tessera.settings", **env)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_filesystem_stays_the_default():
    result = _load_settings(
        "from tessera import settings; print(settings.STORAGES['default']['BACKEND'])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.core.files.storage.FileSystemStorage"


def test_the_environment_alone_configures_a_working_bucket(s3, s3_endpoint):
    """The settings as a deployment gives them (environment variables only) store into and
    read back from the bucket; stored objects carry no public ACL and URLs are presigned."""
    name = f"tessera-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    code = (
        "import django; django.setup()\n"
        "from django.core.files.base import ContentFile\n"
        "from django.core.files.storage import default_storage as s\n"
        "n = s.save('adapters/1/probe/v1/adapter_config.json', ContentFile(b'{}'))\n"
        "print(n); print(s.open(n).read().decode()); print(s.url(n))\n"
    )
    result = _load_settings(
        code,
        DJANGO_SETTINGS_MODULE="tessera.settings",
        TESSERA_STORAGE="s3",
        AWS_STORAGE_BUCKET_NAME=name,
        AWS_S3_ENDPOINT_URL=s3_endpoint,
        AWS_S3_REGION_NAME=REGION,
        AWS_S3_ADDRESSING_STYLE="path",
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_LOCATION="tessera/",
        AWS_QUERYSTRING_EXPIRE="120",
    )
    assert result.returncode == 0, result.stderr
    saved, read, url = result.stdout.strip().splitlines()
    assert saved == "adapters/1/probe/v1/adapter_config.json" and read == "{}"
    assert objects(s3, name) == {"tessera/adapters/1/probe/v1/adapter_config.json": b"{}"}
    assert url.startswith(f"{s3_endpoint}/{name}/tessera/adapters/1/probe/v1/")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    grants = s3.get_object_acl(Bucket=name, Key="tessera/" + saved)["Grants"]
    assert all("URI" not in grant["Grantee"] for grant in grants)  # no AllUsers grant
