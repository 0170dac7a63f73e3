"""A real inference server for the API tests: uvicorn serving tessera.serving's application
on a free port, in a thread of the test process, over the suite's PostgreSQL and Redis, with
the tiny random Llama as the base model."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn

from contributions import services
from contributions.models import AdapterVersion
from evaluation.models import Example, RoutingSignature, Suite, SuiteVersion, Task
from evaluation.tasks import evaluate_run
from evaluation.worker.signatures import EMBEDDING_MODEL, centroid, embed
from routing.serving import runtime
from tests.conftest import redis_url
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    child,
    fast_eval,
    model_cache,
    tiny_base_model,
    tiny_model_source,
)
from tests.factories import AdapterFactory
from tests.support import crafted

Status = AdapterVersion.Status
API_REDIS_DB = 3
UNITS_PROMPTS = [
    "Convert 5 km to metres.",
    "How many grams are in 3 kg?",
    "Convert 2 hours to minutes.",
]
DATES_PROMPTS = ["Rewrite 2024-03-05 as 5 March 2024.", "Format the date 1999-12-31 as a sentence."]


@dataclass
class Server:
    url: str
    uvicorn: uvicorn.Server

    @property
    def runtime(self) -> runtime.Runtime:
        return runtime.current()


@pytest.fixture
def no_evaluation(monkeypatch) -> None:
    """Uploads made by these tests are admitted by hand; their evaluation is not sent."""
    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)


@pytest.fixture
def api_redis_db(settings, redis_proc):
    """The API's Redis (limits, usage) is a database of the suite's Redis of its own, empty
    per test."""
    from routing.limits import redis_sync

    settings.TESSERA_API_REDIS_URL = redis_url(redis_proc, API_REDIS_DB)
    client = redis_sync()
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def start_server(api_redis_db, no_evaluation, settings):
    """Start the inference server on the active base model; stopped after the test."""
    settings.TESSERA_MIXTURE_POLL_SECONDS = 0.05
    running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start() -> Server:
        from tessera.serving import application

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(application, lifespan="on", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the inference server did not start")
            time.sleep(0.02)
        return Server(url=f"http://127.0.0.1:{port}", uvicorn=server)

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def server(tiny_base_model, start_server) -> Server:  # noqa: F811
    return start_server()


def admitted_version(
    owner, *, slug: str, prompts: list[str], private: bool = False, seed: int = 1
) -> AdapterVersion:
    """A real tiny PEFT adapter uploaded, given a routing signature from ``prompts`` and
    admitted (publishing a new mixture, as the review queue does)."""
    adapter = AdapterFactory(
        owner=owner,
        slug=slug,
        example_prompts=prompts,
        visibility="private" if private else "public",
    )
    version = services.adapter_version_create(
        adapter=adapter, actor=owner, parts=crafted.real_adapter(seed=seed).parts()
    )
    RoutingSignature.objects.create(
        version=version,
        embedding_model=EMBEDDING_MODEL,
        vector=[float(x) for x in centroid(embed(prompts))],
        prompt_count=len(prompts),
    )
    return walk_to_admitted(version)


PATH = [Status.QUEUED, Status.EVALUATING, Status.PASSED, Status.ADMITTED]


def walk_to_admitted(version: AdapterVersion) -> AdapterVersion:
    """Walk a version along the life cycle, as evaluation and review would."""
    version.refresh_from_db()
    start = PATH.index(version.status) + 1 if version.status in PATH else 0
    for status in PATH[start:]:
        version = services.adapter_version_transition(version=version, to_status=status, actor=None)
    return version


# --- A small union: two skills with hidden and paraphrase splits --------------------------

SECRET = "zq-hidden-marker"  # in every hidden and paraphrase example: must never leak
UNITS_HIDDEN = [f"Convert {n} km to metres. {SECRET}" for n in (3, 7, 12, 40)]
UNITS_PARAPHRASE = [f"I walked {n} km today; how many metres is that? {SECRET}" for n in (5, 9)]
DATES_HIDDEN = [
    f"Rewrite 20{y}-0{m}-1{m} as a date in words. {SECRET}" for y, m in ((10, 3), (21, 4))
]
DATES_PARAPHRASE = [f"Please spell out the date 1998-0{m}-2{m} in words. {SECRET}" for m in (5, 6)]


def _task(suite: SuiteVersion, slug: str, hidden: list[str], paraphrase: list[str]) -> Task:
    task = Task.objects.create(
        suite_version=suite,
        slug=slug,
        title=slug.title(),
        tags=[slug],
        metric="exact_match",
        prompt_template="{question}",
        max_new_tokens=6,
    )
    for split, prompts in ((Example.Split.HIDDEN, hidden), (Example.Split.PARAPHRASE, paraphrase)):
        for position, prompt in enumerate(prompts):
            Example.objects.create(
                task=task,
                split=split,
                position=position,
                fields={"question": prompt},
                target=f"answer {SECRET}",
                prompt_template="{question}" if split == Example.Split.PARAPHRASE else "",
            )
    return task


@pytest.fixture
def union(db):
    suite = Suite.objects.create(slug="skills", title="Skills", purpose=Suite.Purpose.SKILL)
    version = SuiteVersion.objects.create(suite=suite, number=1, source_sha256="0" * 64)
    return (
        _task(version, "units", UNITS_HIDDEN, UNITS_PARAPHRASE),
        _task(version, "dates", DATES_HIDDEN, DATES_PARAPHRASE),
    )


@pytest.fixture
def sent_tasks(monkeypatch) -> dict[str, list]:
    """{task name: [(args, queue), ...]} of what the code sends by name instead of the
    broker (the jobs a publish queues)."""
    from tessera.celery import app as celery_app

    sent: dict[str, list] = {}
    monkeypatch.setattr(
        celery_app,
        "send_task",
        lambda name, args, queue: sent.setdefault(name, []).append((args, queue)),
    )
    return sent
