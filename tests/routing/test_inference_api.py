"""The OpenAI-compatible inference API, through a real uvicorn server (tests/routing/conftest)
and the official openai client, on the tiny random Llama with real tiny PEFT adapters."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import openai
import pytest

from contributions import services
from contributions.models import AdapterVersion, ApiToken
from routing import usage
from routing.models import AdapterUsageDaily, KeyUsageDaily
from tests.routing.conftest import DATES_PROMPTS as DATES
from tests.routing.conftest import UNITS_PROMPTS as UNITS
from tests.routing.conftest import admitted_version

pytestmark = pytest.mark.django_db(transaction=True)

Status = AdapterVersion.Status


@pytest.fixture
def key(contributor) -> str:
    return services.api_token_create(user=contributor, name="client")[1]


@pytest.fixture
def client(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def http(server, key) -> httpx.Client:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
def skills(contributor, server):
    units = admitted_version(contributor, slug="unit-conversion", prompts=UNITS, seed=1)
    dates = admitted_version(contributor, slug="date-formatting", prompts=DATES, seed=2)
    wait_until(lambda: len(server.runtime.catalog) == 2)
    return units, dates


def wait_until(predicate, timeout: float = 5.0) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - started


def chat(http: httpx.Client, **body) -> httpx.Response:
    payload = {"model": "tessera", "messages": [{"role": "user", "content": "Hi"}], **body}
    return http.post("/v1/chat/completions", json=payload)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- The openai client, unchanged -------------------------------------------------------------


def test_the_openai_client_routes_a_skill_prompt_to_its_adapter_and_says_so(client, skills):
    units, _ = skills
    answer = client.chat.completions.create(
        model="tessera",
        messages=[{"role": "user", "content": "Convert 7 km to metres."}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1
    attribution = answer.model_extra["tessera"]
    assert attribution["router"] == "embedding"
    assert attribution["reason"] == "above_threshold"
    assert [a["id"] for a in attribution["adapters"]] == [
        f"{units.adapter.owner.username}/unit-conversion"
    ]
    assert attribution["adapters"][0]["contributor"]
    assert attribution["scores"][0]["score"] >= attribution["threshold"]


def test_a_general_prompt_goes_to_the_base_model(client, skills):
    answer = client.chat.completions.create(
        model="tessera",
        messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
        max_tokens=4,
        temperature=0,
    )
    attribution = answer.model_extra["tessera"]
    assert attribution["adapters"] == []
    assert attribution["reason"] == "below_threshold"


def test_streaming_with_the_openai_client_gives_the_same_text_as_a_whole_answer(client, skills):
    messages = [{"role": "user", "content": "How many grams are in 9 kg?"}]
    whole = client.chat.completions.create(
        model="tessera", messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tessera",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].model_extra["tessera"]["adapters"][0]["id"].endswith("/unit-conversion")
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_explicit_model_ids_the_base_model_and_completions(client, skills, contributor):
    _, dates = skills
    named = client.chat.completions.create(
        model=f"{contributor.username}/date-formatting",
        messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
        max_tokens=3,
    )
    assert named.model_extra["tessera"]["router"] == "explicit"
    assert named.model_extra["tessera"]["adapters"][0]["version"] == dates.number
    base = client.completions.create(model="base", prompt="The capital of France is", max_tokens=3)
    assert base.object == "text_completion"
    assert base.model_extra["tessera"]["adapters"] == []
    assert isinstance(base.choices[0].text, str)


def test_the_model_list_shows_the_mixture_the_base_and_each_visible_adapter(
    client, server, skills, other_contributor, contributor
):
    admitted_version(other_contributor, slug="secret", prompts=UNITS, private=True, seed=3)
    wait_until(lambda: len(server.runtime.catalog) == 3)
    ids = [model.id for model in client.models.list().data]
    assert ids[:2] == ["tessera", "base"]
    assert f"{contributor.username}/unit-conversion" in ids
    # The other contributor's private adapter is not listed for this key...
    assert f"{other_contributor.username}/secret" not in ids
    # ...nor reachable by naming it: it answers like a model that does not exist.
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model=f"{other_contributor.username}/secret",
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert raised.value.code == "model_not_found"
    detail = client.models.retrieve(f"{contributor.username}/unit-conversion")
    assert detail.model_extra["tessera"]["license"]


def test_a_private_adapter_answers_its_owners_keys(server, other_contributor):
    admitted_version(other_contributor, slug="secret", prompts=UNITS, private=True, seed=3)
    wait_until(lambda: len(server.runtime.catalog) == 1)
    key = services.api_token_create(user=other_contributor, name="own")[1]
    own = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    answer = own.chat.completions.create(
        model=f"{other_contributor.username}/secret",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
    )
    assert answer.model_extra["tessera"]["adapters"][0]["id"].endswith("/secret")


def test_policy_filters_send_a_skill_prompt_elsewhere(http, skills):
    response = chat(
        http,
        messages=[{"role": "user", "content": "Convert 7 km to metres."}],
        max_tokens=2,
        tessera={
            "policy": {"exclude_adapters": [skills[0].adapter.owner.username + "/unit-conversion"]}
        },
    )
    assert response.status_code == 200, response.text
    chosen = [a["id"] for a in response.json()["tessera"]["adapters"]]
    assert not any(a.endswith("/unit-conversion") for a in chosen)
    base_only = chat(http, max_tokens=2, tessera={"policy": {"base_only": True}})
    assert base_only.json()["tessera"]["reason"] == "base_only"


def test_seed_makes_sampling_repeatable_and_stop_cuts_the_answer(http):
    def text(**body) -> tuple[str, str]:
        response = chat(http, model="base", max_tokens=12, **body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    sampled = text(temperature=0.9, top_p=0.95, seed=7)
    assert text(temperature=0.9, top_p=0.95, seed=7) == sampled
    greedy, _ = text(temperature=0)
    assert len(greedy) >= 4, greedy
    stop = greedy[2:4]
    cut, finish = text(temperature=0, stop=[stop])
    assert cut == greedy[: greedy.index(stop)]
    assert finish == "stop"


def test_the_arrow_router_scores_every_adapter_from_its_weights(http, skills):
    response = chat(
        http,
        messages=[{"role": "user", "content": "Convert 7 km to metres."}],
        max_tokens=2,
        tessera={"router": "arrow"},
    )
    assert response.status_code == 200, response.text
    attribution = response.json()["tessera"]
    assert attribution["router"] == "arrow"
    assert len(attribution["scores"]) == 2  # both adapters were scored
    assert attribution["adapters"][0]["id"] == attribution["scores"][0]["id"]
    # The same prompt, again: prototypes are cached, the decision is the same.
    again = chat(
        http,
        messages=[{"role": "user", "content": "Convert 7 km to metres."}],
        max_tokens=2,
        tessera={"router": "arrow"},
    )
    assert again.json()["tessera"]["adapters"] == attribution["adapters"]


# --- The live mixture -------------------------------------------------------------------------


def test_a_new_admission_is_served_within_a_second_and_a_suspension_stops_it(
    http, server, contributor, maintainer
):
    model = f"{contributor.username}/unit-conversion"
    assert chat(http, model=model).status_code == 404
    started = time.monotonic()
    version = admitted_version(contributor, slug="unit-conversion", prompts=UNITS, seed=4)
    admitted_at = time.monotonic()
    wait_until(lambda: chat(http, model=model, max_tokens=1).status_code == 200, timeout=1.0)
    served_after = time.monotonic() - admitted_at
    assert served_after < 1.0, f"served {served_after:.2f}s after admission"
    assert time.monotonic() - started < 30

    services.adapter_version_transition(
        version=version, to_status=Status.SUSPENDED, actor=maintainer, reason="Harmful output."
    )
    wait_until(lambda: chat(http, model=model, max_tokens=1).status_code == 404, timeout=1.0)
    assert model not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_an_adapter_made_private_after_admission_is_hidden_from_others_at_once(
    http, server, contributor, other_contributor
):
    """Edits change no mixture version; the next poll serves them all the same."""
    version = admitted_version(other_contributor, slug="shared", prompts=UNITS, seed=5)
    model = f"{other_contributor.username}/shared"
    wait_until(lambda: chat(http, model=model, max_tokens=1).status_code == 200, timeout=2.0)

    def listed() -> dict:
        return {m["id"]: m for m in http.get("/v1/models").json()["data"]}

    assert listed()[model]["tessera"]["license"] == "Apache-2.0"
    services.adapter_update(
        adapter=version.adapter, actor=other_contributor, license="MIT", title="Shared, renamed"
    )
    waited = wait_until(lambda: listed()[model]["tessera"]["license"] == "MIT", timeout=1.0)
    assert listed()[model]["tessera"]["title"] == "Shared, renamed"
    services.adapter_update(adapter=version.adapter, actor=other_contributor, visibility="private")
    waited = max(waited, wait_until(lambda: model not in listed(), timeout=1.0))
    assert waited < 1.0
    response = chat(http, model=model, max_tokens=1)
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"
    # Routing does not pick it for this key either, even for its own skill.
    routed = chat(http, messages=[{"role": "user", "content": UNITS[0]}], max_tokens=1)
    assert model not in [a["id"] for a in routed.json()["tessera"]["adapters"]]
    # Its owner's keys still reach it.
    own = services.api_token_create(user=other_contributor, name="own")[1]
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {own}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["tessera"]["adapters"][0]["license"] == "MIT"


# --- Errors, in OpenAI's shape -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        (
            {"messages": [{"role": "user", "content": "Hi"}]},
            400,
            "missing_required_parameter",
            "model",
        ),
        ({"model": "tessera"}, 400, "missing_required_parameter", "messages"),
        ({"model": "tessera", "messages": []}, 400, "invalid_value", "messages"),
        (
            {"model": "tessera", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "invalid_value",
            "messages.role",
        ),
        (
            {"model": "tessera", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "invalid_value",
            "temperature",
        ),
        (
            {"model": "tessera", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
            400,
            "invalid_value",
            "top_p",
        ),
        (
            {"model": "tessera", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {
                "model": "tessera",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 100000,
            },
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {"model": "tessera", "messages": [{"role": "user", "content": "x"}], "n": 2},
            400,
            "unsupported_parameter",
            "n",
        ),
        (
            {
                "model": "tessera",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            400,
            "unsupported_parameter",
            "tools",
        ),
        (
            {
                "model": "tessera",
                "messages": [{"role": "user", "content": "x"}],
                "stop": ["a", "b", "c", "d", "e"],
            },
            400,
            "invalid_value",
            "stop",
        ),
        (
            {
                "model": "tessera",
                "messages": [{"role": "user", "content": "x"}],
                "tessera": {"router": "magic"},
            },
            400,
            "invalid_value",
            "tessera.router",
        ),
        *[
            (
                {
                    "model": "tessera",
                    "messages": [{"role": "user", "content": "x"}],
                    "tessera": extension,
                },
                400,
                "invalid_value",
                param,
            )
            for extension, param in [
                ({"composition": "soup"}, "tessera.composition"),
                ({"composition": "topk", "k": 0}, "tessera.k"),
                ({"composition": "topk", "k": 17}, "tessera.k"),
                ({"composition": "topk", "k": 2.5}, "tessera.k"),
                ({"composition": "topk", "temperature": 0}, "tessera.temperature"),
                ({"composition": "arrow", "temperature": -1}, "tessera.temperature"),
            ]
        ],
        (
            {
                "model": "tessera",
                "messages": [{"role": "user", "content": "x"}],
                "tessera": {"colour": 1},
            },
            400,
            "unknown_parameter",
            "tessera.colour",
        ),
        (
            {"model": "nobody/nothing", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            "model",
        ),
        (
            {"model": "tessera", "messages": [{"role": "user", "content": "x" * 3000}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_generate_nothing(
    http, server, body, status, code, param
):
    before = server.runtime.scheduler.stats().completed
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"
    assert server.runtime.scheduler.stats().completed == before


# --- Compositions ---------------------------------------------------------------------------

UNITS_REQUEST = [{"role": "user", "content": "Convert 7 km to metres."}]
# Every adapter clears a threshold of -1, so both skills are candidates for every prompt.
EVERYONE = {"threshold": -1}


@pytest.mark.parametrize("method", ["topk", "logit"])
def test_the_openai_client_gets_a_mix_of_two_adapters_with_their_weights(client, skills, method):
    answer = client.chat.completions.create(
        model="tessera",
        messages=UNITS_REQUEST,
        max_tokens=6,
        temperature=0,
        extra_body={"tessera": {"composition": method, "k": 2, "temperature": 0.5, **EVERYONE}},
    )
    attribution = answer.model_extra["tessera"]
    assert attribution["composition"] == {"method": method, "k": 2, "temperature": 0.5}
    adapters = attribution["adapters"]
    assert [a["id"].split("/")[1] for a in adapters] == ["unit-conversion", "date-formatting"]
    assert sum(a["weight"] for a in adapters) == pytest.approx(1.0, abs=1e-3)
    # The router's better candidate leads the mix.
    assert adapters[0]["weight"] > adapters[1]["weight"] > 0
    assert answer.usage.completion_tokens >= 1


def test_the_learned_router_answers_like_the_embedding_router_until_it_is_trained(client, skills):
    def attribution(router):
        answer = client.chat.completions.create(
            model="tessera",
            messages=UNITS_REQUEST,
            max_tokens=4,
            temperature=0,
            extra_body={"tessera": {"router": router}},
        )
        return answer.model_extra["tessera"]

    learned, embedding = attribution("learned"), attribution("embedding")
    assert learned["router"] == "learned" and learned["reason"] == "no_learned_router"
    assert [a["id"] for a in learned["adapters"]] == [a["id"] for a in embedding["adapters"]]


def test_a_mix_of_one_adapter_answers_exactly_as_that_adapter_alone(client, skills):
    def text(extension):
        answer = client.chat.completions.create(
            model="tessera",
            messages=UNITS_REQUEST,
            max_tokens=8,
            temperature=0,
            extra_body={"tessera": extension},
        )
        return answer.choices[0].message.content

    assert text({"composition": "topk", "k": 1}) == text({"composition": "top1"})


def test_arrow_streams_with_the_openai_client_and_reports_the_shares_it_used(client, skills):
    chunks = list(
        client.chat.completions.create(
            model="tessera",
            messages=UNITS_REQUEST,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"tessera": {"composition": "arrow", "k": 1, **EVERYONE}},
        )
    )
    first = chunks[0].model_extra["tessera"]
    assert first["composition"]["method"] == "arrow"
    assert len(first["adapters"]) == 2
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    shares = [a["weight"] for a in last.model_extra["tessera"]["adapters"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert all(0 <= share <= 1 for share in shares)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tessera",
        messages=UNITS_REQUEST,
        max_tokens=6,
        temperature=0,
        extra_body={"tessera": {"composition": "arrow", "k": 1, **EVERYONE}},
    )
    assert text == whole.choices[0].message.content


def test_a_prompt_the_router_sends_to_the_base_model_stays_there_under_every_method(client, skills):
    for method in ("topk", "arrow", "logit"):
        answer = client.chat.completions.create(
            model="tessera",
            messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
            max_tokens=4,
            temperature=0,
            extra_body={"tessera": {"composition": method}},
        )
        attribution = answer.model_extra["tessera"]
        assert attribution["adapters"] == [] and attribution["reason"] == "below_threshold"


def test_a_composition_needs_the_mixture_and_merged_needs_a_build(http, skills, contributor):
    named = chat(
        http,
        model=f"{contributor.username}/unit-conversion",
        tessera={"composition": "topk", "k": 2},
    )
    assert named.status_code == 400
    assert error_of(named)["code"] == "composition_needs_mixture"
    # Not built: no such model (as /v1/models says), and no merged composition.
    response = chat(http, model="tessera-merged")
    assert response.status_code == 404, response.text
    assert (error_of(response)["code"], error_of(response)["param"]) == ("model_not_found", "model")
    response = chat(http, tessera={"composition": "merged"})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "merged_unavailable"


def test_the_merged_adapter_answers_as_its_own_model_once_built(http, client, server, skills):
    from routing.merging.services import merge_compute_now
    from routing.selectors import mixture_active

    merged = merge_compute_now(mixture=mixture_active())
    assert merged.status == "done", merged.reason
    wait_until(lambda: server.runtime.catalog.merged is not None, timeout=10)
    listed = {model.id: model for model in client.models.list().data}
    assert listed["tessera-merged"].model_extra["tessera"]["kind"] == "merged"
    for body in ({"model": "tessera-merged"}, {"tessera": {"composition": "merged"}}):
        response = chat(http, messages=UNITS_REQUEST, max_tokens=4, temperature=0, **body)
        assert response.status_code == 200, response.text
        attribution = response.json()["tessera"]
        assert attribution["composition"]["method"] == "merged"
        assert [a["id"] for a in attribution["adapters"]] == ["tessera-merged"]
        assert response.headers["x-tessera-composition"] == "merged"
    # Its answers are credited to the adapters merged into it, in equal shares.
    usage.usage_flush()
    units, dates = skills
    rows = {row.adapter_version_id: row for row in AdapterUsageDaily.objects.all()}
    assert rows[units.pk].requests == rows[dates.pk].requests == 2
    assert None not in rows  # not the base model's


def test_usage_credits_each_adapter_of_a_mix_its_share(http, server, skills):
    units, dates = skills
    response = chat(
        http,
        messages=UNITS_REQUEST,
        max_tokens=4,
        temperature=0,
        tessera={"composition": "topk", "k": 2, "temperature": 0.5, **EVERYONE},
    )
    assert response.status_code == 200, response.text
    usage.usage_flush()
    rows = {row.adapter_version_id: row for row in AdapterUsageDaily.objects.all()}
    total = response.json()["usage"]["prompt_tokens"]
    assert rows[units.pk].requests == rows[dates.pk].requests == 1
    assert rows[units.pk].prompt_tokens + rows[dates.pk].prompt_tokens == total
    assert rows[units.pk].prompt_tokens > rows[dates.pk].prompt_tokens


def test_a_body_that_is_not_json_or_too_large_is_refused(http, settings):
    response = http.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"
    response = http.post("/v1/chat/completions", content=b"[1, 2]")
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"
    settings.TESSERA_SERVING_MAX_BODY_BYTES = 1000
    response = chat(http, messages=[{"role": "user", "content": "x" * 2000}])
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    # Sent in chunks, with no Content-Length, and past Django's own in-memory cap.
    chunks = (b"x" * 65536 for _ in range(48))
    response = http.post("/v1/chat/completions", content=chunks)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


@pytest.fixture
def authentications(monkeypatch) -> list[str]:
    """The paths of the requests that reached authentication (and its database read)."""
    from routing.inference import auth

    seen: list[str] = []
    original = auth.authenticate

    async def spy(request):
        seen.append(request.path)
        return await original(request)

    monkeypatch.setattr(auth, "authenticate", spy)
    return seen


def test_a_huge_body_with_a_bad_key_gets_413_before_authentication(
    server, authentications, settings
):
    settings.TESSERA_SERVING_MAX_BODY_BYTES = 64 * 1024
    url = f"{server.url}/v1/chat/completions"
    wrong = {"Authorization": "Bearer tsr_abc_def"}
    declared = httpx.post(url, content=b"x" * (1024 * 1024), headers=wrong, timeout=30)
    chunked = httpx.post(url, content=(b"x" * 65536 for _ in range(16)), headers=wrong)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = error_of(response)
        assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")
        assert "65536 bytes" in error["message"]
    assert authentications == []  # no key was looked up
    # The same key with a small body is looked up, and refused.
    assert httpx.post(url, json={}, headers=wrong).status_code == 401
    assert authentications == ["/v1/chat/completions"]


def raw_exchange(server, head: bytes, body_parts: list[bytes], timeout: float = 5.0) -> bytes:
    """Send a request's head and some body bytes over a plain socket, then read what the
    server answers without sending the rest (it must not wait for it)."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_an_oversized_body_is_refused_before_it_is_read(server, authentications, settings):
    settings.TESSERA_SERVING_MAX_BODY_BYTES = 64 * 1024
    # A gigabyte announced, nothing sent: the answer comes from the length alone.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer tsr_abc_def\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = raw_exchange(server, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    # Chunked, without an end: refused once the cap is passed, the rest never awaited.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer tsr_abc_def\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    answer = raw_exchange(server, head, [chunk] * 3)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert authentications == []


def test_missing_wrong_and_revoked_keys_are_refused(server, contributor):
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "tessera", "messages": [{"role": "user", "content": "Hi"}]}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer tsr_abc_def"})
    assert wrong.status_code == 401 and error_of(wrong)["type"] == "authentication_error"
    token, key = services.api_token_create(user=contributor, name="soon revoked")
    services.api_token_revoke(token=token, actor=contributor)
    revoked = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        revoked.models.list()


def test_unknown_endpoints_and_methods_answer_in_the_same_shape(http):
    response = http.get("/v1/embeddings")
    assert response.status_code == 404 and error_of(response)["code"] == "unknown_url"
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


# --- Limits --------------------------------------------------------------------------------


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(server, contributor):
    token, key = services.api_token_create(user=contributor, name="slow")
    ApiToken.objects.filter(pk=token.pk).update(requests_per_minute=2)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    assert raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(raised.value.response.headers["Retry-After"]) <= 60


def test_a_full_queue_answers_503_with_retry_after(http, server):
    server.runtime.scheduler.max_queue = 0
    response = chat(http, max_tokens=1)
    assert response.status_code == 503
    assert error_of(response)["code"] == "server_overloaded"
    assert int(response.headers["Retry-After"]) >= 1


# --- Cancellation and usage -------------------------------------------------------------------


def test_a_client_that_goes_away_mid_stream_stops_its_row(server, key, monkeypatch):
    engine = server.runtime.engine
    cancelled: list[bool] = []
    original = engine.cancel

    def spy(request_id: str) -> bool:
        cancelled.append(original(request_id))
        return cancelled[-1]

    monkeypatch.setattr(engine, "cancel", spy)
    # 20 ms per forward: the 200 tokens would take 4 s, far longer than the client stays.
    forward = engine.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
    body = {
        "model": "base",
        "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 200,
        "stream": True,
        "stop": ["never-appears-in-output-xyz"],
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        # The role chunk, then the first token's: the row is in the engine by then.
        events = [line for line in itertools.islice(lines, 4) if line]
        assert len(events) == 2 and all(line.startswith("data: ") for line in events)
    # The connection is closed after the first event: the row is cancelled while it runs
    # (True: the engine still had it), and the engine is free long before 4 s.
    closed = time.monotonic()
    wait_until(lambda: True in cancelled, timeout=3)
    wait_until(lambda: server.runtime.scheduler.stats().running == 0, timeout=3)
    assert time.monotonic() - closed < 3.5


def test_usage_is_counted_per_key_and_per_adapter_without_touching_the_database(
    client, skills, contributor
):
    units, _ = skills
    before = KeyUsageDaily.objects.count() + AdapterUsageDaily.objects.count()
    answers = [
        client.chat.completions.create(
            model=f"{contributor.username}/unit-conversion",
            messages=[{"role": "user", "content": "Convert 1 km to metres."}],
            max_tokens=3,
        )
        for _ in range(2)
    ]
    # Nothing is written per request: the counters wait in Redis for the flush.
    assert KeyUsageDaily.objects.count() + AdapterUsageDaily.objects.count() == before
    usage.usage_flush()
    tokens = sum(a.usage.completion_tokens for a in answers)
    row = AdapterUsageDaily.objects.get(adapter_version=units)
    assert (row.requests, row.completion_tokens) == (2, tokens)
    key_row = KeyUsageDaily.objects.get(api_token__user=contributor)
    assert key_row.requests == 2
    assert key_row.prompt_tokens == sum(a.usage.prompt_tokens for a in answers)


def test_concurrent_requests_are_batched_together(http, server):
    results: list[httpx.Response] = []

    def one(i: int) -> None:
        results.append(chat(http, model="base", max_tokens=16, seed=i, temperature=0.9))

    before = server.runtime.scheduler.stats()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = server.runtime.scheduler.stats()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert after.completed - before.completed == 8
    assert after.batches - before.batches < 8  # some requests shared a batch
    assert len({json.dumps(r.json()["choices"]) for r in results}) > 1  # seeds differ


def test_a_client_expecting_100_continue_gets_the_413_and_sends_nothing(server, settings):
    settings.TESSERA_SERVING_MAX_BODY_BYTES = 64 * 1024
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    answer = raw_exchange(server, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer
