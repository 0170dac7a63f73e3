"""HTTP clients for the two APIs, with their errors turned into ``ApiError``.

The REST API answers every error as ``{"error": {"code", "message", "details"}}``; the
inference API uses OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Both carry a
code and a sentence meant for people, which the command line shows as it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

USER_AGENT = "tessera-cli/0.1"
TIMEOUT = httpx.Timeout(30.0, read=120.0)
# An upload of the largest allowed adapter can take a while on a slow line.
UPLOAD_TIMEOUT = httpx.Timeout(30.0, read=600.0, write=600.0)
# Downloads are streamed in chunks this large; TIMEOUT's read limit applies to each chunk,
# so a slow line only has to keep bytes coming.
DOWNLOAD_CHUNK = 1024 * 1024
MAX_THROTTLE_WAITS = 5
# A 429 that asks for longer than this (an hourly upload limit) is shown at once, not slept.
MAX_THROTTLE_WAIT_SECONDS = 60.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message


def error_from(response: httpx.Response) -> ApiError:
    """The API's own error, or a plain description when the body is not one of its errors
    (a proxy's HTML page, an empty 502)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        details = error.get("details")
        return ApiError(
            response.status_code,
            str(error.get("code") or error.get("type") or ""),
            str(error["message"]),
            details if isinstance(details, dict) else {},
        )
    reason = response.reason_phrase or "error"
    return ApiError(
        response.status_code,
        f"http_{response.status_code}",
        f"{response.request.method} {response.request.url} answered {response.status_code} "
        f"{reason}.",
    )


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


def _connection_error(url: str, exc: httpx.TransportError) -> ApiError:
    return ApiError(0, "", f"Cannot reach {url}: {exc}.")


def platform_base(url: str) -> str:
    """The platform's root from what the user typed: a trailing ``/api/v1`` is dropped, so
    both ``https://tessera.example`` and ``https://tessera.example/api/v1/`` work."""
    url = url.strip().rstrip("/")
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    if not urlsplit(url).scheme:
        url = f"http://{url}"
    return url


class _Client:
    """An HTTP client of one of the two APIs, authenticated with a bearer token."""

    def __init__(self, url: str, token: str, *, transport: httpx.BaseTransport | None = None):
        self.url = url
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT},
            timeout=TIMEOUT,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Platform(_Client):
    """The REST API."""

    def __init__(self, url: str, token: str, *, transport: httpx.BaseTransport | None = None):
        super().__init__(platform_base(url), token, transport=transport)
        self.api = f"{self.url}/api/v1/"

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The response of ``/api/v1/<path>`` (or an absolute URL the API gave, like
        ``next``), its error raised as ApiError. A 429 is waited out as its ``Retry-After``
        says, a few times."""
        url = urljoin(self.api, path)
        for _ in range(MAX_THROTTLE_WAITS):
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise _connection_error(self.url, exc) from exc
            if response.status_code == 429:
                wait = _retry_after(response, 5.0)
                if wait > MAX_THROTTLE_WAIT_SECONDS:
                    break
                time.sleep(wait)
                continue
            break
        if response.is_error:
            raise error_from(response)
        return response

    def request(self, method: str, path: str, **kwargs) -> Any:
        """JSON from ``/api/v1/<path>``."""
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def get_bytes(self, path: str) -> bytes:
        """The body of a GET that answers something else than JSON (a JSONL download)."""
        return self._send("GET", path).content

    def download(self, path: str, write: Callable[[bytes], Any]) -> None:
        """Stream a GET of ``/api/v1/<path>`` into ``write``, chunk by chunk, never holding
        the whole body (the base model's weights are hundreds of MB)."""
        url = urljoin(self.api, path)
        try:
            for _ in range(MAX_THROTTLE_WAITS):
                with self.http.stream("GET", url) as response:
                    if response.status_code == 429:
                        time.sleep(_retry_after(response, 5.0))
                        continue
                    if response.is_error:
                        response.read()
                        raise error_from(response)
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                        write(chunk)
                    return
        except httpx.TransportError as exc:
            raise _connection_error(self.url, exc) from exc
        raise ApiError(429, "throttled", f"{url} kept answering 429 Too Many Requests.")

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: dict | None = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    # --- The calls the commands make -------------------------------------------------------

    def me(self) -> dict:
        return self.get("me/")

    def adapters(self) -> list[dict]:
        """Every adapter the token may see (its own; a maintainer's: everyone's), across
        the API's pages."""
        found: list[dict] = []
        page: Any = self.get("adapters/", limit=100)
        while True:
            found.extend(page["results"])
            if not page.get("next"):
                return found
            page = self.get(page["next"])

    def own_adapter(self, owner: str, slug: str) -> dict | None:
        """The caller's adapter with that slug, in detail (versions and all), or None."""
        for adapter in self.adapters():
            if adapter["owner"] == owner and adapter["slug"] == slug:
                return self.get(f"adapters/{adapter['id']}/")
        return None

    def base_model(self) -> dict:
        """The active base model's files: names, sizes, sha256 (``GET base-model/``)."""
        return self.get("base-model/")

    def download_base_model_file(self, name: str, write: Callable[[bytes], Any]) -> None:
        self.download(f"base-model/files/{quote(name)}", write)

    def suites(self) -> list[dict]:
        return self.get("suites/")

    def upload(self, adapter_id: int, files: list[tuple[str, bytes]]) -> dict:
        """A new version: every file a part of the multipart field ``files``."""
        parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
        return self.request(
            "POST", f"adapters/{adapter_id}/versions/", files=parts, timeout=UPLOAD_TIMEOUT
        )


class Inference(_Client):
    """The OpenAI-compatible inference API."""

    def __init__(self, url: str, token: str, *, transport: httpx.BaseTransport | None = None):
        super().__init__(url.rstrip("/"), token, transport=transport)

    def stream_chat(self, body: dict) -> Iterator[dict]:
        """The chunks of a streamed chat completion, parsed, as the server sends them. An
        error the server sends mid-stream (an ``error`` event) is raised as ApiError."""
        url = f"{self.url}/chat/completions"
        try:
            with self.http.stream("POST", url, json={**body, "stream": True}) as response:
                if response.is_error:
                    response.read()
                    raise error_from(response)
                for data in server_sent_data(response.iter_lines()):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    error = chunk.get("error") if isinstance(chunk, dict) else None
                    if isinstance(error, dict):
                        raise ApiError(
                            response.status_code,
                            str(error.get("code") or error.get("type") or ""),
                            str(error.get("message") or "The stream ended with an error."),
                        )
                    yield chunk
        except httpx.TransportError as exc:
            raise _connection_error(self.url, exc) from exc


def server_sent_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines, as the
    SSE format says; comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
