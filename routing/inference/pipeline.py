"""One completion request's way in: authentication, limits, the body, the prompt's tokens,
the routing decision and its composition, then a place in the scheduler's queue.

Every refusal is an ApiError (OpenAI's shape, a machine-readable code) raised before
anything is queued or counted against another client; ``admit`` returns an Admitted
request whose answer the caller renders (routing.inference.render).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest
from pydantic import ValidationError

from multilora import GenerationRequest
from routing import limits
from routing.inference import auth
from routing.inference.errors import ApiError, from_validation, invalid_json
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
    rt = current_runtime()
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
        raise ApiError(
            503,
            "The server is at capacity; retry shortly.",
            code="server_overloaded",
            type="server_error",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    return Admitted(body=body, key=key, rate=rate, rt=rt, routed=routed, job=job, started=started)


def _parse(request: HttpRequest, schema: type[ChatCompletionRequest | CompletionRequest]):
    limit = settings.TESSERA_SERVING_MAX_BODY_BYTES
    declared = request.headers.get("Content-Length")
    too_large = bool(declared and declared.isdigit() and int(declared) > limit)
    if not too_large:
        try:
            too_large = len(request.body) > limit
        except RequestDataTooBig:  # a body without Content-Length, past Django's own cap
            too_large = True
    if too_large:
        raise ApiError(
            413, f"The request body is larger than {limit} bytes.", code="request_too_large"
        )
    try:
        data = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise invalid_json() from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise from_validation(error) from None


def _prompt_ids(rt: runtime.Runtime, body: ChatCompletionRequest | CompletionRequest) -> list[int]:
    tokenizer = rt.engine.tokenizer
    if isinstance(body, ChatCompletionRequest):
        text = tokenizer.apply_chat_template(
            body.chat(), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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
