"""The one thread that owns the engine: it takes waiting requests in batches and hands each
row's tokens back to the asyncio side as they are made.

Batching policy: requests that arrive while a batch is decoding wait for the NEXT BATCH
(they do not join the running one at its next step). Joining mid-batch would mean prefilling
the newcomers, then re-padding and concatenating every layer's key/value cache of the running
batch at each arrival; on CPU, where one prefill of a 16-row batch costs about as much as ten
decoding steps, that stalls the running rows more than the newcomers gain. A batch ends when
its slowest row ends, so the wait is bounded by the per-request max_tokens cap; the server
keeps batches short by capping max_tokens (TESSERA_SERVING_MAX_TOKENS) and the queue
(TESSERA_SERVING_MAX_QUEUE, 503 with Retry-After beyond it).

A batch takes the oldest waiting request and the next waiting ones of its cost class
(``cost_class``): requests composed with Arrow are batched among themselves, because every
row of a batch runs at the widest row's LoRA rank. A batch is bounded in rows
(TESSERA_SERVING_MAX_BATCH) and in tokens (TESSERA_SERVING_MAX_BATCH_TOKENS): its key/value
cache holds, for every row, the widest prompt plus the longest max_tokens of the batch, so a
request joins a batch only while ``lanes x (widest prompt + longest max_tokens)`` stays
within the bound. A request over the bound by itself still runs, alone.

One request never fails its batch: requests the engine refuses are checked one by one and
fail alone, and when a batch step raises (a request that passed every check and still
breaks the engine), the batch's unfinished rows are run again one at a time, so only the
row that fails alone gets an error. A row that had already streamed tokens resumes where it
was: its rerun reproduces the tokens already sent (greedy rows, and sampled rows, whose
seed is fixed here at submission when the client gave none), which are skipped.

Work that must not run while a batch decodes (anything that uses the model without the
batch's LoRA binding, such as Arrow routing's base-model pass) is submitted with ``call``
and runs between two batches.
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
    started_at: float | None = None
    cancelled: bool = False
    cancel_sent: bool = False  # the engine has been told
    size: Size | None = None
    sent: list[int | None] = field(default_factory=list)  # token ids of the events sent
    finished: bool = False  # its result was sent

    def _deliver(self, item: Any) -> None:
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass(frozen=True)
class SchedulerStats:
    waiting: int
    running: int
    batches: int
    completed: int
    mean_batch_seconds: float


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int = 16384,
        max_queue: int = 64,
        gather_seconds: float = 0.002,
    ) -> None:
        self.engine = engine
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
        self._completed = 0
        self._batch_seconds = 0.0  # exponential moving average, for Retry-After

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
        """Seconds a refused client should wait: about one batch's time, at least 1."""
        return max(1, round(self._batch_seconds or 1.0))

    def stats(self) -> SchedulerStats:
        with self._condition:
            return SchedulerStats(
                waiting=len(self._waiting),
                running=len(self._running),
                batches=self._batches,
                completed=self._completed,
                mean_batch_seconds=self._batch_seconds,
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

    def _run_call(self, function: Callable[[Engine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(self.engine))
        except BaseException as error:  # handed to the caller, who decides
            future.set_exception(error)

    def _run_batch(self, batch: list[Job]) -> None:
        # An adapter can leave the mixture between a request's routing and its batch (the
        # sync retires it a little later, but not never): fail that request alone.
        runnable = []
        for job in batch:
            composition = job.request.composition
            missing = [key for key in composition.adapters if key not in self.engine.registry]
            if missing:
                names = ", ".join(missing)
                job._deliver(Failure("adapter_unavailable", f"Adapter {names} is not loaded."))
            else:
                runnable.append(job)
        if not runnable:
            return
        started = time.monotonic()
        for job in runnable:
            job.started_at = started
        try:
            try:
                stream = self.engine.generate_stream([job.request for job in runnable])
            except GenerationError:
                # One bad request must not fail its neighbours: check each alone, run the rest.
                runnable = [job for job in runnable if self._check_alone(job)]
                if not runnable:
                    return
                stream = self.engine.generate_stream([job.request for job in runnable])
            self._pass_on(runnable, stream)
        except Exception as error:
            if len(runnable) == 1:
                logger.exception("A request failed in the engine")
                runnable[0]._deliver(Failure("engine_error", _engine_failed(error)))
            else:
                logger.exception(
                    "A batch of %d requests failed; running its unfinished rows apart",
                    len(runnable),
                )
                for job in runnable:
                    if not job.finished:
                        self._run_alone(job)
        finally:
            elapsed = time.monotonic() - started
            with self._condition:
                self._batches += 1
                self._completed += len(runnable)
                self._batch_seconds = (
                    elapsed if self._batches == 1 else 0.8 * self._batch_seconds + 0.2 * elapsed
                )

    def _pass_on(
        self, jobs: list[Job], stream: Iterator[StreamEvent], *, resume: list | None = None
    ) -> None:
        """Hand each event to its job. ``resume``: the token ids one job (``jobs[0]``, run
        alone) already sent; its rerun's events for them must match and are not sent
        again."""
        skip = list(resume or ())
        for event in stream:
            job = jobs[event.index]
            if job.cancelled and not job.cancel_sent:
                # Cancelled between leaving the queue and the engine taking the batch,
                # when the engine did not know the request yet: pass it on now.
                job.cancel_sent = self.engine.cancel(job.request.request_id)
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
                job.finished = True
                job._deliver(None)

    def _run_alone(self, job: Job) -> None:
        """Run one row of a failed batch by itself: it completes, resumes, or fails alone."""
        if job.cancelled:
            job._deliver(None)
            return
        try:
            stream = self.engine.generate_stream([job.request])
            try:
                self._pass_on([job], stream, resume=job.sent)
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
            self.engine.generate_stream([job.request]).close()
        except GenerationError as error:
            job._deliver(Failure("invalid_request", str(error)))
            return False
        return True


def _engine_failed(error: BaseException) -> str:
    return f"The engine failed on this request ({type(error).__name__}); try again."
