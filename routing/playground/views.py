"""The playground page and its streaming endpoint. HTTP only: the form checks the fields,
``keys`` holds the session's key, ``upstream`` talks to the inference server.

Signing in is required to ask anything. Usage, limits and quotas belong to API keys, and
keys to people: a shared anonymous key would let one visitor spend everyone's quota and
would make abuse untraceable. Anonymous visitors get the page, which explains what it does
and asks them to sign in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.contrib.auth.views import redirect_to_login
from django.core.cache import cache
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods, require_POST

from routing.playground import keys, upstream
from routing.playground.forms import PlaygroundForm
from tessera.errors import DomainError

# One answer at a time per person: a stream holds a portal worker while it lasts.
BUSY_SECONDS = 300


@require_http_methods(["GET", "POST"])
def playground(request: HttpRequest) -> HttpResponse:
    """The page; its form also works without JavaScript, answering here in one piece."""
    if not request.user.is_authenticated:
        if request.method == "POST":
            return redirect_to_login(request.get_full_path())
        return _page(request, {"form": None})
    context: dict = {"error": None, "result": None}
    try:
        key = keys.session_key(request)
    except DomainError as exc:
        key = None
        context["error"] = exc.message
    form = PlaygroundForm(
        request.POST if request.method == "POST" else None,
        models=upstream.models(key) if key else None,
    )
    context["form"] = form
    if key and form.is_bound and form.is_valid():
        try:
            context["result"] = _answer(request, key, form.request_body(stream=False))
        except upstream.UpstreamError as exc:
            context["error"] = exc.message
    status = 400 if form.is_bound and form.errors else 200
    return _page(request, context, status=status)


def _page(request: HttpRequest, context: dict, status: int = 200) -> HttpResponse:
    result = context.get("result")
    if result:
        context["answer"] = result["choices"][0]["message"]["content"]
        context["attribution"] = result.get("tessera")
        context["usage"] = result.get("usage")
    response = render(request, "routing/playground.html", context, status=status)
    response["Cache-Control"] = "no-store"
    return response


def _answer(request: HttpRequest, key: str, body: dict) -> dict:
    with _one_at_a_time(request):
        try:
            return upstream.complete(key, body)
        except upstream.UpstreamError as exc:
            if exc.code != "invalid_api_key":
                raise
            return upstream.complete(keys.session_key(request, renew=True), body)


@require_POST
def stream(request: HttpRequest) -> HttpResponse:
    """The answer as the inference API's server-sent events, relayed unchanged; refusals
    as JSON ``{"error": {"message", "code", "status"}}`` with a 4xx or 5xx status."""
    if not request.user.is_authenticated:
        return _refuse(401, "Sign in to use the playground.", "login_required")
    form = PlaygroundForm(request.POST)
    if not form.is_valid():
        return _refuse(400, form.error_message(), "invalid_form")
    try:
        key = keys.session_key(request)
    except DomainError as exc:
        return _refuse(429, exc.message, exc.code)
    busy = _busy_key(request)
    if not cache.add(busy, True, timeout=BUSY_SECONDS):
        return _refuse(429, "An answer is still on its way; wait for it or stop it.", "busy")
    body = form.request_body(stream=True)
    try:
        try:
            opened = upstream.open_stream(key, body)
        except upstream.UpstreamError as exc:
            if exc.code != "invalid_api_key":
                raise
            # Revoked on the tokens page, or expired: a new key, once.
            opened = upstream.open_stream(keys.session_key(request, renew=True), body)
    except upstream.UpstreamError as exc:
        cache.delete(busy)
        response = JsonResponse(exc.body(), status=exc.status)
        if exc.retry_after:
            response["Retry-After"] = exc.retry_after
        return response
    relay = Relay(opened, busy)
    content = AsyncRelay(relay) if isinstance(request, ASGIRequest) else relay
    response = StreamingHttpResponse(content, content_type="text/event-stream; charset=utf-8")
    # As the inference API sends them: nothing between here and the browser may hold
    # events back or keep a copy.
    response["Cache-Control"] = "no-cache, no-store"
    response["X-Accel-Buffering"] = "no"
    return response


class Relay:
    """The API's event stream, chunk by chunk as it arrives. Django calls ``close()`` when
    the response ends, also when the browser left before the first chunk: that closes the
    connection upstream (the API then stops the answer) and frees the busy mark."""

    def __init__(self, opened: upstream.Stream, busy: str) -> None:
        self._opened = opened
        self._chunks = opened.chunks()
        self._busy = busy
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.close()
        self._opened.close()
        cache.delete(self._busy)


class AsyncRelay:
    """Under ASGI: Django would read a sync iterator to its end before sending anything,
    so each chunk is read in a thread as it arrives. No ``__iter__``: Django would take it."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = sync_to_async(next, thread_sensitive=False)
        while (chunk := await read(self._relay, None)) is not None:
            yield chunk

    def close(self) -> None:
        self._relay.close()


class _one_at_a_time:
    def __init__(self, request: HttpRequest) -> None:
        self.key = _busy_key(request)

    def __enter__(self) -> None:
        if not cache.add(self.key, True, timeout=BUSY_SECONDS):
            raise upstream.UpstreamError(
                429, "An answer is still on its way; wait for it to finish.", "busy"
            )

    def __exit__(self, *exc_info) -> None:
        cache.delete(self.key)


def _busy_key(request: HttpRequest) -> str:
    return f"tessera:playground:busy:{request.user.pk}"


def _refuse(status: int, message: str, code: str) -> JsonResponse:
    return JsonResponse(
        {"error": {"message": message, "code": code, "status": status}}, status=status
    )
