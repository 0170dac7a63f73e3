"""The inference server's ASGI application: ``uvicorn tessera.serving:application``.

Django's ASGI handler serves the OpenAI-compatible API (routing.inference.urls) and this
wrapper speaks the ASGI lifespan protocol, which Django does not: the engine (base model,
admitted adapters, scheduler thread, mixture sync) starts before the first request is
accepted and stops at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tessera.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402 (after django.setup)

from routing import limits  # noqa: E402
from routing.inference.bodylimit import BodyLimit  # noqa: E402
from routing.serving import runtime  # noqa: E402

logger = logging.getLogger(__name__)
URLCONF = "routing.inference.urls"


class InferenceHandler(ASGIHandler):
    def create_request(self, scope, body_file):
        request, error_response = super().create_request(scope, body_file)
        if request is not None:
            request.urlconf = URLCONF  # only the inference API in this process
        return request, error_response


class InferenceApplication:
    def __init__(self) -> None:
        # Oversized bodies are refused before Django reads them (or authenticates anyone).
        self.handler = BodyLimit(
            InferenceHandler(), limit=lambda: settings.TESSERA_SERVING_MAX_BODY_BYTES
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        else:
            await self.handler(scope, receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(runtime.start)
                except Exception as error:
                    logger.exception("The inference runtime could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(runtime.stop)
                await limits.redis_async_close()
                await send({"type": "lifespan.shutdown.complete"})
                return


application = InferenceApplication()
