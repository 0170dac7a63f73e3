"""Maintainers' review decisions and contributors' appeals.

Every decision is a state change through contributions.services.adapter_version_transition
(compare-and-set + AuditEvent), plus a ReviewDecision with its mandatory reason, plus an
e-mail to the contributor sent after the transaction commits. Approval goes through
evaluation.services.admission.version_admit, the one admission function.

Concurrency: two maintainers deciding on the same version at once (or one double-clicking)
race on the compare-and-set; exactly one wins, the other gets ``status_conflict`` and its
ReviewDecision is rolled back with the transaction.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse

from contributions.models import AdapterVersion
from contributions.selectors import user_is_maintainer
from contributions.services import adapter_version_transition
from evaluation.models import Appeal, ReviewDecision
from evaluation.services.admission import version_admit
from tessera.errors import DomainError

logger = logging.getLogger(__name__)

Status = AdapterVersion.Status
Decision = ReviewDecision.Decision

MAX_REASON_CHARS = 5000
MAX_APPEAL_CHARS = 5000

# The states each decision may be taken from; anything else is a 409 status_conflict.
DECISION_FROM: dict[str, frozenset[str]] = {
    Decision.APPROVE: frozenset({Status.PASSED}),
    Decision.REJECT: frozenset({Status.PASSED}),
    Decision.SUSPEND: frozenset({Status.PASSED, Status.ADMITTED}),
}

DECISION_WORDS = {
    Decision.APPROVE: "approved and admitted into the mixture",
    Decision.REJECT: "rejected",
    Decision.SUSPEND: "suspended",
}


# --- Decisions ----------------------------------------------------------------------------


def review_approve(
    *, version: AdapterVersion, actor: AbstractBaseUser, reason: str
) -> AdapterVersion:
    """passed → admitted, through version_admit; records the decision and mails the owner."""
    reason = _checked(version=version, actor=actor, reason=reason, decision=Decision.APPROVE)
    with transaction.atomic():
        version = version_admit(version=version, actor=actor, reason=reason)
        _decision_record(version=version, actor=actor, decision=Decision.APPROVE, reason=reason)
    return version


def review_reject(
    *, version: AdapterVersion, actor: AbstractBaseUser, reason: str
) -> AdapterVersion:
    """passed → rejected. The contributor may appeal once."""
    return _decide_by_transition(
        version=version,
        actor=actor,
        reason=reason,
        decision=Decision.REJECT,
        to_status=Status.REJECTED,
        action="review.rejected",
    )


def review_suspend(
    *, version: AdapterVersion, actor: AbstractBaseUser, reason: str
) -> AdapterVersion:
    """passed or admitted → suspended: taken out of review, or out of the mixture."""
    return _decide_by_transition(
        version=version,
        actor=actor,
        reason=reason,
        decision=Decision.SUSPEND,
        to_status=Status.SUSPENDED,
        action="review.suspended",
    )


def _decide_by_transition(
    *,
    version: AdapterVersion,
    actor: AbstractBaseUser,
    reason: str,
    decision: str,
    to_status: str,
    action: str,
) -> AdapterVersion:
    reason = _checked(version=version, actor=actor, reason=reason, decision=decision)
    with transaction.atomic():
        version = adapter_version_transition(
            version=version, to_status=to_status, actor=actor, reason=reason, action=action
        )
        _decision_record(version=version, actor=actor, decision=decision, reason=reason)
    return version


_DECIDERS = {
    Decision.APPROVE: review_approve,
    Decision.REJECT: review_reject,
    Decision.SUSPEND: review_suspend,
}


def review_decide(
    *, version: AdapterVersion, actor: AbstractBaseUser, decision: str, reason: str
) -> AdapterVersion:
    """One entry point for views that take the decision as a parameter."""
    decider = _DECIDERS.get(decision)
    if decider is None:
        raise DomainError("decision_unknown", f"Unknown decision '{decision}'.")
    return decider(version=version, actor=actor, reason=reason)


def _checked(
    *, version: AdapterVersion, actor: AbstractBaseUser, reason: str, decision: str
) -> str:
    """Who may decide, that a reason is given, and that the version is where it must be.

    The state check here gives the clear message; the compare-and-set in the transition
    is what makes it true under races.
    """
    if not user_is_maintainer(actor):
        raise DomainError(
            "not_maintainer", "Only maintainers decide on versions.", kind="forbidden"
        )
    if is_own_upload(version=version, actor=actor):
        # Review is a second pair of eyes: a maintainer approving their own upload (or
        # rejecting a rival's in the same breath) would have none.
        raise DomainError(
            "own_upload",
            "You cannot decide on your own upload; another maintainer will review it.",
            kind="forbidden",
        )
    reason = (reason or "").strip()
    if not reason:
        raise DomainError(
            "reason_required",
            "Give a reason for the decision: the contributor reads it.",
            details={"field": "reason"},
        )
    if len(reason) > MAX_REASON_CHARS:
        raise DomainError(
            "reason_too_long",
            f"Keep the reason under {MAX_REASON_CHARS} characters.",
            details={"field": "reason"},
        )
    allowed = DECISION_FROM[decision]
    if version.status not in allowed:
        raise DomainError(
            "status_conflict",
            f"A version that is {version.status} cannot be {DECISION_WORDS[decision]}; "
            f"only one that is {' or '.join(sorted(allowed))}.",
            kind="conflict",
            details={"from": version.status, "decision": decision},
        )
    return reason


def is_own_upload(*, version: AdapterVersion, actor: AbstractBaseUser) -> bool:
    return actor.is_authenticated and version.adapter.owner_id == actor.pk


def review_decisions_open(*, version: AdapterVersion, actor: AbstractBaseUser) -> list[str]:
    """The decisions ``actor`` may take on ``version`` now, for pages to offer (the
    decision itself checks again, in _checked)."""
    if not user_is_maintainer(actor) or is_own_upload(version=version, actor=actor):
        return []
    return [decision for decision, allowed in DECISION_FROM.items() if version.status in allowed]


def _decision_record(
    *, version: AdapterVersion, actor: AbstractBaseUser, decision: str, reason: str
) -> ReviewDecision:
    """Caller holds the transaction; the e-mail goes out only if it commits."""
    record = ReviewDecision.objects.create(
        version=version, maintainer=actor, decision=decision, reason=reason
    )
    transaction.on_commit(lambda: _decision_mail(record))
    return record


def adapter_page_url(version: AdapterVersion) -> str:
    path = reverse("portal:adapter-detail", kwargs={"adapter_id": version.adapter_id})
    return f"{settings.TESSERA_SITE_URL}{path}#version-{version.number}"


def _decision_mail(record: ReviewDecision) -> None:
    """Runs after commit. The decision stands whether or not the mail goes out, so a mail
    failure is logged, not raised into a request whose work is already done."""
    version = record.version
    adapter = version.adapter
    owner = adapter.owner
    if not owner.email:
        return
    words = DECISION_WORDS[record.decision]
    name = f"{adapter.owner.get_username()}/{adapter.slug} v{version.number}"
    lines = [
        f"Hello {owner.get_username()},",
        "",
        f"A Tessera maintainer reviewed {name} ({adapter.title}): it was {words}.",
        "",
        "Reason:",
        record.reason,
        "",
        f"The adapter page: {adapter_page_url(version)}",
    ]
    if record.decision == Decision.REJECT:
        lines += [
            "",
            "You may appeal this rejection once, with a message, from the adapter page.",
        ]
    try:
        send_mail(
            subject=f"[Tessera] {name}: {record.get_decision_display().lower()}",
            message="\n".join(lines) + "\n",
            from_email=None,
            recipient_list=[owner.email],
        )
    except Exception:
        logger.exception("Could not mail review decision %s to %s", record.pk, owner.email)


# --- Appeals ------------------------------------------------------------------------------


def appeal_create(*, version: AdapterVersion, actor: AbstractBaseUser, message: str) -> Appeal:
    """The owner's one appeal against a rejection: rejected → passed, back in the queue."""
    if version.adapter.owner_id != actor.pk:
        raise DomainError(
            "not_owner", "Only the adapter's owner can appeal a decision.", kind="forbidden"
        )
    message = (message or "").strip()
    if not message:
        raise DomainError(
            "message_required",
            "Say why the decision should change: maintainers read your message.",
            details={"field": "message"},
        )
    if len(message) > MAX_APPEAL_CHARS:
        raise DomainError(
            "message_too_long",
            f"Keep the message under {MAX_APPEAL_CHARS} characters.",
            details={"field": "message"},
        )
    if Appeal.objects.filter(version=version).exists():
        raise _appeal_used()
    if version.status != Status.REJECTED:
        raise DomainError(
            "status_conflict",
            f"Only a rejected version can be appealed; this one is {version.status}.",
            kind="conflict",
            details={"from": version.status, "to": Status.PASSED},
        )
    try:
        with transaction.atomic():
            # The one-to-one row first: of two concurrent appeals, the second waits on the
            # unique index and fails there, before it can touch the version.
            appeal = Appeal.objects.create(version=version, contributor=actor, message=message)
            adapter_version_transition(
                version=version,
                to_status=Status.PASSED,
                actor=actor,
                reason=f"Appealed: {message}",
                action="review.appealed",
            )
    except IntegrityError as exc:
        raise _appeal_used() from exc
    return appeal


def _appeal_used() -> DomainError:
    return DomainError(
        "appeal_used", "This version has been appealed already; one appeal each.", kind="conflict"
    )
