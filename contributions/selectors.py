"""Reads for contributions. Visibility rules live here, so every list is filtered by owner."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, Prefetch, QuerySet

from contributions.models import Adapter, AdapterVersion, AuditEvent, BaseModel
from tessera.errors import DomainError


def user_is_maintainer(user: AbstractBaseUser | AnonymousUser) -> bool:
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    # Cached per user object: templates and permissions ask repeatedly in one request.
    cached = getattr(user, "_tessera_is_maintainer", None)
    if cached is None:
        cached = user.groups.filter(name=settings.MAINTAINERS_GROUP).exists()
        user._tessera_is_maintainer = cached
    return cached


def base_model_active() -> BaseModel:
    base_model = BaseModel.objects.filter(is_active=True).first()
    if base_model is None:
        raise DomainError(
            "base_model_missing",
            "No base model is configured yet; an operator must run "
            "'python manage.py prepare_base_model'.",
            kind="conflict",
        )
    return base_model


def adapter_list_visible(*, user: AbstractBaseUser) -> QuerySet[Adapter]:
    """Adapters the user may see in the contributor API and portal: their own, or all for
    maintainers."""
    qs = Adapter.objects.select_related("owner", "owner__contributor").annotate(
        version_count=Count("versions")
    )
    if not user_is_maintainer(user):
        qs = qs.filter(owner=user)
    return qs.order_by("-created_at", "-id")


def adapter_get_visible(*, user: AbstractBaseUser, adapter_id: int) -> Adapter:
    adapter = (
        adapter_list_visible(user=user)
        .prefetch_related(
            Prefetch(
                "versions",
                queryset=AdapterVersion.objects.select_related("base_model").order_by("-number"),
            ),
            Prefetch(
                "audit_events",
                queryset=AuditEvent.objects.select_related("actor", "version").order_by(
                    "created_at", "id"
                ),
            ),
        )
        .filter(pk=adapter_id)
        .first()
    )
    if adapter is None:
        # Someone else's adapter is indistinguishable from a missing one.
        raise DomainError("not_found", "No such adapter.", kind="not_found")
    return adapter


def version_get_visible(*, user: AbstractBaseUser, adapter_id: int, number: int) -> AdapterVersion:
    adapter = adapter_get_visible(user=user, adapter_id=adapter_id)
    for version in adapter.versions.all():
        if version.number == number:
            return version
    raise DomainError("not_found", "No such version.", kind="not_found")


def version_by_weights_sha256(sha256: str) -> AdapterVersion | None:
    """The version holding these weights. One whose evaluation ended on a platform fault
    holds nothing: its contributor may upload the same file again."""
    return (
        AdapterVersion.objects.select_related("adapter")
        .filter(weights_sha256=sha256, platform_fault="")
        .first()
    )


def audit_events_for_version(*, version: AdapterVersion) -> list[AuditEvent]:
    return [e for e in version.adapter.audit_events.all() if e.version_id == version.pk]
