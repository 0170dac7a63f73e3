"""One completion request's way in: authentication, limits, the body, the prompt's tokens,
the routing decision and its composition, then a place in the scheduler's queue.

Every refusal is an ApiError (OpenAI's shape, a machine-readable code) raised before
anything is queued or counted against another client; ``admit`` returns an Admitted
request whose answer the caller renders (routing.inference.render).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest
from jinja2 import TemplateError
from pydantic import ValidationError

from multilora import GenerationRequest
from multilora.chat import chat_prompt_ids
from routing import limits
from routing.inference import auth
from routing.inference.bodylimit import too_large
from routing.inference.errors import ApiError, from_validation
from routing.inference.routing import RoutedRequest, route_request
from routing.inference.schemas import ChatCompletionRequest, CompletionRequest
from routing.serving import runtime
from routing.serving.scheduler import Job, QueueFull


@dataclass(frozen=True)
class Admitted:
    """A request past every check, queued: what rendering its answer needs."""

    body: ChatCompletionRequest | CompletionRequest
    key: object  # the authenticated ApiToken
    rate: limits.LimitResult
    rt: runtime.Runtime
    routed: RoutedRequest
    job: Job
    started: float


def current_runtime() -> runtime.Runtime:
    try:
        return runtime.current()
    except runtime.NotStarted:
        raise ApiError(
            503,
            "The inference engine is starting; try again in a few seconds.",
            code="engine_unavailable",
            type="server_error",
            headers={"Retry-After": "5"},
        ) from None


def overloaded(retry_after: int) -> ApiError:
    """The scheduler's queue is at its bound: 503, and when to try again."""
    return ApiError(
        503,
        "The server is at capacity; retry shortly.",
        code="server_overloaded",
        type="server_error",
        headers={"Retry-After": str(max(1, retry_after))},
    )


def allow(request: HttpRequest, method: str) -> None:
    if request.method != method:
        raise ApiError(
            405,
            f"Use {method} for this endpoint.",
            code="method_not_allowed",
            headers={"Allow": method},
        )


async def admit(request: HttpRequest, schema) -> Admitted:
    """Check, route and queue one completion request; raises ApiError."""
    started = time.monotonic()
    allow(request, "POST")
    key = await auth.authenticate(request)
    own = limits.token_limits(token=key)
    rate = await limits.rate_limit_acquire(
        token_id=key.pk, requests_per_minute=own.requests_per_minute
    )
    if not rate.allowed:
        raise ApiError(
            429,
            f"Rate limit reached: {rate.limit} requests per minute for this key.",
            code="rate_limit_exceeded",
            type="requests",
            headers={"Retry-After": str(rate.retry_after)},
        )
    try:
        rt = current_runtime()
        if rt.scheduler.stats().waiting >= rt.scheduler.max_queue:
            # Already full: shed now, before the body, the prompt and the routing decision
            # are worked on (the bound is checked again, atomically, when queueing).
            raise overloaded(rt.scheduler.retry_after())
    except ApiError:
        # A 503 (starting, or at capacity): the request does not count toward the key's
        # minute, as it was refused before any work was done for it.
        await limits.rate_limit_release(token_id=key.pk, slot=rate.slot)
        raise
    quota = await limits.token_quota_check(token_id=key.pk, tokens_per_day=own.tokens_per_day)
    if not quota.allowed:
        raise ApiError(
            429,
            f"This key used its {quota.limit} tokens for today (UTC).",
            code="insufficient_quota",
            type="insufficient_quota",
            headers={"Retry-After": str(quota.retry_after)},
        )
    total = await limits.user_quota_check(user_id=key.user_id)
    if not total.allowed:
        raise ApiError(
            429,
            f"Your API keys together used your {total.limit} tokens for today (UTC).",
            code="user_quota_exceeded",
            type="insufficient_quota",
            headers={"Retry-After": str(total.retry_after)},
        )
    body = _parse(request, schema)
    prompt_ids = _prompt_ids(rt, body)
    max_tokens = _max_tokens(rt, body, len(prompt_ids))
    routed = await route_request(rt, body=body, user_id=key.user_id, prompt_ids=prompt_ids)
    generation = GenerationRequest(
        prompt_ids=prompt_ids,
        composition=routed.composed.engine,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops(),
        seed=body.seed,
    )
    try:
        job = rt.scheduler.submit(generation, loop=asyncio.get_running_loop())
    except QueueFull as full:
        # Filled up meanwhile: shed, the slot given back as above.
        await limits.rate_limit_release(token_id=key.pk, slot=rate.slot)
        raise overloaded(full.retry_after) from None
    return Admitted(body=body, key=key, rate=rate, rt=rt, routed=routed, job=job, started=started)


def _parse(request: HttpRequest, schema: type[ChatCompletionRequest | CompletionRequest]):
    # The ASGI layer (routing.inference.bodylimit) refused larger bodies before they were
    # read; this second look covers the app mounted without it.
    limit = settings.TESSERA_SERVING_MAX_BODY_BYTES
    try:
        raw = request.body
    except RequestDataTooBig:  # past Django's own DATA_UPLOAD_MAX_MEMORY_SIZE
        raise too_large(limit) from None
    if len(raw) > limit:
        raise too_large(limit)
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    _check_strings(data)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise from_validation(error) from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e309 parses as infinity
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _load_json(raw: bytes) -> object:
    """The body as JSON, strictly: no NaN/Infinity literals, no number that overflows a
    float, no integer of thousands of digits (Python refuses those), no nesting so deep
    that the decoder runs out of stack."""
    try:
        return json.loads(raw or b"null", parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "The body is nested too deeply.", code="invalid_json") from None
    except ValueError as error:  # UnicodeDecodeError included
        reason = str(error) if not isinstance(error, json.JSONDecodeError) else error.msg
        raise ApiError(
            400, f"The body is not valid JSON: {reason[:200]}.", code="invalid_json"
        ) from None


# Lone surrogates (an unpaired "\ud800" escape, or its bytes sent as UTF-8) cannot be
# encoded, so the tokenizer and every later step would fail on them; NUL is refused as it
# is on the rest of the platform.
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
MAX_JSON_DEPTH = 16


def _check_strings(data: dict) -> None:
    """Every string of the body, keys included, is valid Unicode without NUL, and the body
    is at most MAX_JSON_DEPTH deep (no field of the API nests beyond 4)."""
    stack: list[tuple[object, tuple[str, ...], int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                400,
                f"The body is nested more than {MAX_JSON_DEPTH} levels deep.",
                code="invalid_value",
                param=path[0] if path else None,  # the field, not the keys inside it
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, path)
                stack.append((item, (*path, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, path, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(text: str, path: tuple[str, ...]) -> None:
    found = _BAD_CHARACTER.search(text)
    if found is None:
        return
    what = "a NUL character" if found.group() == "\x00" else "an unpaired surrogate"
    param = ".".join(path) or None
    raise ApiError(
        400,
        f"Invalid '{param or 'body'}': the text holds {what} (U+{ord(found.group()):04X}).",
        code="invalid_value",
        param=param,
    )


def _prompt_ids(rt: runtime.Runtime, body: ChatCompletionRequest | CompletionRequest) -> list[int]:
    tokenizer = rt.engine.tokenizer
    if isinstance(body, ChatCompletionRequest):
        try:
            ids = chat_prompt_ids(tokenizer, body.chat())
        except TemplateError as error:
            # A model's template may refuse an order of roles (say, two user turns in a
            # row, or an assistant turn first): the request's messages are at fault.
            raise ApiError(
                400,
                f"The messages do not fit the model's chat template: {error}",
                code="invalid_value",
                param="messages",
            ) from None
    else:
        ids = tokenizer(body.prompt)["input_ids"]
    if not ids:
        raise ApiError(400, "The prompt is empty.", code="invalid_value", param="messages")
    return ids


def _max_tokens(rt: runtime.Runtime, body, prompt_tokens: int) -> int:
    context = rt.engine.max_positions or 1 << 30
    room = context - prompt_tokens
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if room < 1:
        raise ApiError(
            400,
            f"The prompt has {prompt_tokens} tokens; the model's context is {context} tokens.",
            code="context_length_exceeded",
            param=param,
        )
    wanted = body.requested_max_tokens()
    cap = settings.TESSERA_SERVING_MAX_TOKENS
    if wanted is None:
        return min(settings.TESSERA_SERVING_DEFAULT_MAX_TOKENS, cap, room)
    if wanted > cap:
        raise ApiError(
            400,
            f"max_tokens may be at most {cap} on this server.",
            code="invalid_value",
            param="max_tokens",
        )
    if wanted > room:
        raise ApiError(
            400,
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({wanted}) exceeds the "
            f"model's context of {context} tokens.",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return wanted
