"""Inputs the inference API's fuzzing found answered with a 5xx, each replayed exactly
against a real server (tests/fuzz/conftest), expecting a 4xx in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest

from tests.fuzz.test_inference_fuzz import assert_openai_error

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def http(fuzz_server, key):
    with httpx.Client(
        base_url=fuzz_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        yield client


# A line feed in the path matched no URL pattern (`.` stops at it), so Django's HTML 404
# page rendered, and failed: the portal's URLs are not in the inference server's urlconf.
@pytest.mark.parametrize(
    "method, path",
    [
        # What the fuzzer sent, reduced: a line feed (%0A) in the model id of /v1/models/{id}.
        ("GET", "/v1/models/55%3EG3%0Ax"),
        ("POST", "/v1/chat/completions%0A"),
    ],
)
def test_a_path_with_a_newline_is_an_openai_shaped_404_not_a_server_error(http, method, path):
    response = http.request(method, path, json={"model": "tessera", "messages": []})
    assert response.status_code == 404, response.text
    assert_openai_error(response.json())


@pytest.mark.parametrize(
    "extra",
    [{"model": "tessera-merged"}, {"model": "tessera", "tessera": {"composition": "merged"}}],
)
def test_the_merged_model_before_any_merge_is_a_client_error_not_a_503(http, extra):
    # /v1/models does not list tessera-merged and /v1/models/tessera-merged answers 404;
    # asking it for an answer was a retryable 503 (merged_unavailable).
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    response = http.post("/v1/chat/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response.json())
