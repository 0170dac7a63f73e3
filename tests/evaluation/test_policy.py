"""The admission policy as pure rules: every rule, its boundaries, and the review modes."""

from __future__ import annotations

import pytest

from evaluation.policy import (
    PolicySettings,
    TaskOutcome,
    evaluate_policy,
    policy_rules_in_words,
    review_required,
)

MIN_GAIN = 0.10
MAX_DROP = 0.05


def outcome(name="addition", *, base=0.2, delta=0.3, ci_low=0.1, ci_high=0.5, n=100):
    return TaskOutcome(
        name=name,
        title=name.replace("-", " ").title(),
        n=n,
        base_score=base,
        adapter_score=base + delta,
        delta=delta,
        ci_low=ci_low,
        ci_high=ci_high,
    )


def decide(targeted, general=(), **kwargs):
    return evaluate_policy(
        targeted=list(targeted),
        general=list(general),
        min_gain=kwargs.pop("min_gain", MIN_GAIN),
        max_general_drop=kwargs.pop("max_general_drop", MAX_DROP),
        **kwargs,
    )


def verdicts(result) -> dict[str, bool]:
    return {rule.rule: rule.passed for rule in result.rules}


def test_a_clear_gain_with_no_general_harm_passes_every_rule():
    result = decide([outcome()], [outcome("general-qa", delta=-0.01, ci_low=-0.05)])
    assert result.passed
    assert verdicts(result) == {
        "targets_benchmark_task": True,
        "gain:addition": True,
        "ci:addition": True,
        "general_harm": True,
    }
    assert all(rule.detail for rule in result.rules)


def test_no_targeted_task_fails_and_names_the_available_tags():
    result = decide([], adapter_tags=["poetry"], available_tags=["arithmetic", "dates"])
    assert not result.passed
    rule = result.rules[0]
    assert (rule.rule, rule.passed) == ("targets_benchmark_task", False)
    assert "poetry" in rule.detail and "arithmetic, dates" in rule.detail
    assert rule.values["available_tags"] == ["arithmetic", "dates"]


@pytest.mark.parametrize(
    ("delta", "passes"),
    [(0.10, True), (0.1 - 1e-12, True), (0.0999, False), (0.25, True), (-0.2, False)],
)
def test_the_gain_boundary_is_inclusive(delta, passes):
    result = decide([outcome(delta=delta, ci_low=0.01)])
    assert verdicts(result)["gain:addition"] is passes
    assert result.passed is passes


def test_a_gain_computed_as_a_mean_of_zero_one_differences_meets_the_threshold():
    # 1/10 computed the way a mean does it is not exactly 0.1 in binary.
    delta = sum([1.0] + [0.0] * 9) / 10
    assert verdicts(decide([outcome(delta=delta)]))["gain:addition"]


@pytest.mark.parametrize(("ci_low", "passes"), [(0.0, False), (1e-9, True), (-0.01, False)])
def test_the_confidence_interval_must_lie_strictly_above_zero(ci_low, passes):
    result = decide([outcome(ci_low=ci_low)])
    assert verdicts(result)["ci:addition"] is passes
    assert result.passed is passes
    if not passes:
        assert "chance" in next(r for r in result.rules if r.rule == "ci:addition").detail


def test_every_targeted_task_must_pass_on_its_own():
    result = decide([outcome("addition"), outcome("subtraction", delta=0.01, ci_low=-0.1)])
    assert not result.passed
    assert [r.rule for r in result.failed] == ["gain:subtraction", "ci:subtraction"]
    assert "gain:subtraction" in result.summary()


@pytest.mark.parametrize(
    ("deltas", "passes"),
    [
        ([-0.05], True),  # exactly the allowed drop
        ([-0.05 - 1e-12], True),
        ([-0.06], False),
        ([-0.08, 0.0], True),  # the mean drop, 0.04, decides
        ([-0.08, -0.04], False),
        ([0.2, -0.1], True),  # a gain elsewhere offsets a fall
    ],
)
def test_general_harm_is_the_mean_drop_across_general_tasks(deltas, passes):
    general = [outcome(f"general-{i}", delta=d, ci_low=d - 0.1) for i, d in enumerate(deltas)]
    result = decide([outcome()], general)
    rule = next(r for r in result.rules if r.rule == "general_harm")
    assert rule.passed is passes
    assert rule.values["mean_drop"] == pytest.approx(-sum(deltas) / len(deltas))
    assert result.passed is passes


def test_no_general_tasks_is_stated_not_hidden():
    rule = next(r for r in decide([outcome()]).rules if r.rule == "general_harm")
    assert rule.passed
    assert "No general-ability tasks" in rule.detail


def test_rule_names_fit_the_column_even_for_long_task_names():
    long_name = "suite-" + "x" * 60 + "/task"
    result = decide([outcome(long_name)])
    assert all(len(rule.rule) <= 64 for rule in result.rules)


@pytest.mark.parametrize(
    ("mode", "has_admitted", "review"),
    [
        ("first", False, True),
        ("first", True, False),
        ("always", False, True),
        ("always", True, True),
        ("never", False, False),
        ("never", True, False),
    ],
)
def test_review_modes(mode, has_admitted, review):
    assert review_required(mode=mode, contributor_has_admitted=has_admitted) is review


def test_an_unknown_review_mode_is_refused():
    with pytest.raises(ValueError):
        review_required(mode="sometimes", contributor_has_admitted=False)


def test_the_policy_in_words_follows_the_settings():
    words = policy_rules_in_words(
        PolicySettings(min_gain=0.2, max_general_drop=0.03, review="never")
    )
    text = " ".join(words)
    assert "at least 0.2" in text
    assert "at most 0.03" in text
    assert "without a maintainer's review" in text
    assert all(sentence.endswith(".") for sentence in words)


def test_the_policy_in_words_reads_the_settings_by_default(settings):
    settings.TESSERA_ADMISSION_MIN_GAIN = 0.15
    settings.TESSERA_ADMISSION_REVIEW = "first"
    text = " ".join(policy_rules_in_words())
    assert "at least 0.15" in text
    assert "first adapter" in text
