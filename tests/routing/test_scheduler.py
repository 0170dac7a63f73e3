"""The scheduler thread: requests waiting during a batch form the next batch, a full queue
refuses, a waiting request can be cancelled, one bad request fails alone, and work handed in
with ``call`` runs between two batches. On the tiny random Llama."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from safetensors.torch import load

from multilora import Composition, Engine, GenerationRequest
from routing.serving.scheduler import Failure, Job, QueueFull, Scheduler, Size, batch_tokens
from tests.multilora.test_engine import random_adapter
from tests.support.tiny_model import tiny_llama_config, tiny_tokenizer


@pytest.fixture(scope="module")
def engine() -> Engine:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    return Engine(model, tiny_tokenizer())


@pytest.fixture
def scheduler(engine):
    scheduler = Scheduler(engine, max_batch_size=4, max_queue=8)
    yield scheduler
    scheduler.stop()


def request(n: int = 8, **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt="The capital of France is", max_new_tokens=n, **kwargs)


async def drain(job) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(job.events.get(), timeout=30)
        if item is None or isinstance(item, Failure):
            items.append(item)
            return items
        items.append(item)


def settled(scheduler: Scheduler, *, completed: int):
    """The stats once ``completed`` requests are counted: the counters move just after a
    batch's last event is handed out."""
    deadline = time.monotonic() + 5
    while scheduler.stats().completed < completed and time.monotonic() < deadline:
        time.sleep(0.01)
    return scheduler.stats()


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_waiting_together_share_one_batch_and_get_their_own_results(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        # Queued before the thread starts: they are all waiting when it looks.
        jobs = [scheduler.submit(request(4 + i, seed=i), loop=loop) for i in range(4)]
        scheduler.start()
        return [await drain(job) for job in jobs]

    results = run(main())
    assert settled(scheduler, completed=4).batches == 1
    for i, items in enumerate(results):
        assert items[-1] is None
        final = items[-2].result
        assert final.completion_tokens <= 4 + i
        assert final.finish_reason in ("stop", "length")


def test_requests_beyond_the_batch_size_run_in_the_next_batch(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(request(3), loop=loop) for _ in range(6)]
        scheduler.start()
        for job in jobs:
            await drain(job)

    run(main())
    stats = settled(scheduler, completed=6)
    assert (stats.batches, stats.completed) == (2, 6)


def test_arrow_requests_are_batched_apart_from_plain_ones_without_losing_their_turn(
    scheduler, engine
):
    for key, seed in (("x", 1), ("y", 2)):
        if key not in engine.registry:
            adapter = random_adapter(key, seed=seed, rank=4, targets=("q_proj", "v_proj"))
            engine.add_adapter(key, lora_config=adapter.config, tensors=load(adapter.weights))
    arrow = Composition.arrow(("x", "y"), k=1)
    order = [Composition.single("x"), arrow, Composition.base(), arrow, Composition.single("y")]
    started: list[tuple[int, str]] = []

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(request(3, composition=c), loop=loop) for c in order]
        scheduler.start()
        for job in jobs:
            items = await drain(job)
            assert items[-1] is None
            started.append((job.started_at, job.request.composition.method))

    run(main())
    stats = settled(scheduler, completed=5)
    assert stats.batches == 2
    by_batch: dict[float, set[str]] = {}
    for at, method in started:
        by_batch.setdefault(at, set()).add("arrow" if method == "arrow" else "plain")
    assert sorted(map(sorted, by_batch.values())) == [["arrow"], ["plain"]]
    # The oldest request was plain, so the plain batch ran first.
    first = min(by_batch)
    assert by_batch[first] == {"plain"}


def test_a_full_queue_refuses_with_a_retry_after(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(8):
            scheduler.submit(request(), loop=loop)
        with pytest.raises(QueueFull) as raised:
            scheduler.submit(request(), loop=loop)
        assert raised.value.retry_after >= 1

    run(main())
    assert scheduler.stats().waiting == 8


def test_a_waiting_request_that_is_cancelled_never_runs(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        kept = scheduler.submit(request(2), loop=loop)
        dropped = scheduler.submit(request(2), loop=loop)
        scheduler.cancel(dropped)
        assert await drain(dropped) == [None]
        scheduler.start()
        await drain(kept)

    run(main())
    assert settled(scheduler, completed=1).completed == 1


def test_a_request_for_an_adapter_that_left_fails_alone(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        gone = scheduler.submit(request(2, composition=Composition.single("v999")), loop=loop)
        fine = scheduler.submit(request(2), loop=loop)
        scheduler.start()
        return await drain(gone), await drain(fine)

    gone, fine = run(main())
    assert isinstance(gone[-1], Failure) and gone[-1].code == "adapter_unavailable"
    assert fine[-1] is None and fine[-2].result is not None


def test_an_invalid_request_fails_alone_and_its_neighbours_run(scheduler):
    async def main():
        loop = asyncio.get_running_loop()
        bad = scheduler.submit(GenerationRequest(prompt="x", max_new_tokens=10_000), loop=loop)
        good = scheduler.submit(request(2), loop=loop)
        scheduler.start()
        return await drain(bad), await drain(good)

    bad, good = run(main())
    assert isinstance(bad[-1], Failure) and bad[-1].code == "invalid_request"
    assert "context" in bad[-1].message
    assert good[-2].result.completion_tokens >= 1


def test_a_call_runs_on_the_scheduler_thread_between_batches(scheduler):
    seen: list[str] = []
    future = scheduler.call(lambda engine: seen.append(threading.current_thread().name) or 42)
    scheduler.start()
    assert future.result(timeout=30) == 42
    assert seen == ["tessera-scheduler"]


def test_a_running_request_is_stopped_by_cancel(scheduler, engine):
    async def main():
        loop = asyncio.get_running_loop()
        job = scheduler.submit(request(200, ignore_eos=True), loop=loop)
        scheduler.start()
        first = await asyncio.wait_for(job.events.get(), timeout=30)
        assert first.token_id is not None
        scheduler.cancel(job)
        items = await drain(job)
        return items

    items = run(main())
    final = items[-2].result
    assert final.finish_reason == "cancelled"
    assert final.completion_tokens < 200


def test_a_request_cancelled_as_its_batch_forms_is_still_stopped(scheduler):
    """Cancelled after leaving the queue but before the engine knew it (the engine then
    answers False): the batch loop passes the cancellation on at the first event."""

    async def main():
        loop = asyncio.get_running_loop()
        job = Job(request=request(200, ignore_eos=True), loop=loop)
        job.cancelled = True  # what Scheduler.cancel leaves behind in that window
        await asyncio.to_thread(scheduler._run_batch, [job])
        return await drain(job)

    items = run(main())
    final = items[-2].result
    assert final.finish_reason == "cancelled"
    assert final.completion_tokens <= 2


# --- Token bounds ---------------------------------------------------------------------------


def ids(n: int) -> list[int]:
    return list(range(10, 10 + n))


def test_a_batch_holds_no_more_tokens_than_its_bound(engine):
    # Each request: 1 lane x (6 prompt tokens + 4 new) = 10 tokens; two fit in 20, not three.
    scheduler = Scheduler(engine, max_batch_size=16, max_batch_tokens=20, max_queue=8)
    try:

        async def main():
            loop = asyncio.get_running_loop()
            jobs = [
                scheduler.submit(GenerationRequest(prompt_ids=ids(6), max_new_tokens=4), loop=loop)
                for _ in range(5)
            ]
            scheduler.start()
            for job in jobs:
                await drain(job)
            return [job.started_at for job in jobs]

        started = run(main())
    finally:
        scheduler.stop()
    assert settled(scheduler, completed=5).batches == 3
    assert [started.count(at) for at in dict.fromkeys(started)] == [2, 2, 1]


def test_the_token_bound_counts_the_padded_cache_and_a_large_request_still_runs_alone(engine):
    assert batch_tokens([Size(1, 6, 4), Size(1, 30, 2)]) == 2 * (30 + 4)
    assert batch_tokens([Size(3, 5, 5)]) == 30  # a logit request: one lane per adapter
    scheduler = Scheduler(engine, max_batch_size=16, max_batch_tokens=20, max_queue=8)
    try:

        async def main():
            loop = asyncio.get_running_loop()
            big = scheduler.submit(
                GenerationRequest(prompt_ids=ids(30), max_new_tokens=4), loop=loop
            )
            small = scheduler.submit(
                GenerationRequest(prompt_ids=ids(3), max_new_tokens=2), loop=loop
            )
            scheduler.start()
            return await drain(big), await drain(small)

        big, small = run(main())
    finally:
        scheduler.stop()
    assert big[-1] is None and small[-1] is None
    assert settled(scheduler, completed=2).batches == 2


# --- One row's failure stays its own ------------------------------------------------------

POISON = "Poisoned prompt"


def failing_forward(monkeypatch, engine, *, when):
    """The model's forward raises when ``when(input_ids)`` holds: a failure at the engine's
    edge that no check foresees."""
    forward = engine.model.forward

    def patched(*args, **kwargs):
        if when(kwargs["input_ids"]):
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", patched)


def texts_of(items) -> tuple[str, str]:
    """(the streamed text, the result's text) of a drained job."""
    events = [item for item in items if item is not None and not isinstance(item, Failure)]
    return "".join(event.text for event in events), events[-1].result.text


GOOD = [
    request(8, seed=None),
    request(8, temperature=0.9, seed=5),
    GenerationRequest(prompt="Add 123 and 456:", max_new_tokens=8),
]


def alone(engine, requests) -> list[str]:
    return [engine.generate([r])[0].text for r in requests]


def test_a_row_that_breaks_the_engine_fails_alone_and_its_neighbours_answer_as_alone(
    scheduler, engine, monkeypatch
):
    expected = alone(engine, GOOD)
    poison = engine.tokenizer(POISON)["input_ids"]

    def holds_poison(input_ids) -> bool:
        width = len(poison)
        return input_ids.shape[1] >= width and any(
            row[-width:].tolist() == poison for row in input_ids
        )

    failing_forward(monkeypatch, engine, when=holds_poison)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(r, loop=loop) for r in GOOD[:2]]
        jobs.append(scheduler.submit(GenerationRequest(prompt=POISON, max_new_tokens=8), loop=loop))
        jobs.append(scheduler.submit(GOOD[2], loop=loop))
        scheduler.start()
        return [await drain(job) for job in jobs]

    first, second, bad, third = run(main())
    assert settled(scheduler, completed=4).batches == 1
    assert isinstance(bad[-1], Failure) and bad[-1].code == "engine_error"
    assert "RuntimeError" in bad[-1].message
    for items, text in zip((first, second, third), expected, strict=True):
        assert items[-1] is None
        assert texts_of(items) == (text, text)


def test_rows_of_a_batch_that_fails_mid_answer_resume_without_repeating_what_they_sent(
    scheduler, engine, monkeypatch
):
    expected = alone(engine, GOOD)
    steps = {"batched": 0}

    def third_batched_step(input_ids) -> bool:
        # The batch's third decoding step raises, once; the rows then run apart.
        if input_ids.shape == (3, 1):
            steps["batched"] += 1
            return steps["batched"] == 3
        return False

    failing_forward(monkeypatch, engine, when=third_batched_step)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(r, loop=loop) for r in GOOD]
        scheduler.start()
        return [await drain(job) for job in jobs]

    results = run(main())
    assert steps["batched"] == 3
    for items, text in zip(results, expected, strict=True):
        assert items[-1] is None, items[-1]
        # Tokens streamed before the failure are not streamed twice.
        assert texts_of(items) == (text, text)
        events = items[:-1]
        assert len(events) == events[-1].result.completion_tokens > 3


# --- Continuous batching ----------------------------------------------------------------------


async def first_events(job, count: int) -> list:
    return [await asyncio.wait_for(job.events.get(), timeout=30) for _ in range(count)]


def test_a_request_that_arrives_while_a_batch_decodes_joins_it_and_answers_first(scheduler, engine):
    long = request(120, ignore_eos=True)
    short = GenerationRequest(prompt="Add 123 and 456:", max_new_tokens=4, ignore_eos=True)
    (expected,) = engine.generate([short])

    async def main():
        loop = asyncio.get_running_loop()
        scheduler.start()
        long_job = scheduler.submit(long, loop=loop)
        head = await first_events(long_job, 3)  # the long answer is decoding
        short_job = scheduler.submit(short, loop=loop)
        short_items = await drain(short_job)
        # The short answer is whole while the long one is still being made.
        assert not long_job.finished
        long_items = head + await drain(long_job)
        return long_job, short_job, short_items, long_items

    long_job, short_job, short_items, long_items = run(main())
    stats = settled(scheduler, completed=2)
    assert (stats.batches, stats.joined) == (1, 1)
    assert short_job.started_at > long_job.started_at
    assert short_job.finished_at < long_job.finished_at
    assert short_items[-2].result.token_ids == expected.token_ids
    assert long_items[-2].result.completion_tokens == 120


def test_joining_stops_at_a_waiting_request_of_another_class_so_it_is_not_passed(scheduler, engine):
    for key, seed in (("x", 1), ("y", 2)):
        if key not in engine.registry:
            adapter = random_adapter(key, seed=seed, rank=4, targets=("q_proj", "v_proj"))
            engine.add_adapter(key, lora_config=adapter.config, tensors=load(adapter.weights))
    arrow = Composition.arrow(("x", "y"), k=1)

    async def main():
        loop = asyncio.get_running_loop()
        scheduler.start()
        long_job = scheduler.submit(request(40, ignore_eos=True), loop=loop)
        await first_events(long_job, 2)
        arrow_job = scheduler.submit(request(3, composition=arrow), loop=loop)
        plain_job = scheduler.submit(request(3, composition=Composition.single("x")), loop=loop)
        for job in (long_job, arrow_job, plain_job):
            await drain(job)
        return long_job, arrow_job, plain_job

    long_job, arrow_job, plain_job = run(main())
    stats = settled(scheduler, completed=3)
    assert stats.joined == 0
    # The Arrow request waited for the plain batch to drain, and the later plain request
    # waited behind it instead of joining the plain batch ahead of it.
    assert arrow_job.started_at >= long_job.finished_at
    assert plain_job.started_at >= arrow_job.started_at


def test_a_call_runs_between_two_steps_of_a_running_batch_which_then_goes_on_unchanged(
    scheduler, engine
):
    if "x" not in engine.registry:
        adapter = random_adapter("x", seed=1, rank=4, targets=("q_proj", "v_proj"))
        engine.add_adapter("x", lora_config=adapter.config, tensors=load(adapter.weights))
    long = request(60, ignore_eos=True, composition=Composition.single("x"))
    (expected,) = engine.generate([long])
    bound_in_call: list[bool] = []

    def look(engine) -> int:
        bound_in_call.append(any(m.lora is not None for m in engine.lora.modules.values()))
        return threading.current_thread().name

    async def main():
        loop = asyncio.get_running_loop()
        scheduler.start()
        job = scheduler.submit(long, loop=loop)
        head = await first_events(job, 2)
        future = scheduler.call(look)
        name = await asyncio.wrap_future(future)
        assert not job.finished  # it ran while the batch was decoding
        return name, head + await drain(job)

    name, items = run(main())
    assert name == "tessera-scheduler"
    assert bound_in_call == [False]  # the base model alone inside the call
    assert items[-2].result.token_ids == expected.token_ids
