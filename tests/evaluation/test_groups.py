"""Queued runs evaluated in groups: up to TESSERA_EVAL_GROUP_SIZE runs in one child.

The service and the sandbox are real; the child is a stand-in that answers every adapter
of its job (each run's adapter key names it), and can refuse an adapter, answer one
adapter's part malformed, or crash whenever a given adapter is in its job.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from contributions import services as contribution_services
from evaluation.models import (
    BaseScore,
    ContributorTestSet,
    EvaluationRun,
    Outcome,
    RuleResult,
    TaskResult,
)
from evaluation.models import TestSetResult as SetResult  # not a pytest class
from evaluation.services import execution, reaper
from evaluation.services.groups import log_for
from tests.evaluation.test_runs import execute, fresh, make_task
from tests.support import crafted

Run = EvaluationRun.Status
REFUSAL = "AdapterLoadError: lora_A of q_proj has rank 3, the config says 8"


def key(run: EvaluationRun) -> str:
    return f"run:{run.pk}"


def group_child_code(
    *,
    losers: tuple[str, ...] = (),
    refuse: tuple[str, ...] = (),
    malformed: tuple[str, ...] = (),
    crash_with: tuple[str, ...] = (),
    sleep: float = 0.0,
) -> str:
    """A stand-in child for jobs of many adapters. Base scores 0; each adapter scores 1 on
    every example (0 for ``losers``). An adapter in ``refuse`` is named in ``failed``; one
    in ``malformed`` gets one score too few on each task; the child exits 3 when any
    adapter of ``crash_with`` is in its job. Its log's first line names the child by a
    random token and counts the job's adapters; then one line per adapter loaded."""
    return textwrap.dedent(
        f"""
        import json, sys, time, uuid
        job = json.loads(sys.stdin.read())
        keys = [a["key"] for a in job["adapters"]]
        print(f"fake child {{uuid.uuid4().hex}} adapters={{len(keys)}}", file=sys.stderr)
        if set(keys) & set({list(crash_with)!r}):
            print("Fatal Python error: Segmentation fault", file=sys.stderr, flush=True)
            sys.exit(3)
        losers, refuse, malformed = {list(losers)!r}, {list(refuse)!r}, {list(malformed)!r}
        total = sum(len(t["examples"]) for t in job["tasks"])
        print(json.dumps({{"progress": 0, "total": total, "label": "fake"}}), flush=True)
        time.sleep({sleep})
        for k in keys:
            if k in refuse:
                print(f"[child] {{k}}: refused by the engine: {REFUSAL}", file=sys.stderr)
            else:
                print(f"[child] {{k}}: LoRA loaded", file=sys.stderr)
        scores = {{}}
        for task in job["tasks"]:
            n = len(task["examples"])
            wanted = keys if task["adapters"] is None else task["adapters"]
            scores[task["key"]] = {{
                "base": [0.0] * n if task["score_base"] else None,
                "adapters": {{
                    k: [0.0 if k in losers else 1.0] * (n - (k in malformed))
                    for k in wanted if k not in refuse
                }},
            }}
        sketches = {{
            a["key"]: {{m: [float(i % 7) for i in range(256)]
                       for m in a["lora_config"]["target_modules"]}}
            for a in job["adapters"] if a["key"] not in refuse
        }}
        failed = {{k: "{REFUSAL}" for k in keys if k in refuse}}
        print(json.dumps({{"progress": total, "total": total, "label": "fake"}}), flush=True)
        answer = {{"scores": scores, "sketches": sketches, "failed": failed}}
        print(json.dumps({{"result": answer}}), flush=True)
        """
    )


def group_child(**options) -> list[str]:
    return [sys.executable, "-c", group_child_code(**options)]


@pytest.fixture
def children(monkeypatch) -> list[list[str]]:
    """The adapter keys of every child started, one list per child."""
    started: list[list[str]] = []
    original = execution.run_sandboxed

    def spy(argv, *, stdin_bytes, **kwargs):
        started.append([a["key"] for a in json.loads(stdin_bytes)["adapters"]])
        return original(argv, stdin_bytes=stdin_bytes, **kwargs)

    monkeypatch.setattr(execution, "run_sandboxed", spy)
    return started


def queued_runs(user, count: int, *, first_seed: int = 1, tags=("arithmetic",)):
    """``count`` uploads of distinct real adapters (each its own adapter), oldest first."""
    found = []
    for seed in range(first_seed, first_seed + count):
        adapter = contribution_services.adapter_create(
            owner=user,
            slug=f"adder-{seed}",
            title=f"Adder {seed}",
            license="Apache-2.0",
            intended_use="Add numbers.",
            training_data_summary="Synthetic sums.",
            example_prompts=["What is 1 + 2?", "Add 7 and 8.", "Sum 10 and 20."],
            task_tags=list(tags),
        )
        version = contribution_services.adapter_version_create(
            adapter=adapter,
            actor=user,
            parts=crafted.upload(crafted.real_adapter(seed=seed).files()),
        )
        found.append(EvaluationRun.objects.get(version=version))
    return found


@pytest.fixture
def tasks(db):
    target = make_task()
    general = make_task(suite="general", purpose="general", slug="general-qa", tags=["general"])
    return target, general


@pytest.fixture
def group_eval(tiny_base_model, fast_eval, tasks):
    """The tiny base model, quick settings, a targeted and a general task."""
    return tasks


# --- One child for the group ------------------------------------------------------------------


def test_eight_queued_runs_are_evaluated_in_one_child_each_with_its_own_outcome(
    contributor, group_eval, child, children, jobs
):
    target, general = group_eval
    runs = queued_runs(contributor, 8)
    losers = (key(runs[2]), key(runs[5]))
    child(group_child(losers=losers))

    assert execute(runs[0]) == "succeeded"
    assert children == [[key(r) for r in runs]]  # one child, every run's adapter, oldest first
    job = jobs[0]
    # The task splits every run measures appear once, for all of the job's adapters.
    assert [t.key for t in job.tasks] == [f"task:{target.pk}:hidden", f"task:{general.pk}:hidden"]
    assert all(t.adapters is None and t.score_base for t in job.tasks)
    for run in runs:
        run = fresh(run)
        lost = key(run) in losers
        assert (run.status, run.attempts, run.passed) == (Run.SUCCEEDED, 1, not lost)
        results = {r.task_id: r for r in TaskResult.objects.filter(run=run)}
        assert set(results) == {target.pk, general.pk}
        assert results[target.pk].adapter_score == (0.0 if lost else 1.0)
        rules = {r.rule: r.passed for r in RuleResult.objects.filter(run=run)}
        assert rules["gain:addition"] is (not lost)
        assert fresh(run.version).status == ("failed" if lost else "admitted")
        assert run.progress_done == run.progress_total > 0
        assert "one child for a group of 8 runs" in run.log
    # The base model was scored once for the group, and cached once.
    assert BaseScore.objects.filter(task=target).count() == 1
    # The other runs' own messages, delivered later, find them finished: no second child.
    assert [execute(run) for run in runs[1:]] == ["finished"] * 7
    assert len(children) == 1


def test_a_split_one_run_measures_whole_and_another_only_in_part_is_scored_whole_once(
    contributor, group_eval, child, children, jobs, settings
):
    # Admission reads an adapter's own task whole; another adapter measures it only for the
    # union, on its first TESSERA_EVAL_UNION_EXAMPLES examples. In one group the split is
    # scored once, whole, and each run records its own share.
    settings.TESSERA_EVAL_UNION_EXAMPLES = 5
    adding, _general = group_eval
    words = make_task(suite="words", slug="reversal", tags=["words"], template="Reverse {a}")
    adder = queued_runs(contributor, 1, first_seed=1, tags=("arithmetic",))[0]
    reverser = queued_runs(contributor, 1, first_seed=2, tags=("words",))[0]
    child(group_child())

    assert execute(adder) == "succeeded"
    assert children == [[key(adder), key(reverser)]]
    specs = {t.key: t for t in jobs[0].tasks}
    for task in (adding, words):
        assert len(specs[f"task:{task.pk}:hidden"].examples) == 12
        assert specs[f"task:{task.pk}:hidden"].adapters is None  # both adapters, one spec
    for run, own, other in ((adder, adding, words), (reverser, words, adding)):
        run = fresh(run)
        assert (run.status, run.passed) == (Run.SUCCEEDED, True), run.failure_reason
        hidden = TaskResult.objects.filter(run=run, split="hidden")
        assert {own.pk: 12, other.pk: 5}.items() <= dict(hidden.values_list("task_id", "n")).items()
        stored = Outcome.objects.filter(version=run.version, example__task=other)
        assert stored.count() == 5
    # The base model's scores are cached whole, whichever run recorded first.
    for task in (adding, words):
        assert len(BaseScore.objects.get(task=task, split="hidden").scores) == 12


def test_batch_mates_are_the_oldest_queued_runs_of_the_queue_never_one_marked_alone(
    contributor, group_eval, child, children, settings
):
    settings.TESSERA_EVAL_GROUP_SIZE = 3
    child(group_child())
    runs = queued_runs(contributor, 6)
    EvaluationRun.objects.filter(pk=runs[1].pk).update(alone=True)
    EvaluationRun.objects.filter(pk=runs[2].pk).update(queue="eval-gpu")
    # Queued again after its worker was lost: it must not cost its batch-mates an attempt.
    EvaluationRun.objects.filter(pk=runs[3].pk).update(attempts=1)

    assert execute(runs[5]) == "succeeded"
    assert children == [[key(runs[5]), key(runs[0]), key(runs[4])]]
    assert [fresh(r).status for r in runs] == [
        Run.SUCCEEDED,
        Run.QUEUED,
        Run.QUEUED,
        Run.QUEUED,
        Run.SUCCEEDED,
        Run.SUCCEEDED,
    ]
    # A run marked alone, or retried after a lost worker, gets a child of its own.
    assert execute(runs[1]) == "succeeded"
    assert execute(runs[3]) == "succeeded"
    assert children[1:] == [[key(runs[1])], [key(runs[3])]]


def test_a_contributors_test_set_is_scored_for_its_own_run_only(
    contributor, group_eval, child, jobs
):
    child(group_child())
    runs = queued_runs(contributor, 3)
    test_set = ContributorTestSet.objects.create(
        adapter=runs[1].version.adapter,
        name="my sums",
        metric="exact_match",
        examples=[{"fields": {"prompt": "1+1"}, "target": "2", "choices": []}] * 4,
        source_sha256="1" * 64,
    )
    assert execute(runs[0]) == "succeeded"
    spec = next(t for t in jobs[0].tasks if t.key == f"testset:{test_set.pk}")
    assert spec.adapters == [key(runs[1])]
    assert SetResult.objects.get(test_set=test_set).run_id == runs[1].pk
    assert not SetResult.objects.exclude(run=runs[1]).exists()


def test_with_a_group_size_of_one_each_run_gets_a_child_of_its_own(
    contributor, group_eval, child, children, jobs, settings
):
    settings.TESSERA_EVAL_GROUP_SIZE = 1
    child(group_child())
    runs = queued_runs(contributor, 3)
    assert execute(runs[0]) == "succeeded"
    assert children == [[key(runs[0])]]
    assert [fresh(r).status for r in runs[1:]] == [Run.QUEUED, Run.QUEUED]
    assert all(t.adapters is None for t in jobs[0].tasks)  # the job of one run, as before
    assert "group" not in fresh(runs[0]).log


# --- One run's failure is its own ---------------------------------------------------------------


def test_a_refused_adapter_and_a_malformed_answer_fail_their_own_runs_only(
    contributor, group_eval, child, children
):
    runs = queued_runs(contributor, 8)
    refused, malformed = runs[3], runs[6]
    child(group_child(refuse=(key(refused),), malformed=(key(malformed),)))

    assert execute(runs[0]) == "succeeded"
    assert len(children) == 1 and len(children[0]) == 8
    refused, malformed = fresh(refused), fresh(malformed)
    assert (refused.status, refused.failure_code) == (Run.FAILED, "adapter_refused")
    assert "rank 3, the config says 8" in refused.failure_reason
    assert (malformed.status, malformed.failure_code) == (Run.FAILED, "sandbox_bad_output")
    assert "not one per example" in malformed.failure_reason
    for run in (refused, malformed):
        assert fresh(run.version).status == "failed"
        assert not TaskResult.objects.filter(run=run).exists()
    others = [fresh(r) for r in runs if r.pk not in (refused.pk, malformed.pk)]
    assert [r.status for r in others] == [Run.SUCCEEDED] * 6
    assert all(r.passed for r in others)
    # Each run's log shows its own adapter's lines, never a batch-mate's.
    assert f"{key(refused)}: refused by the engine" in refused.log
    assert f"{key(others[0])}: LoRA loaded" in others[0].log
    assert not any(REFUSAL in r.log or key(refused) in r.log for r in others)


def test_a_run_that_targets_no_task_fails_with_its_rule_and_never_enters_the_job(
    contributor, group_eval, child, children
):
    child(group_child())
    runs = queued_runs(contributor, 2)
    (poetry,) = queued_runs(contributor, 1, first_seed=20, tags=("poetry",))
    assert execute(poetry) == "failed"
    poetry = fresh(poetry)
    assert (poetry.status, poetry.failure_code) == (Run.FAILED, "no_targeted_task")
    assert children == [[key(r) for r in runs]]
    assert [fresh(r).status for r in runs] == [Run.SUCCEEDED] * 2


# --- The child failing as a whole ----------------------------------------------------------------


def test_a_group_whose_child_crashes_is_given_back_to_be_evaluated_alone(
    contributor, group_eval, child, children, sent, django_capture_on_commit_callbacks
):
    runs = queued_runs(contributor, 8)
    crasher = runs[4]
    child(group_child(crash_with=(key(crasher),)))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        assert execute(runs[0]) == "released"
    assert children == [[key(r) for r in runs]]
    for run in runs:
        run = fresh(run)
        assert (run.status, run.alone, run.attempts, run.claimed_by) == (Run.QUEUED, True, 0, "")
        assert run.progress_label == "Waiting to be evaluated on its own"
        version = fresh(run.version)
        assert version.status == "queued"
        assert "sandbox_crashed" in version.audit_events.last().reason
    assert not TaskResult.objects.exists()
    assert sorted(sent) == sorted(([r.pk], "eval-cpu") for r in runs)  # a fresh message each

    # Each fresh message evaluates its run alone: only the crashing adapter's run fails.
    assert [execute(run) for run in runs] == ["succeeded"] * 4 + ["failed"] + ["succeeded"] * 3
    assert children[1:] == [[key(r)] for r in runs]
    crasher = fresh(crasher)
    assert (crasher.failure_code, crasher.attempts) == ("sandbox_crashed", 1)
    assert "Segmentation fault" in crasher.failure_reason
    assert fresh(crasher.version).status == "failed"
    assert [fresh(r).attempts for r in runs] == [1] * 8


def test_a_group_whose_output_is_unreadable_is_given_back_and_alone_it_fails(
    contributor, group_eval, child, django_capture_on_commit_callbacks
):
    child([sys.executable, "-c", "import sys; sys.stdin.read(); print('garbage')"])
    runs = queued_runs(contributor, 2)
    with django_capture_on_commit_callbacks(execute=True):
        assert execute(runs[0]) == "released"
    assert [fresh(r).alone for r in runs] == [True, True]
    assert execute(runs[1]) == "failed"
    assert fresh(runs[1]).failure_code == "sandbox_bad_output"


def test_a_transient_error_gives_every_claim_of_the_group_back(
    contributor, group_eval, child, children, sent, monkeypatch, django_capture_on_commit_callbacks
):
    child(group_child())
    runs = queued_runs(contributor, 3)
    original = execution.plan_for

    def blip_on_the_second(version):
        if version.pk == runs[1].version_id:
            raise OperationalError("server closed the connection unexpectedly")
        return original(version)

    monkeypatch.setattr(execution, "plan_for", blip_on_the_second)
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(OperationalError):
        execute(runs[0], worker="host:1")
    assert children == []
    for run in runs:
        run = fresh(run)
        assert (run.status, run.attempts, run.claimed_by, run.alone) == (Run.QUEUED, 0, "", False)
        assert fresh(run.version).status == "queued"
    # The task retries the run whose message it handles; the batch-mates get fresh ones.
    assert sorted(sent) == sorted([([runs[1].pk], "eval-cpu"), ([runs[2].pk], "eval-cpu")])


# --- A run taken away while its group runs -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_run_reaped_while_its_group_runs_records_nothing_and_the_others_record(
    contributor, group_eval, child, children, sent
):
    child(group_child(sleep=3))
    runs = queued_runs(contributor, 4)
    reaped = runs[2]

    def reap_while_running():
        time.sleep(1.5)
        EvaluationRun.objects.filter(pk=reaped.pk).update(
            deadline_at=timezone.now() - timedelta(seconds=1)
        )
        reaper.evaluation_runs_reap()
        connection.close()

    # The reaper runs in another thread (its own connection) while the child sleeps.
    reaping = threading.Thread(target=reap_while_running)
    reaping.start()
    assert execute(runs[0], worker="host:1") == "succeeded"
    reaping.join()
    assert len(children) == 1  # the child went on for the others
    gone = fresh(reaped)
    assert (gone.status, gone.failure_code) == (Run.FAILED, "deadline_passed")
    assert not TaskResult.objects.filter(run=gone).exists()
    assert fresh(gone.version).status == "failed"
    others = [fresh(r) for r in runs if r.pk != reaped.pk]
    assert [r.status for r in others] == [Run.SUCCEEDED] * 3
    assert all(TaskResult.objects.filter(run=r).count() == 2 for r in others)


@pytest.mark.django_db(transaction=True)
def test_the_child_is_stopped_only_once_every_run_of_the_group_is_taken_away(
    contributor, group_eval, child, children, sent
):
    child(group_child(sleep=60))
    runs = queued_runs(contributor, 2)

    def take_all_away():
        time.sleep(1.5)
        for run in runs:
            EvaluationRun.objects.filter(pk=run.pk).update(claimed_by="someone-else:2")
            time.sleep(1.0)
        connection.close()

    taking = threading.Thread(target=take_all_away)
    taking.start()
    started = time.monotonic()
    assert execute(runs[0], worker="host:1") == "taken"
    taking.join()
    assert 2.5 < time.monotonic() - started < 20  # after the second was taken, not the first
    assert not TaskResult.objects.exists()
    assert [fresh(r).claimed_by for r in runs] == ["someone-else:2"] * 2


# --- The log a run's page shows -------------------------------------------------------------------


def test_a_runs_log_leaves_out_the_lines_naming_a_batch_mate():
    log = "shared line\n[child] run:1: LoRA loaded\n[child] run:12: refused\nrun:123 too"
    assert log_for(log, key="run:12", keys=["run:1", "run:12", "run:123"]) == (
        "shared line\n[child] run:12: refused"
    )
    assert log_for(log, key="run:1", keys=["run:1"]) == log
