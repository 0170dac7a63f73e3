"""Admission by marginal contribution: a version that passes the policy but makes the
mixture worse (a "squatter" whose example prompts copy another skill's, so the router sends
that skill's prompts to it) is held for review with its figure; one that helps is admitted
at once. Through the real run service (the child is a stand-in answering fixed scores), with
the real embedding router."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from contributions.models import AdapterVersion
from evaluation.models import EvaluationRun, Example, Outcome, RuleResult
from evaluation.policy import policy_rules_in_words
from evaluation.services import execution
from routing.models import MixtureVersion
from tests.evaluation.test_runs import fake_child, upload_version
from tests.routing.conftest import UNITS_PROMPTS, admitted_version

SQUATTER_PROMPTS = [
    "Convert 8 km to metres.",
    "Convert 15 km to metres.",
    "Convert 30 km to metres.",
]
DATES_PROMPTS = [
    "Rewrite 2012-05-14 as a date in words.",
    "Rewrite 2003-07-17 as a date in words.",
    "Spell out the date 2019-02-11 in words.",
]


@pytest.fixture
def units_mixture(union, tiny_base_model, other_contributor):
    """A mixture of one adapter that solves the units task (the base model solves nothing)."""
    units_task, dates_task = union
    units = admitted_version(other_contributor, slug="units", prompts=UNITS_PROMPTS, seed=4)
    for task, score in ((units_task, 1.0), (dates_task, 0.0)):
        for example in Example.objects.filter(task=task):
            Outcome.objects.create(
                base_model=tiny_base_model, version=units, example=example, score=score
            )
    return units


def scores_solving(union, skill: str) -> dict:
    """The stand-in child's scores: the candidate solves ``skill``'s examples only."""
    return {
        f"task:{task.pk}:{split}": (0.0, 1.0 if task.slug == skill else 0.0)
        for task in union
        for split in ("hidden", "paraphrase")
    }


def evaluate(version: AdapterVersion) -> EvaluationRun:
    run = EvaluationRun.objects.get(version=version)
    execution.evaluation_run_execute(run_id=run.pk, worker="host:1")
    run.refresh_from_db()
    return run


def test_a_squatter_is_held_for_review_with_the_fall_it_would_cause(
    union, units_mixture, contributor, child, fast_eval
):
    child(fake_child(scores_solving(union, "dates")))
    squatter = upload_version(contributor, tags=("dates",), prompts=SQUATTER_PROMPTS)
    run = evaluate(squatter)
    squatter.refresh_from_db()
    # It passes its own task (dates, +1.0 over the base model), yet it is not admitted,
    # although this deployment admits passing versions without review.
    assert run.passed is True and run.needs_review is True
    assert squatter.status == AdapterVersion.Status.PASSED
    assert MixtureVersion.objects.get(is_active=True).members.count() == 1
    rule = RuleResult.objects.get(run=run, rule="mixture_contribution")
    assert rule.passed is False
    assert rule.values["held_for_review"] is True
    # Without it the units prompts (6 of 10) are solved; with it they go to the squatter.
    assert rule.values["without"] == pytest.approx(0.6)
    assert rule.values["delta"] < -0.01
    assert f"{rule.values['without']:.3f}" in rule.detail and "maintainer reviews" in rule.detail
    assert "held for a maintainer's review" in squatter.audit_events.latest("id").reason


def test_the_review_queue_shows_the_maintainer_the_squatters_figure(
    union, units_mixture, contributor, maintainer, child, fast_eval
):
    child(fake_child(scores_solving(union, "dates")))
    squatter = upload_version(contributor, tags=("dates",), prompts=SQUATTER_PROMPTS)
    evaluate(squatter)
    client = APIClient()
    client.force_authenticate(maintainer)
    queue = client.get("/api/v1/review/queue/").json()
    rules = [
        rule
        for item in queue
        if item["version"]["id"] == squatter.pk
        for rule in item["report"]["rule_results"]
        if rule["rule"] == "mixture_contribution"
    ]
    assert len(rules) == 1 and rules[0]["passed"] is False
    assert "against 0.600 without it" in rules[0]["detail"]


def test_an_adapter_that_adds_a_skill_is_admitted_at_once_with_its_gain(
    union, units_mixture, contributor, child, fast_eval
):
    child(fake_child(scores_solving(union, "dates")))
    dates = upload_version(contributor, tags=("dates",), prompts=DATES_PROMPTS)
    run = evaluate(dates)
    dates.refresh_from_db()
    assert run.passed is True and run.needs_review is False
    assert dates.status == AdapterVersion.Status.ADMITTED
    rule = RuleResult.objects.get(run=run, rule="mixture_contribution")
    assert rule.passed is True and rule.values["delta"] > 0.1


def test_the_public_policy_names_the_rule_and_its_margin(settings):
    settings.TESSERA_ADMISSION_MAX_MIXTURE_DROP = 0.02
    words = " ".join(policy_rules_in_words())
    assert "with it and without it" in words and "more than 0.02" in words
