"""Per-example outcomes on the union: read what runs stored, measure what is missing with
the real sandboxed child on the tiny random Llama, and never measure anything twice."""

from __future__ import annotations

import pytest

from evaluation.models import Example, Outcome
from evaluation.services import outcomes
from tests.evaluation.test_runs import make_task, upload_version


@pytest.fixture
def no_runs(monkeypatch):
    from evaluation.tasks import evaluate_run

    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)


def test_the_union_is_every_current_tasks_hidden_and_paraphrase_split(
    db,
    tiny_base_model,
):
    addition = make_task()
    paraphrase = Example.objects.create(
        task=addition,
        split=Example.Split.PARAPHRASE,
        position=0,
        fields={"question": "Tell me what 2 plus 2 makes."},
        target="4",
        prompt_template="{question}",
    )
    splits = outcomes.union_splits()
    assert [(s.task.slug, s.split, len(s.example_ids)) for s in splits] == [
        ("addition", "hidden", 12),
        ("addition", "paraphrase", 1),
    ]
    assert splits[1].example_ids == [paraphrase.pk]
    assert splits[1].prompts() == ["Tell me what 2 plus 2 makes."]  # its own template
    assert splits[0].prompts()[0] == "What is 100 + 7?"


def test_missing_outcomes_are_measured_once_in_the_sandbox(
    db,
    tiny_base_model,
    contributor,
    fast_eval,
    no_runs,
    monkeypatch,
):
    make_task(hidden=[{"a": 100 + i, "b": 7} for i in range(5)])
    first = upload_version(contributor, variant=0)
    second = upload_version(contributor, variant=1)
    splits = outcomes.union_splits()
    jobs: list = []
    original = outcomes.child_run

    def spy(job, workdir):
        jobs.append(job)
        return original(job, workdir)

    monkeypatch.setattr(outcomes, "child_run", spy)
    assert (
        outcomes.outcomes_measure(
            base_model=tiny_base_model, versions=[first, second], splits=splits
        )
        == {}
    )
    assert len(jobs) == 1  # both versions and the base model in one child
    assert [a.key for a in jobs[0].adapters] == [f"run:{first.pk}", f"run:{second.pk}"]
    assert jobs[0].tasks[0].score_base is True
    for version in (first, second, None):
        stored = Outcome.objects.filter(version=version)
        assert stored.count() == 5
        assert all(0.0 <= o.score <= 1.0 for o in stored)
    table = outcomes.outcomes_table(
        base_model_id=tiny_base_model.pk,
        version_ids=[first.pk],
        example_ids=splits[0].example_ids,
    )
    assert set(table) == {None, first.pk} and len(table[first.pk]) == 5

    # Measured once: a second call finds everything and starts no child.
    assert (
        outcomes.outcomes_measure(
            base_model=tiny_base_model, versions=[first, second], splits=splits
        )
        == {}
    )
    assert len(jobs) == 1


def test_a_version_whose_stored_weights_changed_is_reported_not_measured(
    db,
    tiny_base_model,
    contributor,
    fast_eval,
    no_runs,
):
    make_task(hidden=[{"a": 1, "b": 2}] * 3)
    version = upload_version(contributor, variant=0)
    with version.weights_file.open("wb") as handle:
        handle.write(b"tampered")
    failures = outcomes.outcomes_measure(
        base_model=tiny_base_model, versions=[version], splits=outcomes.union_splits()
    )
    assert "sha256" in failures[version.pk]
    assert not Outcome.objects.filter(version=version).exists()
    assert Outcome.objects.filter(version=None).count() == 3  # the base model still measured


def test_the_union_beyond_what_admission_decides_on_is_each_splits_first_examples(
    db, tiny_base_model, contributor, fast_eval, no_runs, settings
):
    from evaluation.services.plans import plan_for

    settings.TESSERA_EVAL_UNION_EXAMPLES = 5
    make_task()  # addition, 12 hidden examples, targeted by the upload's tags
    make_task(suite="words", slug="reversal", tags=("words",), template="Reverse {a} {b}")
    version = upload_version(contributor, variant=0)
    measured = {
        (m.task.slug, m.split, m.role): len(m.example_ids) for m in plan_for(version).measures
    }
    # Admission decides on the targeted task's whole hidden split; the union takes 5 of the
    # other task's, and the scoreboard reads exactly those.
    assert measured == {("addition", "hidden", "target"): 12, ("reversal", "hidden", "other"): 5}
    assert [len(s.example_ids) for s in outcomes.union_splits()] == [5, 5]
