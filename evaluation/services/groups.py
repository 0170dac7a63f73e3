"""Evaluating queued runs in groups: up to TESSERA_EVAL_GROUP_SIZE runs in one child.

The child loads every adapter of a job into one multi-LoRA engine and scores them with the
base model in shared batches, so evaluating K adapters together costs one interpreter, one
base model load and one set of base-model rows instead of K (docs/benchmarks.md). A worker
that handles a run's message therefore claims, besides that run (the group's lead), up to
K-1 more queued runs of the same queue and base model, oldest first.

Concurrency contract:

* Every grouped run is claimed by the one compare-and-set there is
  (runs.evaluation_run_claim): a run another worker claims first is skipped, and a grouped
  run's own message, delivered later, finds it running under a live claim ("busy") or
  finished (a no-op), exactly like a duplicate message.
* The group's rows share one heartbeat (``GroupHeartbeat``): each tick saves the heartbeat
  and the group's progress on every run still this worker's. A run whose compare-and-set
  fails (reaped, re-queued) has left the group for good and records nothing; the child is
  stopped only once every run has left.
* After the child each run is checked and recorded on its own, so one run's failure (its
  adapter refused, its part of the answer malformed, a bug) fails that run only. When the
  child fails as a whole (crash, memory, deadline, unreadable output) the cause cannot be
  told apart, so every run of a group of two or more is given back, marked ``alone``, with
  a fresh message (runs.evaluation_run_release_alone); a run evaluated alone fails as
  usual. A broken or slow adapter thus ends up failing its own run only.
* A run marked ``alone``, or whose earlier attempt was lost with its worker (attempts left
  over from a claim that was never given back: the worker process itself died, which a
  group must not make its batch-mates pay for again), is evaluated alone and never taken
  as a batch-mate.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from django.conf import settings
from django.utils import timezone

from evaluation.models import EvaluationRun
from evaluation.services.runs import TRANSIENT_ERRORS, evaluation_run_claim

logger = logging.getLogger(__name__)

RunStatus = EvaluationRun.Status


def group_size(lead: EvaluationRun) -> int:
    """How many runs ``lead``'s child may evaluate, ``lead`` included (just claimed, so
    ``attempts`` counts this attempt)."""
    if lead.alone or lead.attempts > 1:
        return 1
    return max(1, int(settings.TESSERA_EVAL_GROUP_SIZE))


def group_claim(*, lead: EvaluationRun, worker: str) -> list[EvaluationRun]:
    """``lead`` (already claimed by ``worker``) and up to group_size - 1 more queued runs of
    its queue and base model, oldest first, each claimed by evaluation_run_claim (their
    versions move queued → evaluating). A transient error while looking for batch-mates
    ends the search: the group is what was claimed so far."""
    size = group_size(lead)
    group = [lead]
    tried = {lead.pk}
    candidates = (
        EvaluationRun.objects.filter(
            status=RunStatus.QUEUED,
            queue=lead.queue,
            alone=False,
            attempts=0,
            version__base_model_id=lead.version.base_model_id,
        )
        .order_by("created_at", "pk")
        .only("pk")
    )
    try:
        while len(group) < size:
            batch = list(candidates.exclude(pk__in=tried)[: size - len(group)])
            if not batch:
                break
            for candidate in batch:
                tried.add(candidate.pk)
                claimed = evaluation_run_claim(run=candidate, worker=worker)
                if claimed is not None:  # None: another worker claimed it first
                    group.append(claimed)
    except TRANSIENT_ERRORS:
        logger.warning("run %s: stopped looking for batch-mates", lead.pk, exc_info=True)
    return group


def group_wall_seconds(runs: Sequence[EvaluationRun]) -> float:
    """The child's wall-clock limit: the earliest deadline of the group's runs, less the
    time kept to record the results (and embed the signatures) before it."""
    now = timezone.now()
    remaining = min((run.deadline_at - now).total_seconds() for run in runs)
    reserve = min(60.0, 0.1 * settings.TESSERA_EVAL_DEADLINE_SECONDS)
    return remaining - reserve


class GroupHeartbeat:
    """Progress from the child, saved with the heartbeat on every run of the group still
    this worker's, at most every TESSERA_EVAL_HEARTBEAT_SECONDS. ``live`` holds the ids of
    those runs; ``tick`` answers False once none is left (the child may be stopped)."""

    def __init__(self, runs: Sequence[EvaluationRun], worker: str) -> None:
        self.live: list[int] = [run.pk for run in runs]
        self.worker = worker
        self.every = float(settings.TESSERA_EVAL_HEARTBEAT_SECONDS)
        self.last = 0.0
        self.done = self.total = 0
        self.label = "Starting the sandbox"

    def progress(self, done: int, total: int, label: str) -> None:
        self.done, self.total, self.label = done, total, label

    def tick(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return bool(self.live)
        self.last = now
        mine = EvaluationRun.objects.filter(
            pk__in=self.live, status=RunStatus.RUNNING, claimed_by=self.worker
        )
        try:
            updated = mine.update(
                heartbeat_at=timezone.now(),
                progress_done=min(self.done, self.total),
                progress_total=self.total,
                progress_label=self.label[:200],
            )
            if updated != len(self.live):
                # Some run was taken away: find which. One taken between the update and this
                # read is dropped now rather than at the next tick; either way it records
                # nothing (recording is a compare-and-set on the claim too).
                still = set(mine.values_list("pk", flat=True))
                self.live = [pk for pk in self.live if pk in still]
        except TRANSIENT_ERRORS:
            # A blip must not kill a long evaluation; the reaper acts if it lasts.
            logger.warning("heartbeat of runs %s not saved", self.live, exc_info=True)
        return bool(self.live)


def log_for(log: str, *, key: str, keys: Sequence[str]) -> str:
    """The child's log as run ``key``'s page shows it: lines naming another adapter of the
    group (its loading, the engine's reason for refusing it) are left out, so a contributor
    sees the shared lines and their own adapter's only."""
    others = [k for k in keys if k != key]
    if not others:
        return log
    # "run:1" must not hide "run:12"'s lines: a key ends where no digit follows.
    named = re.compile("|".join(re.escape(k) + r"(?!\d)" for k in others))
    return "\n".join(line for line in log.split("\n") if not named.search(line))
