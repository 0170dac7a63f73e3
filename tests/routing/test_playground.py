"""The portal's playground against a real inference server (tests/routing/conftest): the
relay streams the API's events unchanged under ASGI and WSGI, refuses bad fields before
anything is sent, keeps the session's key server-side, and says what went wrong in words."""

from __future__ import annotations

import json
import socket

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.cache import cache
from django.test import AsyncClient, Client
from django.utils import timezone
from django.utils.html import escape

from contributions import services
from contributions.models import ApiToken
from routing.playground import forms as playground_forms
from routing.playground import keys, upstream
from tests.routing.conftest import DATES_PROMPTS, UNITS_PROMPTS, admitted_version
from tests.routing.test_inference_api import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

STREAM = "/playground/stream/"
PAGE = "/playground/"
UNITS_PROMPT = "Convert 7 km to metres."


@pytest.fixture
def inference(server, settings):
    """The portal pointed at the live inference server."""
    settings.TESSERA_INFERENCE_URL = f"{server.url}/v1"
    return server


@pytest.fixture
def skills(contributor, inference):
    units = admitted_version(contributor, slug="unit-conversion", prompts=UNITS_PROMPTS, seed=1)
    dates = admitted_version(contributor, slug="date-formatting", prompts=DATES_PROMPTS, seed=2)
    wait_until(lambda: len(inference.runtime.catalog) == 2)
    return units, dates


@pytest.fixture
def browser(contributor) -> Client:
    client = Client()
    client.force_login(contributor)
    return client


def events(raw: bytes) -> list:
    """The SSE data payloads, JSON-decoded ("[DONE]" kept as is)."""
    out = []
    for event in raw.decode().split("\n\n"):
        data = "".join(line[6:] for line in event.splitlines() if line.startswith("data: "))
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def session_key_of(client) -> str:
    return client.session[keys.SESSION_KEY]["key"]


def stream_with_async_client(user, data: dict) -> tuple[int, dict, bytes, str]:
    """POST through Django's ASGI handler; returns (status, headers, body, session key)."""

    async def go():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post(STREAM, data)
        body = b""
        if response.streaming:
            async for chunk in response.streaming_content:
                body += chunk
        else:
            body = response.content
        session = await sync_to_async(lambda: client.session[keys.SESSION_KEY]["key"])()
        return response.status_code, dict(response.headers), body, session

    return async_to_sync(go)()


# --- Streaming ----------------------------------------------------------------------------


def test_a_signed_in_users_stream_relays_the_answer_with_its_attribution(contributor, skills):
    units, _ = skills
    status, headers, body, key = stream_with_async_client(
        contributor, {"prompt": UNITS_PROMPT, "max_tokens": "8"}
    )
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Accel-Buffering"] == "no"
    chunks = events(body)
    assert chunks[-1] == "[DONE]"
    first = chunks[0]
    assert first["object"] == "chat.completion.chunk"
    assert [a["id"] for a in first["tessera"]["adapters"]] == [
        f"{units.adapter.owner.username}/unit-conversion"
    ]
    assert first["tessera"]["adapters"][0]["weight"] == 1.0
    assert first["tessera"]["scores"][0]["score"] >= first["tessera"]["threshold"]
    finishing = [c for c in chunks[1:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["tessera"]["adapters"]
    assert chunks[-2]["usage"]["completion_tokens"] >= 1  # include_usage, set by the portal
    # The key is a real one of the user's, made for the session and kept server-side only.
    assert key.startswith("tsr_") and key.encode() not in body
    token = ApiToken.objects.get(user=contributor, name=keys.KEY_LABEL)
    assert (token.requests_per_minute, token.tokens_per_day) == (10, 20_000)
    assert not cache.get(f"tessera:playground:busy:{contributor.pk}")  # released at the end


def test_the_stream_under_wsgi_and_the_routing_choices_reach_the_api(browser, skills):
    response = browser.post(
        STREAM,
        {
            "prompt": UNITS_PROMPT,
            "max_tokens": "6",
            "router": "arrow",
            "composition": "topk",
            "k": "2",
        },
    )
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    first = events(body)[0]["tessera"]
    assert first["router"] == "arrow"
    assert first["composition"]["method"] == "topk" and first["composition"]["k"] == 2
    assert session_key_of(browser).encode() not in body
    # One adapter by name: the explicit router, that adapter alone.
    named = browser.post(STREAM, {"prompt": "Hello", "model": "owner/date-formatting"})
    chunks = events(b"".join(named.streaming_content))
    assert chunks[0]["tessera"]["router"] == "explicit"
    assert [a["id"] for a in chunks[0]["tessera"]["adapters"]] == ["owner/date-formatting"]


def test_the_page_lists_the_served_models_and_never_shows_the_key(browser, skills):
    response = browser.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'value="owner/unit-conversion"' in html and 'value="base"' in html
    assert 'data-stream-url="/playground/stream/"' in html
    assert 'aria-live="polite"' in html
    key = session_key_of(browser)
    assert key not in html and "tsr_" not in html
    assert response["Cache-Control"] == "no-store"
    # The same session keeps its key; no second one is made.
    browser.get(PAGE)
    assert session_key_of(browser) == key
    assert ApiToken.objects.filter(name=keys.KEY_LABEL).count() == 1


def test_without_javascript_the_form_posts_and_the_page_shows_the_whole_answer(
    browser, skills, monkeypatch
):
    answers = []  # what the inference API sent back, to compare the page with
    complete = upstream.complete

    def recorded(key, body):
        answers.append(complete(key, body))
        return answers[-1]

    monkeypatch.setattr(upstream, "complete", recorded)
    response = browser.post(PAGE, {"prompt": UNITS_PROMPT, "max_tokens": "6"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Adapters that answered" in html
    assert "<code>owner/unit-conversion</code>" in html
    assert "Routing scores" in html
    [result] = answers
    answer = html.split('id="playground-answer"')[1].split(">", 1)[1].split("</div>")[0]
    # The answer's whole text as the API gave it (the tiny random model's words, which may
    # be blank: what is checked is that the page shows them, escaped, and their count).
    assert answer == escape(result["choices"][0]["message"]["content"])
    usage = result["usage"]
    assert usage["completion_tokens"] >= 1
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} answer" in html
    assert session_key_of(browser) not in html


# --- Refusals before anything is sent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("router", "nearest", "Select a valid choice"),
        ("composition", "best", "Select a valid choice"),
        ("k", "0", "greater than or equal to 1"),
        ("k", "17", "less than or equal to 16"),
        ("prompt", "x" * (playground_forms.PROMPT_MAX_CHARS + 1), "at most 4000 characters"),
        ("prompt", "", "This field is required"),
        ("max_tokens", "100000", "less than or equal to 256"),
        ("model", "../../admin", "Choose a model from the list"),
    ],
)
def test_bad_fields_are_refused_with_a_400_and_nothing_is_sent(
    browser, contributor, monkeypatch, field, value, words
):
    def never(*args, **kwargs):
        raise AssertionError("the inference server was called")

    monkeypatch.setattr(upstream, "open_stream", never)
    monkeypatch.setattr(upstream, "complete", never)
    data = {"prompt": "Hello", field: value}
    response = browser.post(STREAM, data)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_form" and words in error["message"]
    assert not ApiToken.objects.filter(user=contributor).exists()  # no key made either
    # The page without JavaScript says it next to the field, with a 400 too.
    page = browser.post(PAGE, data)
    assert page.status_code == 400
    assert words in page.content.decode()


def test_the_allowed_lists_are_the_registered_routers_and_compositions():
    from routing.compose import METHODS
    from routing.router import ROUTERS

    assert set(playground_forms.ROUTERS) == set(ROUTERS)
    assert playground_forms.COMPOSITIONS == METHODS


# --- Anonymous visitors --------------------------------------------------------------------------


def test_anonymous_visitors_see_what_it_does_and_are_asked_to_sign_in(db, monkeypatch):
    monkeypatch.setattr(upstream, "open_stream", lambda *a, **k: pytest.fail("sent"))
    client = Client()
    page = client.get(PAGE)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Sign in to try it" in html and "/login/?next=/playground/" in html
    assert 'id="playground-form"' not in html
    refused = client.post(STREAM, {"prompt": "Hello"})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Sign in to use the playground."
    fallback = client.post(PAGE, {"prompt": "Hello"})
    assert fallback.status_code == 302 and "/login/" in fallback["Location"]
    assert not ApiToken.objects.exists()


def test_the_stream_needs_the_csrf_token(contributor, inference):
    client = Client(enforce_csrf_checks=True)
    client.force_login(contributor)
    assert client.post(STREAM, {"prompt": "Hello"}).status_code == 403


# --- Errors from the inference API, in words ------------------------------------------------


def test_the_api_s_refusals_and_an_unreachable_server_are_said_in_words(browser, skills, settings):
    unknown = browser.post(STREAM, {"prompt": "Hello", "model": "owner/no-such-adapter"})
    assert unknown.status_code == 404
    message = unknown.json()["error"]["message"]
    assert message.startswith("The inference API refused the request:")
    assert "does not exist" in message
    mixed = browser.post(
        STREAM, {"prompt": "Hi", "model": "owner/unit-conversion", "k": "3", "composition": "topk"}
    )
    assert mixed.status_code == 400 and "refused the request" in mixed.json()["error"]["message"]

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        settings.TESSERA_INFERENCE_URL = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    down = browser.post(STREAM, {"prompt": "Hello"})
    assert down.status_code == 502
    assert down.json()["error"]["message"].startswith("The inference server cannot be reached")
    page = browser.post(PAGE, {"prompt": "Hello"})
    assert "The inference server cannot be reached" in page.content.decode()
    assert not cache.get(f"tessera:playground:busy:{browser.session['_auth_user_id']}")


def test_the_keys_rate_limit_applies_and_is_said_in_words(browser, inference, settings):
    settings.TESSERA_API_REQUESTS_PER_MINUTE = 1  # the playground key gets min(10, this)
    first = browser.post(STREAM, {"prompt": "Hello", "max_tokens": "2"})
    assert first.status_code == 200
    b"".join(first.streaming_content)
    second = browser.post(STREAM, {"prompt": "Hello", "max_tokens": "2"})
    assert second.status_code == 429
    assert second.json()["error"]["message"].startswith("A limit of your playground key")
    assert int(second["Retry-After"]) >= 1


def test_a_revoked_playground_key_is_replaced_and_one_answer_runs_at_a_time(
    browser, contributor, inference
):
    browser.get(PAGE)
    old = ApiToken.objects.get(user=contributor, name=keys.KEY_LABEL)
    services.api_token_revoke(token=old, actor=contributor)
    response = browser.post(STREAM, {"prompt": "Hello", "max_tokens": "2"})
    assert response.status_code == 200
    assert events(b"".join(response.streaming_content))[-1] == "[DONE]"
    fresh = ApiToken.objects.get(user=contributor, name=keys.KEY_LABEL, revoked_at=None)
    assert fresh.pk != old.pk

    cache.set(f"tessera:playground:busy:{contributor.pk}", True, 60)  # another tab streaming
    busy = browser.post(STREAM, {"prompt": "Hello"})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"


def test_keys_expire_and_a_day_allows_only_a_few(browser, contributor, inference):
    browser.get(PAGE)
    first = ApiToken.objects.get(user=contributor, name=keys.KEY_LABEL)
    # Past its lifetime: the next request revokes it and makes another.
    ApiToken.objects.filter(pk=first.pk).update(created_at=first.created_at - keys.KEY_LIFETIME)
    browser.get(PAGE)
    first.refresh_from_db()
    assert first.revoked_at is not None
    assert ApiToken.objects.filter(user=contributor, name=keys.KEY_LABEL, revoked_at=None).count()
    # The day's allowance used up (by other browser sessions): a new session gets none.
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    made = ApiToken.objects.filter(user=contributor, name=keys.KEY_LABEL, created_at__gte=midnight)
    while made.count() < keys.KEYS_PER_DAY:
        services.api_token_create(user=contributor, name=keys.KEY_LABEL)
    session = browser.session
    del session[keys.SESSION_KEY]
    session.save()
    refused = browser.post(STREAM, {"prompt": "Hello"})
    assert refused.status_code == 429
    assert "too many sessions" in refused.json()["error"]["message"]
    page = browser.get(PAGE)
    assert "too many sessions" in page.content.decode()
