"""Celery tasks for routing: thin wrappers around services."""

from __future__ import annotations

from functools import partial

from celery import shared_task

from routing.learned.services import learned_router_train
from routing.merging.services import merge_compute
from routing.scoreboard.services import scoreboard_compute
from routing.usage import usage_flush

# A mixture job (routing.jobs) is acknowledged only once it returns and redelivered when its
# worker dies, so a row left running by a dead worker is taken over; the row is its result.
mixture_job = partial(shared_task, acks_late=True, reject_on_worker_lost=True, ignore_result=True)


@shared_task(name="routing.flush_usage", ignore_result=True)
def flush_usage() -> int:
    """Move the public API's usage counters from Redis into the daily tables (beat, every
    TESSERA_USAGE_FLUSH_SECONDS, on the default queue). Idempotent: overlapping or
    repeated runs count nothing twice, so a late or duplicated beat message is harmless.
    A Redis outage makes it fail loudly; the counters wait in Redis for the next run."""
    return usage_flush()


@mixture_job(name="routing.score_mixture")
def score_mixture(board_id: int) -> str:
    """Score one mixture version (queued when it is published, on the evaluation queue).
    Quiet when the board is gone, finished, superseded by a newer one, or taken."""
    return scoreboard_compute(board_id=board_id)


@mixture_job(name="routing.merge_mixture")
def merge_mixture(merged_id: int) -> str:
    """Build one mixture version's merged adapter (queued when it is published, on the
    evaluation queue). Quiet when the row is gone, already built or failed, superseded by a
    newer mixture's build, or taken by another worker."""
    return merge_compute(merged_id=merged_id)


@mixture_job(name="routing.train_router")
def train_router(router_id: int) -> str:
    """Train one mixture version's learned router (queued when it is published, on the
    evaluation queue). Quiet when the router (or its mixture) is gone, trained already, or
    taken by another worker."""
    return learned_router_train(router_id=router_id)
