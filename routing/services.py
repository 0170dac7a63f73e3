"""Writes for the mixture. Callers hold a transaction: a new snapshot is published in the
same transaction as the status change that caused it."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from contributions.models import AdapterVersion, BaseModel
from contributions.services import VersionTransition, adapter_version_transition
from routing.learned.services import learned_router_request
from routing.merging.services import merge_request
from routing.models import MixtureMember, MixtureVersion
from routing.scoreboard.services import scoreboard_request


def _router_defaults() -> tuple[str, dict]:
    return settings.TESSERA_ROUTER, {"threshold": settings.TESSERA_ROUTER_THRESHOLD}


def _lock_mixture() -> None:
    list(BaseModel.objects.select_for_update().filter(is_active=True).values_list("pk"))


def _activate(mixture: MixtureVersion) -> None:
    # Deactivate first: the partial unique index allows one active row at any instant.
    MixtureVersion.objects.filter(is_active=True).exclude(pk=mixture.pk).update(is_active=False)
    MixtureVersion.objects.filter(pk=mixture.pk).update(is_active=True, activated_at=timezone.now())
    mixture.is_active = True


def mixture_publish(*, reason: str, actor: AbstractBaseUser | None = None) -> MixtureVersion:
    """Snapshot the versions admitted right now as the next mixture version and activate it.

    Serialised by a lock on the active base model's row (it always exists while versions
    do, unlike an active mixture before the first one), so two concurrent admissions make
    two consecutive snapshots, the later one holding both.
    """
    with transaction.atomic():
        _lock_mixture()
        admitted = list(
            AdapterVersion.objects.filter(status=AdapterVersion.Status.ADMITTED).values_list(
                "pk", flat=True
            )
        )
        number = (MixtureVersion.objects.aggregate(n=Max("number"))["n"] or 0) + 1
        router, router_settings = _router_defaults()
        mixture = MixtureVersion.objects.create(
            number=number,
            router=router,
            router_settings=router_settings,
            reason=reason,
            created_by=actor,
        )
        MixtureMember.objects.bulk_create(
            MixtureMember(mixture=mixture, version_id=pk) for pk in admitted
        )
        _activate(mixture)
        scoreboard_request(mixture=mixture)
        learned_router_request(mixture=mixture)
        merge_request(mixture=mixture)
    return mixture


def mixture_follow_transition(event: VersionTransition) -> None:
    """Transition listener (registered in RoutingConfig.ready): a version entering or
    leaving ``admitted`` publishes a new snapshot in the same transaction, unless the
    caller batches several changes and publishes once itself."""
    if event.batched or AdapterVersion.Status.ADMITTED not in (event.from_status, event.to_status):
        return
    version = event.version
    mixture_publish(
        reason=f"{version.adapter} v{version.number}: {event.from_status} → {event.to_status}",
        actor=event.actor,
    )


def mixture_rollback(*, mixture: MixtureVersion, actor: AbstractBaseUser) -> MixtureVersion:
    """Serve an earlier snapshot again, as a new mixture version.

    The mixture always equals the set of admitted versions, so a rollback suspends the
    versions admitted since that snapshot (with the reason, in the audit trail). Versions
    of the snapshot withdrawn or suspended since stay out: a rollback never resurrects them.
    """
    Status = AdapterVersion.Status
    with transaction.atomic():
        _lock_mixture()
        wanted = set(mixture.members.values_list("pk", flat=True))
        reason = f"Rolled back to mixture v{mixture.number}."
        newer = AdapterVersion.objects.filter(status=Status.ADMITTED).exclude(pk__in=wanted)
        for version in newer.select_related("adapter"):
            adapter_version_transition(
                version=version,
                to_status=Status.SUSPENDED,
                actor=actor,
                reason=reason,
                batched=True,
            )
        return mixture_publish(reason=reason, actor=actor)
