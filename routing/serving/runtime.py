"""The serving process's one engine, its scheduler and its mixture sync, started once.

The ASGI application (routing.serving.asgi) starts the runtime at lifespan startup and stops
it at shutdown; the API views reach it through ``current()``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from django.conf import settings
from django.db import connections

from contributions.base_models import base_model_load
from contributions.selectors import base_model_active
from multilora import Engine
from routing.catalog import Catalog
from routing.serving.scheduler import Scheduler
from routing.serving.sync import MixtureSync

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    engine: Engine
    scheduler: Scheduler
    sync: MixtureSync
    base_model_name: str
    started_at: float

    @property
    def catalog(self) -> Catalog:
        return self.sync.catalog

    def stop(self) -> None:
        self.sync.stop()
        self.scheduler.stop()


_runtime: Runtime | None = None
_lock = threading.Lock()


class NotStarted(RuntimeError):
    pass


def current() -> Runtime:
    if _runtime is None:
        raise NotStarted("The inference runtime is not started in this process.")
    return _runtime


def device() -> torch.device:
    wanted = settings.TESSERA_SERVING_DEVICE
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def start() -> Runtime:
    """Load the active base model once, then serve the active mixture. Idempotent."""
    try:
        return _start()
    finally:
        connections.close_all()  # the calling thread's; the sync thread has its own


def _start() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        began = time.monotonic()
        if settings.TESSERA_SERVING_TORCH_THREADS:
            torch.set_num_threads(settings.TESSERA_SERVING_TORCH_THREADS)
        base = base_model_active()
        model, tokenizer = base_model_load(base, dtype=DTYPES[settings.TESSERA_SERVING_DTYPE])
        model.to(device())
        engine = Engine(model, tokenizer)
        scheduler = Scheduler(
            engine,
            max_batch_size=settings.TESSERA_SERVING_MAX_BATCH,
            max_batch_tokens=settings.TESSERA_SERVING_MAX_BATCH_TOKENS,
            max_queue=settings.TESSERA_SERVING_MAX_QUEUE,
        )
        scheduler.start()
        sync = MixtureSync(engine, poll_seconds=settings.TESSERA_MIXTURE_POLL_SECONDS)
        sync.start()
        _runtime = Runtime(
            engine=engine,
            scheduler=scheduler,
            sync=sync,
            base_model_name=base.name,
            started_at=time.time(),
        )
        logger.info(
            "Inference runtime up in %.1fs: %s on %s, mixture v%d with %d adapters",
            time.monotonic() - began,
            base.name,
            device(),
            sync.catalog.mixture_number,
            len(sync.catalog),
        )
        return _runtime


def stop() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None
