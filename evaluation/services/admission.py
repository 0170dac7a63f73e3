"""Admission: the one function that puts a version into the mixture, and the decision a
finished run leads to.

``version_admit`` is THE admission: the run service calls it for automatic admissions
(actor None), the maintainers' review queue with the maintainer as actor. It is a
compare-and-set transition (passed → admitted, or suspended → admitted when a maintainer
reinstates): of any number of concurrent callers exactly one wins and writes the one
AuditEvent; the others get ``status_conflict``.
"""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from contributions.models import AdapterVersion
from contributions.services import adapter_version_transition
from evaluation.models import EvaluationRun, RuleResult
from evaluation.policy import PolicyOutcome, Rule, admission_checks, review_required
from evaluation.selectors import contributor_has_admitted, contributor_under_suspension
from tessera.errors import DomainError

logger = logging.getLogger(__name__)

Status = AdapterVersion.Status


def admission_checks_run(*, version: AdapterVersion) -> list[Rule]:
    """The registered checks' verdicts on a version that passed the policy. Caller holds the
    transaction that records its run (the version's outcomes are in it already)."""
    return [rule for check in admission_checks if (rule := check.rule(version)) is not None]


def version_admit(
    *, version: AdapterVersion, actor: AbstractBaseUser | None = None, reason: str = ""
) -> AdapterVersion:
    """passed (or suspended) → admitted. Safe to call concurrently: the compare-and-set in
    adapter_version_transition lets exactly one caller through; the others get a
    DomainError ``status_conflict`` and change nothing."""
    return adapter_version_transition(
        version=version,
        to_status=Status.ADMITTED,
        actor=actor,
        reason=reason or ("Admitted by a maintainer." if actor else "Admitted automatically."),
        action="version.admitted",
    )


def admission_needs_review(*, version: AdapterVersion, mode: str) -> bool:
    """Whether a passing version waits for a maintainer under review ``mode``."""
    owner_id = version.adapter.owner_id
    has_admitted = contributor_has_admitted(user_id=owner_id, exclude_version_id=version.pk)
    suspended = contributor_under_suspension(user_id=owner_id, exclude_version_id=version.pk)
    return review_required(
        mode=mode, contributor_has_admitted=has_admitted, contributor_suspended=suspended
    )


def rule_results_store(*, run: EvaluationRun, outcome: PolicyOutcome) -> list[RuleResult]:
    """One RuleResult per rule. Caller holds the transaction that finishes the run."""
    return RuleResult.objects.bulk_create(
        [
            RuleResult(
                run=run, rule=rule.rule, passed=rule.passed, detail=rule.detail, values=rule.values
            )
            for rule in outcome.rules
        ]
    )


def version_conclude(
    *, version: AdapterVersion, outcome: PolicyOutcome, needs_review: bool
) -> AdapterVersion:
    """evaluating → passed or failed, with the rules in the reason. Caller holds the
    transaction that records the run (so the verdict and the results commit together)."""
    if outcome.passed:
        held = "; ".join(f"{rule.rule}: {rule.detail}" for rule in outcome.failed)
        if held:
            reason = f"Passed the admission policy; held for a maintainer's review: {held}"
        else:
            reason = "Passed every admission rule." + (
                " Waiting for a maintainer's review." if needs_review else ""
            )
        return adapter_version_transition(
            version=version, to_status=Status.PASSED, actor=None, reason=reason
        )
    failed = "; ".join(f"{rule.rule}: {rule.detail}" for rule in outcome.failed)
    return adapter_version_transition(
        version=version,
        to_status=Status.FAILED,
        actor=None,
        reason=f"Failed admission rules — {failed}",
    )


def version_admit_automatically(
    *, version: AdapterVersion, outcome: PolicyOutcome
) -> AdapterVersion | None:
    """After the run has committed: admit a passed version that needs no review. Returns
    None when someone else moved it first (a maintainer, a withdrawal): not an error."""
    targets = [r for r in outcome.rules if r.rule.startswith("gain:") and r.passed]
    reason = (
        "Admitted automatically: every admission rule passed"
        + (f" ({len(targets)} targeted task(s) improved)" if targets else "")
        + ", and the review policy needs no maintainer for this contributor."
    )
    try:
        with transaction.atomic():
            return version_admit(version=version, actor=None, reason=reason)
    except DomainError as exc:
        if exc.code != "status_conflict":
            raise
        logger.info("version %s changed before its automatic admission: %s", version.pk, exc)
        return None


def version_decision_complete(*, version: AdapterVersion, run: EvaluationRun) -> str | None:
    """Finish the decision a passed run leads to, when the worker that recorded it never
    did (it died between committing the verdict and admitting). The review policy is
    applied as it stands now: the version is admitted automatically, or its run is marked
    for a maintainer's review (the review queue lists it). Returns "admitted", "review", or
    None when there was nothing to do. Idempotent: admission is one compare-and-set, and the
    review mark one conditional update, so two reapers (or a reaper and a late worker) make
    one decision."""
    from evaluation.policy import policy_from_settings

    if version.status != Status.PASSED or run.needs_review or run.passed is not True:
        return None
    if admission_needs_review(version=version, mode=policy_from_settings().review):
        marked = EvaluationRun.objects.filter(
            pk=run.pk, status=EvaluationRun.Status.SUCCEEDED, passed=True, needs_review=False
        ).update(needs_review=True)
        return "review" if marked == 1 else None
    try:
        with transaction.atomic():
            version_admit(
                version=version,
                actor=None,
                reason="Admitted automatically: every admission rule passed and the review "
                "policy needs no maintainer for this contributor (the decision was completed "
                "after the evaluating worker stopped before making it).",
            )
    except DomainError as exc:
        if exc.code != "status_conflict":
            raise
        return None
    return "admitted"
