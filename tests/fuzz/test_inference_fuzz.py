"""The OpenAI-compatible inference API fuzzed from its OpenAPI document
(routing/inference/openapi.json) with schemathesis, against a real uvicorn server on the tiny
random Llama with one admitted adapter, authenticated with a real key.

No answer may be a 5xx; every error must be in OpenAI's shape ({"error": {"message",
"type", "param", "code"}}); a documented answer must match its schema; a stream must be
server-sent events of JSON chunks ending in ``data: [DONE]``, with no error event in it.

For the run, the document is narrowed to what keeps it quick (the served models by name,
max_tokens at most 6) and the server's caps lowered to match (tests/fuzz/conftest); invalid
inputs are still generated around those bounds. Bounded like the REST API's fuzzing
(tests/fuzz/bounds): 80 examples per operation unless TESSERA_FUZZ_EXAMPLES says more, a
fixed seed, derandomized.
"""

from __future__ import annotations

import copy
import json

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from routing.catalog import BASE_MODEL_ID, MERGED_MODEL_ID, MIXTURE_MODEL_ID
from tests.fuzz import inference_openapi
from tests.fuzz.bounds import fuzz_config, max_examples

pytestmark = pytest.mark.django_db(transaction=True)

MAX_EXAMPLES = max_examples(80)
MAX_TOKENS = 6  # tests/fuzz/conftest's TESSERA_SERVING_MAX_TOKENS
ADAPTER_ID = "owner/unit-conversion"  # the contributor fixture's adapter (tests/fuzz/conftest)
# No merged adapter is built here: tessera-merged and the merged composition are refused
# (404 model_not_found, 400), which is fuzzed too.
MODELS = [MIXTURE_MODEL_ID, BASE_MODEL_ID, MERGED_MODEL_ID, ADAPTER_ID]
COMPOSITIONS = ["top1", "topk", "arrow", "logit", "merged", None]
CHECKS = [not_a_server_error, response_schema_conformance]


def committed() -> dict:
    return json.loads(inference_openapi.PATH.read_text())


def narrowed(document: dict) -> dict:
    """The committed document, with the generated requests kept to quick ones."""
    from routing.router import ROUTERS

    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    for name, fields in (
        ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens")),
        ("CompletionRequest", ("max_tokens",)),
    ):
        properties = schemas[name]["properties"]
        properties["model"] = {"enum": MODELS}
        for field in fields:
            properties[field] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    extension = schemas["Extension"]["properties"]
    extension["router"] = {"enum": [*ROUTERS, None]}
    extension["composition"] = {"enum": COMPOSITIONS}
    model_id = document["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]
    model_id["schema"] = {"type": "string", "minLength": 1, "examples": MODELS}
    return document


schema = schemathesis.openapi.from_dict(
    narrowed(committed()), config=fuzz_config(examples=MAX_EXAMPLES)
)


def test_the_committed_document_is_what_the_request_models_describe():
    assert committed() == json.loads(inference_openapi.render()), (
        "routing/inference/openapi.json is stale: run "
        "`.venv/bin/python -m tests.fuzz.inference_openapi`"
    )


def assert_openai_error(body: dict) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] is None or isinstance(error["code"], str), error


def assert_event_stream(text: str) -> None:
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events and events[-1] == "data: [DONE]", text[-500:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        chunk = json.loads(event.removeprefix("data: "))
        assert "error" not in chunk, f"an error inside a 200 stream: {chunk}"
        assert chunk["object"] in ("chat.completion.chunk", "text_completion"), chunk


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_no_inference_request_answers_with_a_server_error(case, fuzz_server, key):
    response = case.call_and_validate(
        base_url=fuzz_server.url,
        headers={"Authorization": f"Bearer {key}"},
        checks=CHECKS,
        timeout=60,
    )
    # schemathesis's response: lower-case header names, each with a list of values.
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), content_type
        assert_openai_error(response.json())
    elif content_type.startswith("text/event-stream"):
        assert_event_stream(response.text)
    else:
        assert content_type.startswith("application/json"), content_type
