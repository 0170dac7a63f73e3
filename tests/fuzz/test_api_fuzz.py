"""The REST API fuzzed from its own OpenAPI schema (drf-spectacular's /api/schema/) with
schemathesis, over real HTTP against pytest-django's live server on the suite's PostgreSQL.

Every operation gets generated inputs, valid and invalid, each sent as an anonymous client,
as a contributor and as a maintainer (each with a real API token). No answer may be a 5xx, and a
documented answer must match its documented schema. The database is seeded so that small
ids reach real rows: the prepared tiny base model (its files downloadable), an adapter with
a version (id 1, number 1), its evaluation run (id 1) and a suite, so that the fuzzer does
more than collect 404s.

Bounded for CI: TESSERA_FUZZ_EXAMPLES (default 8) examples per operation, a
fixed seed and derandomized generation, so a CI failure replays locally with the same
inputs. Raise it to fuzz longer: ``TESSERA_FUZZ_EXAMPLES=500 pytest tests/fuzz``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import hypothesis
import pytest
import schemathesis
from rest_framework.throttling import SimpleRateThrottle
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import response_schema_conformance

from contributions import services
from evaluation.services.suites import suite_version_import
from tests.evaluation.test_suites import jsonl, quiz_lines
from tests.factories import AdapterFactory, MaintainerFactory, UserFactory
from tests.support import crafted

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)

MAX_EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("TESSERA_FUZZ_SEED", "20261202"))
PERSONAS = ["anonymous", "contributor", "maintainer"]
CHECKS = [not_a_server_error, response_schema_conformance]


def fuzz_config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "mode": "all",
            },
            # One generated phase per operation keeps the run's length proportional to
            # max-examples; the coverage phase alone sends hundreds of boundary cases.
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        }
    )


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


schema = schemathesis.openapi.from_dict(api_schema(), config=fuzz_config())


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
            case.call_and_validate(
                base_url=live_server.url, headers=tokens[persona], checks=CHECKS, timeout=30
            )
        except BaseException as failure:
            failure.add_note(f"Sent as the {persona} persona.")
            raise
