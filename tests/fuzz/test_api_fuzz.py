"""The REST API fuzzed from its own OpenAPI schema (drf-spectacular's /api/schema/) with
schemathesis, over real HTTP against pytest-django's live server on the suite's PostgreSQL.

Every operation gets generated inputs, valid and invalid, each sent as an anonymous client,
as a contributor and as a maintainer (each with a real API token). No answer may be a 5xx, a
documented answer must match its documented schema, and every refusal must be the API's one
error shape ({"error": {"code", "message", "details"}}). The database is seeded so that small
ids reach real rows: the prepared tiny base model (its files downloadable), an adapter with
a version (id 1, number 1), its evaluation run (id 1) and a suite, so that the fuzzer does
more than collect 404s.

Bounded for CI (tests/fuzz/bounds): 8 examples per operation unless TESSERA_FUZZ_EXAMPLES
says more, a fixed seed and derandomized generation, so a CI failure replays locally with the
same inputs: ``TESSERA_FUZZ_EXAMPLES=500 pytest tests/fuzz`` fuzzes longer.
"""

from __future__ import annotations

import contextlib
import io
import json
from urllib.parse import unquote, urlsplit

import hypothesis
import pytest
import schemathesis
from django.urls import Resolver404, resolve
from rest_framework.throttling import SimpleRateThrottle
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from contributions import services
from evaluation.services.suites import suite_version_import
from tests.evaluation.test_suites import jsonl, quiz_lines
from tests.factories import AdapterFactory, MaintainerFactory, UserFactory
from tests.fuzz.bounds import fuzz_config, max_examples
from tests.support import crafted

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)

MAX_EXAMPLES = max_examples(8)
PERSONAS = ["anonymous", "contributor", "maintainer"]
CHECKS = [not_a_server_error, response_schema_conformance]


def api_schema() -> dict:
    """The schema /api/schema/ serves, built in-process so that every operation is a test of
    its own (its own seeded database, its own line in --durations)."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    # drf-spectacular's warnings about views it cannot fully describe go to stderr; they
    # are the schema's business, not this run's output.
    with contextlib.redirect_stderr(io.StringIO()):
        generated = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(generated))


schema = schemathesis.openapi.from_dict(api_schema(), config=fuzz_config(examples=MAX_EXAMPLES))


@pytest.fixture
def tokens(monkeypatch, settings_rates, tiny_base_model) -> dict[str, dict[str, str]]:
    """Headers per persona, over a seeded database (ids start at 1 in each test)."""
    from evaluation.tasks import evaluate_run
    from tessera.celery import app as celery_app

    # Uploads that pass intake are queued for evaluation; no worker runs here.
    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)
    monkeypatch.setattr(celery_app, "send_task", lambda *args, **kwargs: None)
    contributor = UserFactory(username="owner")
    maintainer = MaintainerFactory(username="maint")
    adapter = AdapterFactory(owner=contributor, slug="adder")
    services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=crafted.real_adapter().parts(card=True)
    )
    suite_version_import(jsonl=jsonl(quiz_lines(slug="quiz")), actor=maintainer)
    headers = {"anonymous": {}}
    for name, user in (("contributor", contributor), ("maintainer", maintainer)):
        _, key = services.api_token_create(user=user, name="fuzz")
        headers[name] = {"Authorization": f"Bearer {key}"}
    return headers


@pytest.fixture
def settings_rates(monkeypatch):
    """Throttling is tested elsewhere; here it would turn most answers into 429s."""
    rates = {name: "100000/min" for name in SimpleRateThrottle.THROTTLE_RATES}
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", rates)


@schema.parametrize()
@hypothesis.settings(
    deadline=None,
    # The seeded database is the state every input of an operation starts from; what an
    # input changes (a withdrawal, a decision) is seen by the next, as on a real server.
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_operation_answers_with_a_server_error(case, tokens, live_server):
    # Each input is sent by every persona: one seeded database per operation, not three.
    for persona in PERSONAS:
        try:
            response = case.call_and_validate(
                base_url=live_server.url, headers=tokens[persona], checks=CHECKS, timeout=30
            )
            if response.status_code >= 400:
                assert_api_error(response)
        except BaseException as failure:
            failure.add_note(f"Sent as the {persona} persona.")
            raise


def assert_api_error(response) -> None:
    """Every refusal is tessera.api's one shape, with a machine-readable code."""
    # schemathesis's response: lower-case header names, each with a list of values.
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code == 404 and not content_type.startswith("application/json"):
        # A path no URL pattern matches (an id that is not an integer) is answered by
        # Django's HTML 404 page before any API view: only that may skip the JSON shape.
        with pytest.raises(Resolver404):
            resolve(unquote(urlsplit(response.request.url).path))
        return
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
