"""The admission policy: pure rules over a run's numbers.

``evaluate_policy`` takes the outcomes of the targeted and the general tasks and the
policy's thresholds and returns every rule's verdict in plain words; nothing here reads the
database or the settings (``policy_rules_in_words`` and ``policy_from_settings`` read the
settings, for the public page and the run service).

Rules:

* ``targets_benchmark_task``: the adapter's tags meet at least one benchmark task.
* ``gain:<task>``: per targeted task, delta (adapter − base, on the hidden split) ≥ MIN_GAIN.
* ``ci:<task>``: per targeted task, the paired bootstrap 95% CI's lower bound is above 0.
* ``general_harm``: the mean drop over the general tasks (mean of base − adapter per task)
  is at most MAX_GENERAL_DROP.

Boundaries: a delta exactly equal to MIN_GAIN passes, a drop exactly equal to
MAX_GENERAL_DROP passes (both compared with a 1e-9 tolerance: 0.1 computed as a mean of
0/1 differences is not always 0.1 in binary); a CI lower bound of exactly 0 fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

EPSILON = 1e-9
REVIEW_MODES = ("first", "always", "never")
RULE_NAME_MAX = 64


@dataclass(frozen=True)
class TaskOutcome:
    """One task's numbers on one run. ``name`` is how rules and sentences name it (the task
    slug, or suite/slug where two suites share a slug)."""

    name: str
    title: str
    n: int
    base_score: float
    adapter_score: float
    delta: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Rule:
    rule: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyOutcome:
    rules: list[Rule]
    passed: bool

    @property
    def failed(self) -> list[Rule]:
        return [rule for rule in self.rules if not rule.passed]

    def summary(self) -> str:
        """One sentence for the version's audit trail."""
        if self.passed:
            return "Every admission rule passed: " + "; ".join(r.detail for r in self.rules)
        return "Failed admission rules: " + "; ".join(f"{r.rule} ({r.detail})" for r in self.failed)


def _num(value: float) -> str:
    return f"{value:.3f}"


def rule_name(prefix: str, task_name: str) -> str:
    return f"{prefix}:{task_name}"[:RULE_NAME_MAX]


def targets_rule(
    *, targeted_count: int, adapter_tags: Sequence[str], available_tags: Sequence[str]
) -> Rule:
    tags = ", ".join(adapter_tags) or "none"
    available = ", ".join(sorted(available_tags)) or "none yet"
    if targeted_count:
        return Rule(
            "targets_benchmark_task",
            True,
            f"The adapter's tags ({tags}) meet {targeted_count} benchmark task(s).",
            {"adapter_tags": list(adapter_tags), "targeted": targeted_count},
        )
    return Rule(
        "targets_benchmark_task",
        False,
        f"The adapter's tags ({tags}) match no benchmark task, so there is nothing to measure "
        f"its skill on. Available tags: {available}.",
        {"adapter_tags": list(adapter_tags), "available_tags": sorted(available_tags)},
    )


def evaluate_policy(
    *,
    targeted: Sequence[TaskOutcome],
    general: Sequence[TaskOutcome],
    min_gain: float,
    max_general_drop: float,
    adapter_tags: Sequence[str] = (),
    available_tags: Sequence[str] = (),
) -> PolicyOutcome:
    rules = [
        targets_rule(
            targeted_count=len(targeted), adapter_tags=adapter_tags, available_tags=available_tags
        )
    ]
    for task in targeted:
        values = {
            "n": task.n,
            "base": task.base_score,
            "adapter": task.adapter_score,
            "delta": task.delta,
            "ci_low": task.ci_low,
            "ci_high": task.ci_high,
        }
        gained = task.delta >= min_gain - EPSILON
        rules.append(
            Rule(
                rule_name("gain", task.name),
                gained,
                f"On {task.title} the adapter scored {_num(task.adapter_score)} against the "
                f"base model's {_num(task.base_score)} over {task.n} hidden examples, a change "
                f"of {_num(task.delta)}; at least {_num(min_gain)} is needed"
                + (" — met." if gained else " — not met."),
                {**values, "min_gain": min_gain},
            )
        )
        significant = task.ci_low > 0
        rules.append(
            Rule(
                rule_name("ci", task.name),
                significant,
                f"On {task.title} the 95% confidence interval of the change is "
                f"[{_num(task.ci_low)}, {_num(task.ci_high)}]; its lower end must be above 0"
                + (" — it is." if significant else " — it is not, so the gain may be chance."),
                {**values},
            )
        )
    rules.append(_general_rule(general, max_general_drop))
    return PolicyOutcome(rules=rules, passed=all(rule.passed for rule in rules))


def _general_rule(general: Sequence[TaskOutcome], max_drop: float) -> Rule:
    if not general:
        return Rule(
            "general_harm",
            True,
            "No general-ability tasks are configured, so no general harm was measured.",
            {"tasks": 0, "max_drop": max_drop},
        )
    drop = -sum(task.delta for task in general) / len(general)
    passed = drop <= max_drop + EPSILON
    worst = min(general, key=lambda task: task.delta)
    return Rule(
        "general_harm",
        passed,
        f"Across {len(general)} general-ability task(s) the score changed by {_num(-drop)} on "
        f"average (largest fall: {worst.title}, {_num(worst.delta)}); a fall of at most "
        f"{_num(max_drop)} is allowed" + (" — met." if passed else " — exceeded."),
        {
            "tasks": len(general),
            "mean_drop": drop,
            "max_drop": max_drop,
            "per_task": {task.name: task.delta for task in general},
        },
    )


@dataclass(frozen=True)
class AdmissionCheck:
    """A rule that apps above evaluation add to the policy for versions that pass it: it
    never fails a version, but one it does not pass is held for a maintainer's review, with
    the rule's figure shown there. ``rule`` returns None when it has nothing to say;
    ``words`` says it on the public policy page."""

    rule: Callable[[Any], Rule | None]  # (an AdapterVersion) -> its verdict
    words: Callable[[], str]


# Registered in AppConfig.ready() (routing adds the mixture-contribution rule): evaluation
# knows nothing of routing, which asks to be consulted instead.
admission_checks: list[AdmissionCheck] = []


def admission_check_register(check: AdmissionCheck) -> None:
    if check not in admission_checks:
        admission_checks.append(check)


def review_required(
    *, mode: str, contributor_has_admitted: bool, contributor_suspended: bool = False
) -> bool:
    """Whether a passing version waits for a maintainer. "first": only a contributor's
    first admission; "always"; "never".

    ``contributor_suspended``: a maintainer suspended one of the contributor's versions and
    has admitted none of theirs since. Whatever the mode, their passing versions then wait
    for a maintainer: the automatic admission a track record earned is what the suspension
    called into question, and without this a contributor whose adapter was pulled for
    misbehaving could upload the same thing again and have it served at once.
    """
    if mode not in REVIEW_MODES:
        raise ValueError(f"unknown review mode {mode!r}")
    if contributor_suspended or mode == "always":
        return True
    if mode == "never":
        return False
    return not contributor_has_admitted


@dataclass(frozen=True)
class PolicySettings:
    min_gain: float
    max_general_drop: float
    review: str


def policy_from_settings() -> PolicySettings:
    from django.conf import settings

    return PolicySettings(
        min_gain=settings.TESSERA_ADMISSION_MIN_GAIN,
        max_general_drop=settings.TESSERA_ADMISSION_MAX_GENERAL_DROP,
        review=settings.TESSERA_ADMISSION_REVIEW,
    )


def policy_rules_in_words(policy: PolicySettings | None = None) -> list[str]:
    """The admission policy as plain sentences, from the settings (the public policy page)."""
    policy = policy or policy_from_settings()
    gain = policy.min_gain
    drop = policy.max_general_drop
    review = {
        "first": "A maintainer reviews each contributor's first adapter to pass; once a "
        "contributor has an admitted adapter, later passing versions are admitted at once.",
        "always": "A maintainer reviews every adapter that passes before it is admitted.",
        "never": "Every adapter that passes is admitted at once, without a maintainer's review.",
    }[policy.review]
    if policy.review != "always":
        review += (
            " A contributor whose adapter a maintainer suspended has every passing version "
            "reviewed, until a maintainer admits one of theirs again."
        )
    return [
        "Every upload is evaluated automatically in a sandbox with no network access, against "
        "the base model, on benchmark examples no contributor can see (the hidden split).",
        "An adapter must target at least one benchmark task: its task tags must meet a task's "
        "tags.",
        f"On every task it targets, the adapter must beat the base model by at least {gain:g} "
        f"(absolute score, e.g. {gain * 100:g} percentage points of accuracy).",
        "On every task it targets, the improvement must be statistically clear: the lower end "
        "of a paired bootstrap 95% confidence interval of the difference must be above zero.",
        f"On the general-ability suite, the adapter may lower the base model's score by at most "
        f"{drop:g} on average across its tasks.",
        review,
        *_checks_in_words(),
        "Scores on contributors' own test sets are shown but never decide admission.",
    ]


def _checks_in_words() -> list[str]:
    return [check.words() for check in admission_checks]
