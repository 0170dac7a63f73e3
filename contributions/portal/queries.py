"""Reads the portal needs on top of contributions.selectors.

Each one starts from a selector, so who may see what is still decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import OuterRef, QuerySet, Subquery

from contributions import selectors
from contributions.intake import IntakeLimits
from contributions.intake.config import LORA_SCALE_RANGE, MAX_LORA_ALPHA, MAX_LORA_DROPOUT
from contributions.licenses import LICENSE_CHOICES
from contributions.models import Adapter, AdapterVersion, ApiToken, AuditEvent, BaseModel
from tessera.errors import DomainError


def _with_latest_version(adapters: QuerySet[Adapter]) -> QuerySet[Adapter]:
    latest = AdapterVersion.objects.filter(adapter=OuterRef("pk")).order_by("-number")
    return adapters.annotate(
        latest_number=Subquery(latest.values("number")[:1]),
        latest_status=Subquery(latest.values("status")[:1]),
    )


def adapter_list_owned(*, user: AbstractBaseUser) -> QuerySet[Adapter]:
    """The user's own adapters, each with its latest version's number and status."""
    return _with_latest_version(selectors.adapter_list_visible(user=user).filter(owner=user))


def adapter_list_all(*, user: AbstractBaseUser) -> QuerySet[Adapter]:
    """Every contributor's adapters: maintainers only."""
    if not selectors.user_is_maintainer(user):
        raise DomainError("not_maintainer", "Only maintainers see every adapter.", kind="forbidden")
    return _with_latest_version(selectors.adapter_list_visible(user=user))


@dataclass(frozen=True)
class VersionRow:
    version: AdapterVersion
    events: list[AuditEvent]


def version_rows(*, adapter: Adapter) -> list[VersionRow]:
    """Newest version first, each with its audit trail (oldest event first).

    ``adapter`` comes from selectors.adapter_get_visible, which prefetched both lists.
    """
    return [
        VersionRow(version, selectors.audit_events_for_version(version=version))
        for version in adapter.versions.all()
    ]


def adapter_events(*, adapter: Adapter) -> list[AuditEvent]:
    """Events about the adapter itself (created, metadata changed), not one version."""
    return [event for event in adapter.audit_events.all() if event.version_id is None]


def api_token_list(*, user: AbstractBaseUser) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-created_at", "-id")


def api_token_get_owned(*, user: AbstractBaseUser, token_id: int) -> ApiToken:
    token = api_token_list(user=user).filter(pk=token_id).first()
    if token is None:
        # Someone else's token is indistinguishable from a missing one.
        raise DomainError("not_found", "No such token.", kind="not_found")
    return token


def base_model_or_none() -> BaseModel | None:
    try:
        return selectors.base_model_active()
    except DomainError:
        return None


@dataclass(frozen=True)
class IntakeRules:
    base_model: BaseModel | None
    limits: IntakeLimits
    target_modules: list[str]
    base_model_names: list[str]  # what adapter_config.json's base_model_name_or_path may say
    licenses: list[tuple[str, str]]
    max_alpha: float = MAX_LORA_ALPHA
    scale_range: tuple[float, float] = LORA_SCALE_RANGE
    max_dropout: float = MAX_LORA_DROPOUT


def intake_rules() -> IntakeRules:
    base_model = base_model_or_none()
    return IntakeRules(
        base_model=base_model,
        limits=IntakeLimits.from_settings(),
        target_modules=base_model.target_module_names if base_model else [],
        base_model_names=(
            list(dict.fromkeys([base_model.name, base_model.source, *base_model.aliases]))
            if base_model
            else []
        ),
        licenses=LICENSE_CHOICES,
    )
