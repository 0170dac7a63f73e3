"""The OpenAI rendering of an answer: one JSON body, or server-sent event chunks, with
Tessera's ``tessera`` attribution (who answered, with which weights, how sure the router
was) and the usage each adapter is credited with."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from multilora import GenerationResult, StreamEvent
from routing import usage
from routing.catalog import Catalog, ServedAdapter
from routing.inference.errors import ApiError
from routing.inference.routing import RoutedRequest
from routing.serving import runtime
from routing.serving.scheduler import Failure, Job

logger = logging.getLogger(__name__)


class Answer:
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

    def attribution(self, result: GenerationResult | None = None) -> dict[str, Any]:
        return attribution(self.routed, result)

    async def record(
        self, result: GenerationResult | None, prompt_tokens: int, tokens: int
    ) -> None:
        if self.recorded:
            return
        self.recorded = True
        credits = usage_credits(weighted_parts(self.routed, result))
        try:
            await usage.usage_record(
                token_id=self.key_id,
                user_id=self.user_id,
                version_ids=[version_id for version_id, _ in credits],
                weights=[weight for _, weight in credits],
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
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
        await self.record(result, result.prompt_tokens, result.completion_tokens)
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
            "tessera": self.attribution(result),
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
            yield self._chunk({} if self.chat else "", finish, tessera=self.attribution(result))
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
            await self.record(result, result.prompt_tokens, result.completion_tokens)
        finally:
            if not finished:
                # The client went away mid-stream: stop the row, count what was made.
                rt.scheduler.cancel(job)
                prompt_tokens = len(job.request.prompt_ids or ())
                asyncio.get_running_loop().create_task(self.record(None, prompt_tokens, tokens))


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


def weighted_parts(
    routed: RoutedRequest, result: GenerationResult | None = None
) -> list[tuple[ServedAdapter, float]]:
    """Every adapter taking part with its weight: the composition's weights, replaced by
    the engine's measured shares once the answer is made (Arrow's per-token mix is only
    known then)."""
    parts = list(routed.composed.parts)
    shares = result.shares if result is not None else None
    if shares:
        parts = [(adapter, float(shares.get(adapter.key, 0.0))) for adapter, _ in parts]
    return parts


def usage_credits(parts: list[tuple[ServedAdapter, float]]) -> list[tuple[int, float]]:
    """(version id, weight) to credit for an answer: each adapter its weight, a merged
    adapter's weight shared equally by its members."""
    credits: list[tuple[int, float]] = []
    for adapter, weight in parts:
        if adapter.members:
            share = weight / len(adapter.members)
            credits.extend((version_id, share) for version_id in adapter.members)
        else:
            credits.append((adapter.version_id, weight))
    return credits


def attribution(routed: RoutedRequest, result: GenerationResult | None = None) -> dict[str, Any]:
    """The extra ``tessera`` field: who answered, with which weights, and how sure the
    router was. The first streamed chunk carries the composition's weights; the last one
    and a whole body carry the weights the answer was actually made with."""
    catalog: Catalog = routed.catalog
    decision = routed.decision
    composed = routed.composed
    scores = {id(adapter): score for adapter, score in decision.ranked}
    return {
        "mixture": catalog.mixture_number,
        "router": decision.router,
        "reason": decision.reason,
        "threshold": decision.threshold,
        "composition": {
            "method": composed.method,
            "k": composed.k,
            "temperature": composed.temperature,
        },
        "adapters": [
            {
                "id": adapter.model_id if adapter is catalog.merged else catalog.public_id(adapter),
                "version": adapter.version_number,
                "title": adapter.title,
                "contributor": adapter.contributor_name or adapter.owner_username,
                "license": adapter.license,
                "score": scores.get(id(adapter)),
                "weight": round(weight, 4),
            }
            for adapter, weight in weighted_parts(routed, result)
        ],
        "scores": [{"id": s.model_id, "score": round(s.score, 4)} for s in decision.scores],
        "routing_ms": round(routed.routing_seconds * 1000, 2),
    }
