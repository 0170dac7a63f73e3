"""What the inference fuzzing and its regression tests share: a real inference server
(uvicorn in a thread, tests/routing/conftest) on the tiny random Llama, one admitted real
PEFT adapter in its mixture, and a contributor's key."""

from __future__ import annotations

import time

import pytest

from contributions import services
from tests.routing.conftest import (  # noqa: F401 (fixtures used by name)
    UNITS_PROMPTS,
    admitted_version,
    api_redis_db,
    model_cache,
    no_evaluation,
    server,
    start_server,
    tiny_base_model,
    tiny_model_source,
)

ADAPTER_SLUG = "unit-conversion"


@pytest.fixture
def small_answers(settings) -> None:
    """The tiny model answers in a few tokens, so that hundreds of requests take seconds;
    past the cap the server answers 400 (invalid_value, max_tokens), which is fuzzed too."""
    settings.TESSERA_SERVING_DEFAULT_MAX_TOKENS = 3
    settings.TESSERA_SERVING_MAX_TOKENS = 6


@pytest.fixture
def fuzz_server(small_answers, contributor, server):  # noqa: F811
    admitted_version(contributor, slug=ADAPTER_SLUG, prompts=UNITS_PROMPTS, seed=1)
    deadline = time.monotonic() + 30
    while len(server.runtime.catalog) < 1:
        if time.monotonic() > deadline:
            pytest.fail("the admitted adapter did not reach the server's mixture")
        time.sleep(0.02)
    return server


@pytest.fixture
def key(contributor) -> str:
    return services.api_token_create(user=contributor, name="fuzz")[1]


@pytest.fixture
def adapter_model_id(contributor) -> str:
    return f"{contributor.username}/{ADAPTER_SLUG}"
