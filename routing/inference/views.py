"""The OpenAI-compatible inference API: /v1/models, /v1/chat/completions, /v1/completions.

Async Django views in the serving process (uvicorn). The views are HTTP only: a completion
request is checked, routed, composed and queued by routing.inference.pipeline, and its
answer leaves as one JSON body or as server-sent events rendered by
routing.inference.render. When the client goes away, Django cancels the view (or closes the
event stream) and the request's rows are stopped at the engine's next step.

Nothing here writes to the database: usage goes to Redis counters (flushed by Celery beat).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from routing.catalog import BASE_MODEL_ID, MERGED_MODEL_ID, MIXTURE_MODEL_ID
from routing.inference import auth
from routing.inference.errors import ApiError
from routing.inference.pipeline import admit, allow, current_runtime
from routing.inference.render import Answer
from routing.inference.schemas import ChatCompletionRequest, CompletionRequest
from routing.serving import runtime

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


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return ApiError(404, "Unknown endpoint.", code="unknown_url").response()


def handler500(request: HttpRequest) -> HttpResponse:
    return ApiError(
        500, "The server failed to answer; try again.", code="internal_error", type="server_error"
    ).response()


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
    if catalog.merged is not None:
        entries.append(
            _model_entry(
                MERGED_MODEL_ID,
                "tessera",
                created,
                {
                    "kind": "merged",
                    "mixture": catalog.mixture_number,
                    "title": catalog.merged.title,
                    "license": catalog.merged.license,
                },
            )
        )
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
    allow(request, "GET")
    key = await auth.authenticate(request)
    rt = current_runtime()
    return JsonResponse({"object": "list", "data": _models(rt, key.user_id)})


@guarded
async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    allow(request, "GET")
    key = await auth.authenticate(request)
    rt = current_runtime()
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


async def _complete(request: HttpRequest, schema) -> HttpResponse:
    try:
        admitted = await admit(request, schema)
    except ApiError as error:
        return error.response()
    body, routed, rt, job = admitted.body, admitted.routed, admitted.rt, admitted.job
    answer = Answer(
        body=body,
        routed=routed,
        key_id=admitted.key.pk,
        user_id=admitted.key.user_id,
        chat=isinstance(body, ChatCompletionRequest),
        started=admitted.started,
    )
    primary = routed.composed.primary
    headers = {
        "x-ratelimit-limit-requests": str(admitted.rate.limit),
        "x-ratelimit-remaining-requests": str(admitted.rate.remaining),
        # The adapter with the largest weight; the body's attribution lists them all.
        "x-tessera-adapter": primary.model_id if primary else BASE_MODEL_ID,
        "x-tessera-composition": routed.composed.method,
        "x-tessera-mixture": str(routed.catalog.mixture_number),
    }
    if body.stream:
        streaming = StreamingHttpResponse(
            answer.events(rt, job), content_type="text/event-stream; charset=utf-8"
        )
        streaming["Cache-Control"] = "no-cache"
        streaming["X-Accel-Buffering"] = "no"  # proxies must not hold the events back
        for name, value in headers.items():
            streaming[name] = value
        return streaming
    result = await answer.collect(rt, job)
    if isinstance(result, ApiError):
        return result.response()
    response = JsonResponse(answer.body_of(result))
    for name, value in headers.items():
        response[name] = value
    return response


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
