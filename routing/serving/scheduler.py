"""The one thread that owns the engine: it takes waiting requests in batches and hands each
row's tokens back to the asyncio side as they are made.

Batching policy: continuous. Requests that arrive while a batch decodes join it at the next
decoding step (the engine's running batch, multilora.running: the newcomers are prefilled
together and their rows added to the per-row key/value cache, copying only their entries),
and a request leaves the batch as soon as it finishes, freeing its place. So a short request
that arrives while long answers are being generated gets its first token after at most one
decoding step plus its own prefill, instead of after the whole running batch. A batch lasts
while it has rows; work handed in with ``call`` runs between two steps. The queue is bounded
(TESSERA_SERVING_MAX_QUEUE, 503 with Retry-After beyond it).

A batch starts with the oldest waiting request and the next waiting ones of its cost class
(``cost_class``): requests composed with Arrow are batched among themselves, because every
row of a batch runs at the widest row's LoRA rank. Later, waiting requests join in arrival
order while the oldest waiting one is of the batch's class and fits; when it is not, the
batch takes no one else, drains, and that request's batch comes next (no class starves). A
batch is bounded in rows (TESSERA_SERVING_MAX_BATCH) and in tokens
(TESSERA_SERVING_MAX_BATCH_TOKENS): a request joins only while
``lanes x (widest prompt + longest max_tokens)`` over the running requests and it stays
within the bound (what the cache may come to hold). A request over the bound by itself
still runs, alone.

One request never fails its batch: requests the engine refuses are checked one by one and
fail alone; newcomers whose prefill raises are prefilled one by one, so only the one that
breaks it fails; and when a decoding step raises (a request that passed every check and still
breaks the engine), the batch's unfinished rows are run again one at a time, so only the
row that fails alone gets an error. A row that had already streamed tokens resumes where it
was: its rerun reproduces the tokens already sent (greedy rows, and sampled rows, whose
seed is fixed here at submission when the client gave none), which are skipped.

Work that uses the model without the batch's LoRA binding (Arrow routing's base-model
pass) is submitted with ``call`` and runs on the scheduler thread between two decoding
steps, with the binding lifted meanwhile (or between two batches). It must not call the
engine's own generation methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from multilora import Engine, GenerationError, GenerationRequest, StreamEvent
from multilora.requests import DEFAULT_MAX_NEW_TOKENS
from multilora.running import RunningBatch

logger = logging.getLogger(__name__)


def cost_class(request: GenerationRequest) -> str:
    """Which requests may share a batch without slowing each other: a batch binds every row
    at its widest row's LoRA rank, and an Arrow row applies every one of its candidates (16
    of rank 8 make a rank-128 row), so plain rows batched with Arrow rows decode at Arrow's
    speed (docs/benchmarks.md (g): 0.36x the base model, against 1.05x for top1 alone)."""
    return "arrow" if request.composition.method == "arrow" else "plain"


@dataclass(frozen=True)
class Size:
    """What a request adds to a batch's key/value cache: its lanes (one row, or one per
    adapter for ``logit``), its prompt's tokens and the most tokens it may make."""

    lanes: int
    prompt: int
    new: int


def request_size(request: GenerationRequest) -> Size:
    lanes = len(request.composition.adapters) if request.composition.method == "logit" else 1
    if request.prompt_ids is not None:
        prompt = len(request.prompt_ids)
    else:
        # Not tokenized yet (the server always gives prompt_ids): characters are at least
        # as many as tokens, so the estimate errs on the safe side.
        texts = [request.prompt or ""] + [
            str(message.get("content", "")) for message in request.messages or ()
        ]
        prompt = sum(len(text) + 8 for text in texts)
    return Size(
        lanes=max(1, lanes), prompt=prompt, new=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    )


def batch_tokens(sizes: list[Size]) -> int:
    """The tokens a batch's key/value cache holds at its end: every lane padded to the
    widest prompt, plus the longest answer."""
    if not sizes:
        return 0
    lanes = sum(size.lanes for size in sizes)
    return lanes * (max(size.prompt for size in sizes) + max(size.new for size in sizes))


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should answer 503 + Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Failure:
    """Delivered instead of events when the job could not run at all."""

    code: str  # "adapter_unavailable", "invalid_request", "engine_error"
    message: str


class _Diverged(Exception):
    """A rerun row made other tokens than the ones already sent: it cannot resume."""


@dataclass(eq=False)
class Job:
    """One request on its way through the scheduler. Events arrive on ``events`` (an asyncio
    queue of the submitting loop): StreamEvents, then None at the end; or one Failure."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it joined a batch
    finished_at: float | None = None
    cancelled: bool = False
    cancel_sent: bool = False  # the engine has been told
    size: Size | None = None
    sent: list[int | None] = field(default_factory=list)  # token ids of the events sent
    finished: bool = False  # its result was sent

    def _deliver(self, item: Any) -> None:
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class _Running:
    """A running batch and its jobs, on the scheduler thread."""

    batch: RunningBatch
    members: list[Job]  # every job that joined, finished or not
    handles: dict[int, Job] = field(default_factory=dict)  # the batch's event index -> job
    running: list[Job] = field(default_factory=list)  # joined and not finished


@dataclass(frozen=True)
class SchedulerStats:
    waiting: int
    running: int
    batches: int  # batches started (a batch runs from its first rows until it has none)
    joined: int  # requests that joined a batch already decoding
    completed: int
    mean_request_seconds: float  # from joining a batch to the last token


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int = 16384,
        max_queue: int = 64,
        gather_seconds: float = 0.002,
        continuous: bool = True,
    ) -> None:
        self.engine = engine
        # False: requests that arrive while a batch decodes wait for the next batch (the
        # policy before continuous batching, kept for benchmarks/bench_serving.py).
        self.continuous = continuous
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        # A short pause before taking a batch from an idle state, so that requests arriving
        # together (a client's burst) share one batch instead of the first going alone.
        self.gather_seconds = gather_seconds
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[Engine], Any], Future]] = deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batches = 0
        self._joined = 0
        self._completed = 0
        self._request_seconds = 0.0  # exponential moving average, for Retry-After

    # --- Life ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="tessera-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            for job in self._running:
                self.engine.cancel(job.request.request_id)
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self._waiting:
            self._waiting.popleft()._deliver(Failure("engine_error", "The server is stopping."))

    # --- Submitting ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request; raises QueueFull when the bound is reached. Safe from any thread."""
        if request.temperature > 0 and request.seed is None:
            # A sampled row with a seed of its own can be run again to the same tokens, if
            # its batch fails under it (see the module's docstring).
            request = replace(request, seed=secrets.randbits(63))
        job = Job(request=request, loop=loop, size=request_size(request))
        with self._condition:
            if self._stopping:
                raise QueueFull(self.retry_after())
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._condition.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop its row if it runs."""
        with self._condition:
            job.cancelled = True
            try:
                self._waiting.remove(job)
            except ValueError:
                pass
            else:
                job._deliver(None)
                return
        # Running, or about to: if the engine does not know the request yet, the batch loop
        # passes the cancellation on at the request's first event.
        job.cancel_sent = self.engine.cancel(job.request.request_id)

    def call(self, function: Callable[[Engine], Any]) -> Future:
        """Run ``function(engine)`` on the scheduler thread between two batches."""
        future: Future = Future()
        with self._condition:
            if self._stopping:
                future.set_exception(RuntimeError("The server is stopping."))
                return future
            self._calls.append((function, future))
            self._condition.notify_all()
        return future

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's time, at least 1."""
        return max(1, round(self._request_seconds or 1.0))

    def stats(self) -> SchedulerStats:
        with self._condition:
            return SchedulerStats(
                waiting=len(self._waiting),
                running=len(self._running),
                batches=self._batches,
                joined=self._joined,
                completed=self._completed,
                mean_request_seconds=self._request_seconds,
            )

    # --- The thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._calls:
                    self._condition.wait()
                if self._stopping:
                    return
                calls = list(self._calls)
                self._calls.clear()
            for function, future in calls:
                self._run_call(function, future)
            if not calls:
                time.sleep(self.gather_seconds)
            with self._condition:
                batch = self._take_batch()
                self._running = batch
            if batch:
                try:
                    self._run_batch(batch)
                finally:
                    with self._condition:
                        self._running = []

    def _take_batch(self) -> list[Job]:
        """The oldest waiting request and, in arrival order, the next waiting ones of the
        same cost class that keep the batch within its rows and tokens; the others keep
        their places. Caller holds the condition. The oldest always goes first (alone if it
        is over the token bound by itself), so no request or class can starve."""
        if not self._waiting:
            return []
        kind = cost_class(self._waiting[0].request)
        batch: list[Job] = []
        sizes: list[Size] = []
        skipped: list[Job] = []
        while self._waiting and len(batch) < self.max_batch_size:
            job = self._waiting.popleft()
            size = job.size or request_size(job.request)
            fits = not batch or batch_tokens([*sizes, size]) <= self.max_batch_tokens
            if cost_class(job.request) == kind and fits:
                batch.append(job)
                sizes.append(size)
            else:
                skipped.append(job)
        self._waiting.extendleft(reversed(skipped))
        return batch

    def _take_joiners(self, running: list[Job]) -> list[Job]:
        """Waiting requests that join the running batch at its next step: from the head of
        the queue, while the head is of the batch's cost class and fits its rows and tokens.
        Caller holds the condition."""
        if not running or self._stopping or not self.continuous:
            return []
        kind = cost_class(running[0].request)
        sizes = [job.size or request_size(job.request) for job in running]
        joining: list[Job] = []
        while self._waiting and len(running) + len(joining) < self.max_batch_size:
            job = self._waiting[0]
            size = job.size or request_size(job.request)
            if cost_class(job.request) != kind:
                break
            if batch_tokens([*sizes, size]) > self.max_batch_tokens:
                break
            joining.append(self._waiting.popleft())
            sizes.append(size)
        return joining

    def _run_call(self, function: Callable[[Engine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(self.engine))
        except BaseException as error:  # handed to the caller, who decides
            future.set_exception(error)

    def _loadable(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose adapters are loaded; the others fail alone. An adapter can leave
        the mixture between a request's routing and its batch (the sync retires it a little
        later, but not never)."""
        runnable = []
        for job in jobs:
            composition = job.request.composition
            missing = [key for key in composition.adapters if key not in self.engine.registry]
            if missing:
                names = ", ".join(missing)
                job._deliver(Failure("adapter_unavailable", f"Adapter {names} is not loaded."))
            else:
                runnable.append(job)
        return runnable

    def _run_batch(self, first: list[Job]) -> None:
        """Run a batch from these jobs until it has no rows, letting waiting jobs join it
        between steps. If a step fails, its unfinished jobs run again one by one."""
        members: list[Job] = []  # every job that joined, finished or not
        try:
            with self.engine.running() as batch:
                state = _Running(batch=batch, members=members)
                self._join(state, first)
                while len(batch):
                    for event in batch.sample():
                        self._hand_out(state, event)
                    batch.forward()
                    if not len(batch):
                        break
                    with self._condition:
                        calls = list(self._calls)
                        self._calls.clear()
                        joining = self._take_joiners(state.running)
                        self._running = state.running + joining
                    if calls:
                        with batch.binding.paused():
                            for function, future in calls:
                                self._run_call(function, future)
                    if joining:
                        with self._condition:
                            self._joined += len(joining)
                        self._join(state, joining)
        except Exception as error:
            if len(members) == 1:
                logger.exception("A request failed in the engine")
                members[0]._deliver(Failure("engine_error", _engine_failed(error)))
                members[0].finished = True
            else:
                logger.exception(
                    "A batch of %d requests failed; running its unfinished rows apart",
                    len(members),
                )
                for job in members:
                    if not job.finished:
                        self._run_alone(job)
        finally:
            with self._condition:
                self._batches += bool(members)
                self._completed += len(members)

    def _join(self, state: _Running, jobs: list[Job]) -> None:
        """Add jobs to the running batch. A request the engine refuses fails alone; when
        the newcomers' prefill raises, they join one by one, so that only the one that
        breaks it fails (the running rows are not touched by a failed join)."""
        jobs = self._loadable(jobs)
        try:
            self.engine.check([job.request for job in jobs])
        except GenerationError:
            jobs = [job for job in jobs if self._check_alone(job)]
        if not jobs:
            return
        try:
            self._join_group(state, jobs)
            return
        except Exception as error:
            if len(jobs) == 1:
                self._failed_alone(jobs[0], error)
                return
            logger.exception("The prefill of %d requests failed; joining them apart", len(jobs))
        for job in jobs:
            try:
                self._join_group(state, [job])
            except Exception as error:
                self._failed_alone(job, error)

    def _failed_alone(self, job: Job, error: Exception) -> None:
        logger.exception(
            "Request %s failed in the engine on its own", job.request.request_id, exc_info=error
        )
        job._deliver(Failure("engine_error", _engine_failed(error)))
        job.finished = True

    def _join_group(self, state: _Running, jobs: list[Job]) -> None:
        joined_at = time.monotonic()
        for job in jobs:
            job.started_at = joined_at
        handles = state.batch.join([job.request for job in jobs])
        for job, handle in zip(jobs, handles, strict=True):
            state.handles[handle] = job
            state.running.append(job)
            state.members.append(job)

    def _hand_out(self, state: _Running, event: StreamEvent) -> None:
        job = state.handles[event.index]
        if job.cancelled and not job.cancel_sent:
            # Cancelled between leaving the queue and the engine taking the batch,
            # when the engine did not know the request yet: pass it on now.
            job.cancel_sent = self.engine.cancel(job.request.request_id)
        job.sent.append(event.token_id)
        job._deliver(event)
        if event.result is not None:
            self._finish(job)
            state.running.remove(job)

    def _finish(self, job: Job) -> None:
        job.finished = True
        job.finished_at = time.monotonic()
        job._deliver(None)
        if job.started_at is not None:
            elapsed = job.finished_at - job.started_at
            with self._condition:
                self._request_seconds = (
                    elapsed
                    if not self._request_seconds
                    else 0.8 * self._request_seconds + 0.2 * elapsed
                )

    def _pass_on(self, job: Job, stream: Iterator[StreamEvent], *, resume: list) -> None:
        """Hand a rerun's events to its job. ``resume``: the token ids the job already sent;
        its rerun's events for them must match and are not sent again."""
        skip = list(resume)
        for event in stream:
            if skip:
                if event.token_id != skip.pop(0):
                    raise _Diverged
                if event.result is None:
                    continue
                event = replace(event, text="")  # its text went out with the first run
            else:
                job.sent.append(event.token_id)
            job._deliver(event)
            if event.result is not None:
                self._finish(job)

    def _run_alone(self, job: Job) -> None:
        """Run one row of a failed batch by itself: it completes, resumes, or fails alone."""
        if job.cancelled:
            job._deliver(None)
            return
        try:
            stream = self.engine.generate_stream([job.request])
            try:
                self._pass_on(job, stream, resume=job.sent)
            finally:
                stream.close()
        except GenerationError as error:
            job._deliver(Failure("invalid_request", str(error)))
        except _Diverged:
            logger.error(
                "Request %s could not resume after its batch failed", job.request.request_id
            )
            job._deliver(
                Failure(
                    "engine_error",
                    "The engine failed while answering and the answer could not be resumed; "
                    "try again.",
                )
            )
        except Exception as error:
            logger.exception("Request %s failed in the engine on its own", job.request.request_id)
            job._deliver(Failure("engine_error", _engine_failed(error)))

    def _check_alone(self, job: Job) -> bool:
        try:
            self.engine.check([job.request])
        except GenerationError as error:
            job._deliver(Failure("invalid_request", str(error)))
            return False
        return True


def _engine_failed(error: BaseException) -> str:
    return f"The engine failed on this request ({type(error).__name__}); try again."
