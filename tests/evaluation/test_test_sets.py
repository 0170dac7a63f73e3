"""Contributors' own test sets: JSONL attached to an adapter through the API and the portal.

A good upload is stored in the shape of benchmark examples; every bad input is refused with
a code of its own and leaves nothing stored; only the owner may attach one (others 404,
maintainers may look but not attach).
"""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from contributions.models import AuditEvent
from evaluation import models as em
from evaluation.services.test_sets import MAX_TEST_SET_BYTES, MAX_TEST_SET_LINES
from tests.evaluation.test_review import make_run, make_version
from tests.factories import AdapterFactory

pytestmark = pytest.mark.django_db


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


GOOD = jsonl(
    {"prompt": "What is 120 + 7?", "target": "127"},
    {"prompt": "Add 5 and 999.", "target": "1004"},
    {"prompt": "Which is bigger?", "target": "9", "choices": ["3", "9"]},
)
MC = jsonl({"prompt": "2+2?", "target": "4", "choices": ["3", "4", "5"]})


@pytest.fixture
def adapter(contributor, base_model):
    return AdapterFactory(owner=contributor, slug="adder")


def url(adapter) -> str:
    return reverse("evaluation-api:test-sets", kwargs={"adapter_id": adapter.pk})


def api_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def upload(data: bytes, name: str = "sums.jsonl") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/jsonl")


def post(client, adapter, data: bytes | None = GOOD, **fields):
    body = {"name": "my sums", "metric": "exact_match", **fields}
    if data is not None:
        body["file"] = upload(data)
    return client.post(url(adapter), body, format="multipart")


def nothing_stored() -> bool:
    return (
        not em.ContributorTestSet.objects.exists()
        and not AuditEvent.objects.filter(action="test_set.created").exists()
    )


# --- good uploads -------------------------------------------------------------------------------


def test_the_owner_attaches_a_test_set_through_the_api(adapter, contributor):
    response = post(api_for(contributor), adapter)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["name"], body["metric"], body["examples"]) == ("my sums", "exact_match", 3)
    assert body["latest"] is None
    test_set = em.ContributorTestSet.objects.get(adapter=adapter)
    assert test_set.prompt_template == "{prompt}"
    assert test_set.examples[0] == {
        "fields": {"prompt": "What is 120 + 7?"},
        "target": "127",
        "choices": [],
    }
    assert test_set.examples[2]["choices"] == ["3", "9"]
    assert len(test_set.source_sha256) == 64
    event = AuditEvent.objects.get(action="test_set.created")
    assert (event.actor, event.adapter) == (contributor, adapter)


def test_a_multiple_choice_set_and_blank_lines_and_a_bom_are_accepted(adapter, contributor):
    data = b"\xef\xbb\xbf" + MC + b"\n\n" + MC
    response = post(api_for(contributor), adapter, data, metric="multiple_choice")
    assert response.status_code == 201
    assert response.json()["examples"] == 2


def test_the_list_shows_each_test_sets_latest_scores(adapter, contributor):
    assert post(api_for(contributor), adapter).status_code == 201
    test_set = em.ContributorTestSet.objects.get()
    older = make_run(make_version(adapter, number=1))
    newer = make_run(make_version(adapter, number=2))
    em.TestSetResult.objects.create(
        run=older, test_set=test_set, n=3, base_score=0.0, adapter_score=0.33
    )
    em.TestSetResult.objects.create(
        run=newer, test_set=test_set, n=3, base_score=0.0, adapter_score=1.0
    )
    em.EvaluationRun.objects.filter(pk=older.pk).update(
        created_at=newer.created_at.replace(year=2000)
    )

    response = api_for(contributor).get(url(adapter))
    assert response.status_code == 200
    [row] = response.json()
    assert row["latest"] == {
        "name": "my sums",
        "metric": "exact_match",
        "n": 3,
        "base_score": 0.0,
        "adapter_score": 1.0,
    }
    assert row["latest_version"] == 2
    page = client_for(contributor).get(reverse("evaluation:test-sets", args=[adapter.pk]))
    assert "v2: base 0.000, adapter 1.000 (+1.000)" in page.content.decode()


def test_the_owner_attaches_a_test_set_in_the_portal(adapter, contributor):
    client = client_for(contributor)
    page_url = reverse("evaluation:test-sets", args=[adapter.pk])
    assert "Attach test set" in client.get(page_url).content.decode()
    response = client.post(
        page_url,
        {"name": "my sums", "metric": "exact_match", "file": upload(GOOD)},
        follow=True,
    )
    assert "Test set &#x27;my sums&#x27; attached with 3 examples" in response.content.decode()
    assert em.ContributorTestSet.objects.get().name == "my sums"


# --- bad inputs: a code each, nothing stored ---------------------------------------------------

BAD = [
    ("name_missing", {"name": ""}, GOOD, 400, "test_set_name_required"),
    ("name_too_long", {"name": "x" * 101}, GOOD, 400, "test_set_name_too_long"),
    ("metric_unknown", {"metric": "bleu"}, GOOD, 400, "test_set_metric_unknown"),
    ("metric_missing", {"metric": ""}, GOOD, 400, "test_set_metric_unknown"),
    ("file_missing", {}, None, 400, "test_set_file_required"),
    ("empty", {}, b"", 400, "test_set_empty"),
    ("blank_lines_only", {}, b"\n  \n", 400, "test_set_empty"),
    ("not_utf8", {}, b'{"prompt": "\xff", "target": "x"}\n', 400, "test_set_not_utf8"),
    (
        "too_large",
        {},
        jsonl({"prompt": "p" * (MAX_TEST_SET_BYTES), "target": "t"}),
        413,
        "test_set_too_large",
    ),
    (
        "too_many_lines",
        {},
        jsonl(
            *[{"prompt": f"{i}+1?", "target": str(i + 1)} for i in range(MAX_TEST_SET_LINES + 1)]
        ),
        400,
        "test_set_too_many_lines",
    ),
    ("not_json", {}, b'{"prompt": "a", "target": \n', 400, "test_set_line_not_json"),
    ("not_object", {}, b'["a", "b"]\n', 400, "test_set_line_not_object"),
    (
        "unknown_field",
        {},
        jsonl({"prompt": "a", "target": "b", "hint": "c"}),
        400,
        "test_set_line_unknown_field",
    ),
    ("prompt_missing", {}, jsonl({"target": "b"}), 400, "test_set_prompt_missing"),
    ("prompt_not_string", {}, jsonl({"prompt": 3, "target": "b"}), 400, "test_set_prompt_missing"),
    ("target_missing", {}, jsonl({"prompt": "a"}), 400, "test_set_target_missing"),
    ("target_empty", {}, jsonl({"prompt": "a", "target": " "}), 400, "test_set_target_missing"),
    (
        "choices_not_list",
        {},
        jsonl({"prompt": "a", "target": "b", "choices": "b"}),
        400,
        "test_set_choices_invalid",
    ),
    (
        "choices_not_strings",
        {},
        jsonl({"prompt": "a", "target": "b", "choices": [1, 2]}),
        400,
        "test_set_choices_invalid",
    ),
    (
        "mc_without_choices",
        {"metric": "multiple_choice"},
        jsonl({"prompt": "a", "target": "b"}),
        400,
        "test_set_choices_required",
    ),
    (
        "mc_target_not_a_choice",
        {"metric": "multiple_choice"},
        jsonl({"prompt": "a", "target": "z", "choices": ["b", "c"]}),
        400,
        "test_set_target_not_in_choices",
    ),
]


@pytest.mark.parametrize(
    ("fields", "data", "status", "code"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_each_bad_input_is_refused_with_its_code_and_nothing_is_stored(
    adapter, contributor, fields, data, status, code
):
    response = post(api_for(contributor), adapter, data, **fields)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert nothing_stored()

    # The portal says the same, next to the form, with the same status.
    body = {"name": "my sums", "metric": "exact_match", **fields}
    if data is not None:
        body["file"] = upload(data)
    page = client_for(contributor).post(reverse("evaluation:test-sets", args=[adapter.pk]), body)
    assert page.status_code == status
    assert f"({code})" in page.content.decode()
    assert nothing_stored()


def test_a_bad_line_is_named_by_its_number(adapter, contributor):
    data = GOOD + b"not json\n"
    response = post(api_for(contributor), adapter, data)
    error = response.json()["error"]
    assert error["code"] == "test_set_line_not_json"
    assert error["details"]["line"] == 4
    assert error["message"].startswith("Line 4:")


def test_a_name_already_used_on_the_adapter_is_a_conflict(adapter, contributor):
    assert post(api_for(contributor), adapter).status_code == 201
    response = post(api_for(contributor), adapter, MC, metric="multiple_choice")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "test_set_name_taken"
    assert em.ContributorTestSet.objects.count() == 1


def test_exactly_the_line_cap_is_accepted(adapter, contributor):
    data = jsonl(*[{"prompt": f"{i}+1?", "target": str(i + 1)} for i in range(MAX_TEST_SET_LINES)])
    assert post(api_for(contributor), adapter, data).status_code == 201


# --- who may ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("persona", "get_status", "post_status"),
    [
        ("anonymous", 401, 401),
        ("other", 404, 404),
        ("maintainer", 200, 403),
        ("owner", 200, 201),
    ],
)
def test_only_the_owner_attaches_test_sets_through_the_api(
    adapter, contributor, other_contributor, maintainer, persona, get_status, post_status
):
    user = {
        "anonymous": None,
        "other": other_contributor,
        "maintainer": maintainer,
        "owner": contributor,
    }[persona]
    assert api_for(user).get(url(adapter)).status_code == get_status
    assert post(api_for(user), adapter).status_code == post_status
    assert em.ContributorTestSet.objects.exists() is (persona == "owner")


@pytest.mark.parametrize(
    ("persona", "get_status", "post_status"),
    [("anonymous", 302, 302), ("other", 404, 404), ("maintainer", 200, 403)],
)
def test_only_the_owner_attaches_test_sets_in_the_portal(
    adapter, other_contributor, maintainer, persona, get_status, post_status
):
    user = {"anonymous": None, "other": other_contributor, "maintainer": maintainer}[persona]
    page_url = reverse("evaluation:test-sets", args=[adapter.pk])
    response = client_for(user).get(page_url)
    assert response.status_code == get_status
    if persona == "maintainer":
        assert "Attach test set" not in response.content.decode()
    body = {"name": "x", "metric": "exact_match", "file": upload(GOOD)}
    assert client_for(user).post(page_url, body).status_code == post_status
    assert nothing_stored()


def test_a_missing_adapter_is_a_404(contributor, base_model):
    response = api_for(contributor).get(
        reverse("evaluation-api:test-sets", kwargs={"adapter_id": 999999})
    )
    assert response.status_code == 404
