"""The inference API's body cap, enforced in ASGI before Django sees the request.

Django's ASGI handler reads a request's whole body (spooling it to disk past
FILE_UPLOAD_MAX_MEMORY_SIZE) before any view runs, so a cap checked in a view comes after
the bytes were taken, and after authentication's database read. Here, in front of the
handler, a body declared larger than TESSERA_SERVING_MAX_BODY_BYTES is refused from its
Content-Length before one byte of it is read; one sent without a length (chunked) is
counted as it arrives and refused as soon as it passes the cap, the rest left unread. The
body that fits is handed on to Django whole, in one message.

Either refusal is a 413 in OpenAI's error shape with ``Connection: close``: the unread
remainder of the body would otherwise be taken for the next request on the connection.
Before the connection closes, what the client is still sending is read and dropped for a
moment (at most LINGER_BYTES, LINGER_SECONDS), as nginx's lingering close does: a socket
closed with unread bytes in it is reset, and a reset can reach the client before it reads
the 413, which it then never sees. Nothing of it is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from routing.inference.errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 1.0


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


class BodyLimit:
    """ASGI middleware: bodies over ``limit()`` bytes get a 413 before ``app`` runs. The
    limit is read per request, so a settings change is seen at once."""

    def __init__(self, app: App, *, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # A client waiting for "100 Continue" sends nothing more: no need to linger
            # (and asking the server for the body would send it that 100 after the 413).
            await _refuse(send, receive, limit, more=not _expects_continue(scope))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(send, receive, limit, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            # The body once, then the server's own messages (Django listens for the
            # client's disconnect while it streams an answer).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, or None when there is none or it is no plain number (the
    bytes are counted then). The HTTP server already refuses contradictory lengths."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.strip()
            if not text.isdigit():
                return None
            # Past 18 digits it is larger than any cap (and int() refuses 4300+ digits).
            return int(text) if len(text) <= 18 else 10**18
    return None


def _expects_continue(scope: Scope) -> bool:
    return any(
        name.lower() == b"expect" and value.strip().lower() == b"100-continue"
        for name, value in scope.get("headers", ())
    )


async def _refuse(send: Send, receive: Receive, limit: int, *, more: bool = True) -> None:
    body = json.dumps(too_large(limit).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    # The answer goes out whole now; the connection closes with the last (empty) message.
    await send({"type": "http.response.body", "body": body, "more_body": True})
    if more:
        await _linger(receive)
    await send({"type": "http.response.body", "body": b""})


async def _linger(receive: Receive) -> None:
    """Read and drop what the client still sends, within LINGER_BYTES and LINGER_SECONDS."""
    deadline = time.monotonic() + LINGER_SECONDS
    dropped = 0
    while dropped < LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
