"""The playground's only ways to the inference server: POST /chat/completions and
GET /models, at TESSERA_INFERENCE_URL, with the session's key.

The URLs are fixed here and the body comes from the validated form, so a visitor cannot make
the portal reach any other path or host. Failures become ``UpstreamError``: a status for the
portal's own response and a sentence for people, made from the API's OpenAI-shaped error.

A synchronous client: the portal runs under WSGI (gunicorn's sync workers, runserver), where
Django would buffer an async iterator to its end before sending a byte; a sync iterator
streams there, and under ASGI the views hand it over chunk by chunk (views.relay_async).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from django.conf import settings

# Connecting must fail fast (the server is down); a streamed answer may pause between
# tokens while the server's batch is busy, and a whole answer takes as long as it takes.
TIMEOUT = httpx.Timeout(90.0, connect=3.0)
MODELS_TIMEOUT = httpx.Timeout(3.0)


@dataclass
class UpstreamError(Exception):
    status: int  # what the portal answers with
    message: str  # in words, for the page
    code: str
    retry_after: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "code": self.code, "status": self.status}}


def _url(path: str) -> str:
    return f"{settings.TESSERA_INFERENCE_URL}/{path}"


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}


def unreachable() -> UpstreamError:
    return UpstreamError(
        502,
        "The inference server cannot be reached right now. Try again in a minute.",
        code="inference_unreachable",
    )


def error_from(response: httpx.Response) -> UpstreamError:
    """The API's error in words; 5xx become a gateway error of the portal's."""
    status = response.status_code
    try:
        error = response.json()["error"]
        detail, code = str(error["message"]), str(error.get("code") or "error")
    except (ValueError, KeyError, TypeError):
        detail, code = "", "inference_error"
    retry_after = response.headers.get("Retry-After")
    if status == 401:
        return UpstreamError(
            502, "The inference API refused the playground's key; reload the page.", code
        )
    if status == 429:
        wait = f" Try again in {retry_after} s." if retry_after else ""
        return UpstreamError(
            429, f"A limit of your playground key was reached: {detail}{wait}", code, retry_after
        )
    if 400 <= status < 500:
        return UpstreamError(status, f"The inference API refused the request: {detail}", code)
    if status == 503:
        return UpstreamError(
            503,
            f"The inference server is busy or starting: {detail or 'try again shortly.'}",
            code,
            retry_after,
        )
    return UpstreamError(
        502,
        f"The inference server failed to answer (HTTP {status}). {detail}".strip(),
        code,
    )


@dataclass
class Stream:
    """An open event stream from the API; ``chunks()`` relays it unchanged, then closes."""

    client: httpx.Client
    response: httpx.Response

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.response.iter_bytes()
        except httpx.HTTPError:
            # Not the API's own event: the connection broke mid-answer. Said in the same
            # OpenAI shape the API uses for its mid-stream failures.
            cut = {
                "error": {
                    "message": "The answer was cut off: the inference server stopped responding.",
                    "code": "inference_unreachable",
                }
            }
            yield f"data: {json.dumps(cut)}\n\n".encode()
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()
        self.client.close()


def open_stream(key: str, body: dict) -> Stream:
    client = httpx.Client(timeout=TIMEOUT)
    try:
        request = client.build_request(
            "POST", _url("chat/completions"), json=body, headers=_headers(key)
        )
        response = client.send(request, stream=True)
    except httpx.HTTPError:
        client.close()
        raise unreachable() from None
    if response.status_code != 200:
        try:
            response.read()
            raise error_from(response)
        finally:
            response.close()
            client.close()
    return Stream(client=client, response=response)


def complete(key: str, body: dict) -> dict:
    """A whole answer (the page without JavaScript)."""
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.post(_url("chat/completions"), json=body, headers=_headers(key))
    except httpx.HTTPError:
        raise unreachable() from None
    if response.status_code != 200:
        raise error_from(response)
    return response.json()


def models(key: str) -> list[dict] | None:
    """What the key may ask for, or None when the server does not answer in time."""
    try:
        with httpx.Client(timeout=MODELS_TIMEOUT) as client:
            response = client.get(_url("models"), headers=_headers(key))
        response.raise_for_status()
        return list(response.json()["data"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
