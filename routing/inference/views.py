"""The OpenAI-compatible inference API: /v1/models, /v1/chat/completions, /v1/completions.

Async Django views in the serving process (uvicorn). A request is authenticated, limited,
validated, tokenized, routed, then queued for the scheduler thread; its tokens come back on
an asyncio queue and leave as one JSON body or as server-sent events. When the client goes
away, Django cancels the view (or closes the event stream) and the request's row is stopped
at the engine's next step.

Nothing here writes to the database: usage goes to Redis counters (flushed by Celery beat).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import ValidationError

from multilora import GenerationRequest, GenerationResult, StreamEvent
from routing import limits, usage
from routing.catalog import BASE_MODEL_ID, MIXTURE_MODEL_ID, Catalog, ServedAdapter
from routing.inference import auth
from routing.inference.errors import ApiError, from_validation, invalid_json
from routing.inference.routing import RoutedRequest, route_request
from routing.inference.schemas import ChatCompletionRequest, CompletionRequest
from routing.serving import runtime
from routing.serving.scheduler import Failure, Job, QueueFull

logger = logging.getLogger(__name__)


def guarded(view):
    """Unexpected failures answer in OpenAI's shape too (logged with their traceback)."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return await view(request, *args, **kwargs)
        except ApiError as error:
            return error.response()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("The inference API failed on %s", request.path)
            return ApiError(
                500,
                "The server failed to answer; try again.",
                code="internal_error",
                type="server_error",
            ).response()

    return csrf_exempt(wrapper)


@guarded
async def not_found(request: HttpRequest) -> HttpResponse:
    raise ApiError(404, f"Unknown endpoint {request.method} {request.path}.", code="unknown_url")


def _runtime() -> runtime.Runtime:
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


# --- /v1/models ---------------------------------------------------------------------------


def _model_entry(model_id: str, owned_by: str, created: int, extra: dict) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "tessera": extra,
    }


def _models(rt: runtime.Runtime, user_id: int) -> list[dict]:
    catalog = rt.catalog
    created = int(rt.started_at)
    entries = [
        _model_entry(
            MIXTURE_MODEL_ID,
            "tessera",
            created,
            {
                "kind": "mixture",
                "mixture": catalog.mixture_number,
                "router": catalog.router,
                "adapters": len(catalog.visible_to(user_id)),
            },
        ),
        _model_entry(
            BASE_MODEL_ID, "tessera", created, {"kind": "base", "name": rt.base_model_name}
        ),
    ]
    for adapter in catalog.visible_to(user_id):
        entries.append(
            _model_entry(
                catalog.public_id(adapter),
                adapter.owner_username,
                int(adapter.admitted_at.timestamp()) if adapter.admitted_at else created,
                {
                    "kind": "adapter",
                    "version": adapter.version_number,
                    "title": adapter.title,
                    "contributor": adapter.contributor_name or adapter.owner_username,
                    "license": adapter.license,
                    "task_tags": list(adapter.task_tags),
                    "private": adapter.private,
                },
            )
        )
    return entries


@guarded
async def models(request: HttpRequest) -> HttpResponse:
    _allow(request, "GET")
    key = await auth.authenticate(request)
    rt = _runtime()
    return JsonResponse({"object": "list", "data": _models(rt, key.user_id)})


@guarded
async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    _allow(request, "GET")
    key = await auth.authenticate(request)
    rt = _runtime()
    for entry in _models(rt, key.user_id):
        if entry["id"] == model_id:
            return JsonResponse(entry)
    raise ApiError(
        404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model"
    )


# --- Completions ----------------------------------------------------------------------------


@guarded
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await _complete(request, ChatCompletionRequest)


@guarded
async def completions(request: HttpRequest) -> HttpResponse:
    return await _complete(request, CompletionRequest)


def _allow(request: HttpRequest, method: str) -> None:
    if request.method != method:
        raise ApiError(
            405,
            f"Use {method} for this endpoint.",
            code="method_not_allowed",
            headers={"Allow": method},
        )


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


async def _complete(request: HttpRequest, schema) -> HttpResponse:
    started = time.monotonic()
    try:
        _allow(request, "POST")
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
        body = _parse(request, schema)
        rt = _runtime()
        prompt_ids = _prompt_ids(rt, body)
        max_tokens = _max_tokens(rt, body, len(prompt_ids))
        routed = await route_request(rt, body=body, user_id=key.user_id, prompt_ids=prompt_ids)
        generation = GenerationRequest(
            prompt_ids=prompt_ids,
            adapter=routed.adapter.key if routed.adapter else None,
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
    except ApiError as error:
        return error.response()
    response = _Response(
        body=body,
        routed=routed,
        key_id=key.pk,
        user_id=key.user_id,
        chat=isinstance(body, ChatCompletionRequest),
        started=started,
    )
    headers = {
        "x-ratelimit-limit-requests": str(rate.limit),
        "x-ratelimit-remaining-requests": str(rate.remaining),
        "x-tessera-adapter": routed.adapter.model_id if routed.adapter else BASE_MODEL_ID,
        "x-tessera-mixture": str(routed.catalog.mixture_number),
    }
    if body.stream:
        streaming = StreamingHttpResponse(
            response.events(rt, job), content_type="text/event-stream; charset=utf-8"
        )
        streaming["Cache-Control"] = "no-cache"
        streaming["X-Accel-Buffering"] = "no"  # proxies must not hold the events back
        for name, value in headers.items():
            streaming[name] = value
        return streaming
    result = await response.collect(rt, job)
    if isinstance(result, ApiError):
        return result.response()
    answer = JsonResponse(response.body_of(result))
    for name, value in headers.items():
        answer[name] = value
    return answer


class _Response:
    """One request's answer, as a JSON body or as a stream of chunks."""

    def __init__(
        self, *, body, routed: RoutedRequest, key_id: int, user_id: int, chat: bool, started: float
    ) -> None:
        self.body = body
        self.routed = routed
        self.key_id = key_id
        self.user_id = user_id
        self.chat = chat
        self.started = started
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.recorded = False

    # --- Shared -----------------------------------------------------------------------------

    def attribution(self) -> dict[str, Any]:
        return attribution(self.routed)

    async def record(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        adapter = self.routed.adapter
        try:
            await usage.usage_record(
                token_id=self.key_id,
                user_id=self.user_id,
                version_ids=[adapter.version_id] if adapter else [],
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        except Exception:
            # Counting must never fail an answer already made; the loss is logged.
            logger.exception("Could not record usage for key %s", self.key_id)

    def usage(self, result: GenerationResult) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    # --- Whole ------------------------------------------------------------------------------

    async def collect(self, rt: runtime.Runtime, job: Job) -> GenerationResult | ApiError:
        result: GenerationResult | None = None
        try:
            while True:
                item = await job.events.get()
                if item is None:
                    break
                if isinstance(item, Failure):
                    return failure_error(item)
                if item.result is not None:
                    result = item.result
        except asyncio.CancelledError:
            rt.scheduler.cancel(job)  # the client went away: stop its row
            raise
        assert result is not None
        await self.record(result.prompt_tokens, result.completion_tokens)
        return result

    def body_of(self, result: GenerationResult) -> dict[str, Any]:
        finish = "length" if result.finish_reason == "length" else "stop"
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": f"tessera-mixture-{self.routed.catalog.mixture_number}",
            "choices": [choice],
            "usage": self.usage(result),
            "tessera": self.attribution(),
        }

    # --- Streamed ---------------------------------------------------------------------------

    def _chunk(self, delta_or_text: Any, finish: str | None, **extra: Any) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": f"tessera-mixture-{self.routed.catalog.mixture_number}",
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    async def events(self, rt: runtime.Runtime, job: Job) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        tokens = 0
        finished = False
        try:
            # The attribution comes first, so a client knows who answers before the text.
            first = {"role": "assistant", "content": ""} if self.chat else ""
            yield self._chunk(first, None, tessera=self.attribution())
            result: GenerationResult | None = None
            while True:
                item: StreamEvent | Failure | None = await job.events.get()
                if item is None:
                    break
                if isinstance(item, Failure):
                    error = failure_error(item)
                    yield f"data: {json.dumps(error.body())}\n\n"
                    finished = True
                    return
                if item.token_id is not None:
                    tokens += 1
                if item.text:
                    yield self._chunk({"content": item.text} if self.chat else item.text, None)
                if item.result is not None:
                    result = item.result
            finished = True
            assert result is not None
            finish = "length" if result.finish_reason == "length" else "stop"
            yield self._chunk({} if self.chat else "", finish, tessera=self.attribution())
            if include_usage:
                usage_chunk = {
                    "id": self.id,
                    "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created,
                    "model": self.body.model,
                    "choices": [],
                    "usage": self.usage(result),
                }
                yield f"data: {json.dumps(usage_chunk, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
            await self.record(result.prompt_tokens, result.completion_tokens)
        finally:
            if not finished:
                # The client went away mid-stream: stop the row, count what was made.
                rt.scheduler.cancel(job)
                prompt_tokens = len(job.request.prompt_ids or ())
                asyncio.get_running_loop().create_task(self.record(prompt_tokens, tokens))


def failure_error(failure: Failure) -> ApiError:
    if failure.code == "invalid_request":
        return ApiError(400, failure.message, code="invalid_value")
    if failure.code == "adapter_unavailable":
        return ApiError(
            503,
            "The adapter chosen for this request just left the mixture; retry.",
            code="adapter_unavailable",
            type="server_error",
            headers={"Retry-After": "1"},
        )
    return ApiError(500, failure.message, code=failure.code, type="server_error")


def attribution(routed: RoutedRequest) -> dict[str, Any]:
    """The extra ``tessera`` field: who answered and how sure the router was."""
    catalog: Catalog = routed.catalog
    decision = routed.decision
    adapters: list[ServedAdapter] = [decision.adapter] if decision.adapter else []
    scores = {score.model_id: score.score for score in decision.scores}
    return {
        "mixture": catalog.mixture_number,
        "router": decision.router,
        "reason": decision.reason,
        "threshold": decision.threshold,
        "adapters": [
            {
                "id": catalog.public_id(adapter),
                "version": adapter.version_number,
                "title": adapter.title,
                "contributor": adapter.contributor_name or adapter.owner_username,
                "license": adapter.license,
                "score": scores.get(adapter.model_id),
            }
            for adapter in adapters
        ],
        "scores": [{"id": s.model_id, "score": round(s.score, 4)} for s in decision.scores],
        "routing_ms": round(routed.routing_seconds * 1000, 2),
    }


@guarded
async def health(request: HttpRequest) -> HttpResponse:
    """Liveness and what is served, for load balancers and `make run`."""
    try:
        rt = runtime.current()
    except runtime.NotStarted:
        return JsonResponse({"status": "starting"}, status=503)
    stats = rt.scheduler.stats()
    return JsonResponse(
        {
            "status": "ok",
            "base_model": rt.base_model_name,
            "mixture": rt.catalog.mixture_number,
            "adapters": len(rt.catalog),
            "waiting": stats.waiting,
            "running": stats.running,
        }
    )
