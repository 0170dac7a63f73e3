"""Reads for the mixture."""

from __future__ import annotations

from dataclasses import dataclass

from routing.models import MixtureVersion


def mixture_active() -> MixtureVersion | None:
    return MixtureVersion.objects.filter(is_active=True).first()


def mixture_by_number_or_active(number: int | None) -> MixtureVersion | None:
    """Mixture version ``number``, or the active one when ``number`` is None (what the
    management commands' ``--mixture N`` means); None when there is no such version."""
    if number is None:
        return mixture_active()
    return MixtureVersion.objects.filter(number=number).first()


def mixture_active_key() -> tuple[int, int] | None:
    """(pk, number) of the active mixture: what the serving process polls. The pk tells a
    rebuilt database (numbers start again) from the one the server last read."""
    return MixtureVersion.objects.filter(is_active=True).values_list("pk", "number").first()


@dataclass(frozen=True)
class MixtureDiff:
    added: frozenset[int]  # AdapterVersion ids to load
    removed: frozenset[int]  # AdapterVersion ids to unload


def mixture_member_ids(mixture: MixtureVersion | None) -> frozenset[int]:
    if mixture is None:
        return frozenset()
    return frozenset(mixture.entries.values_list("version_id", flat=True))


def mixture_diff(loaded: frozenset[int], mixture: MixtureVersion | None) -> MixtureDiff:
    """What a server holding ``loaded`` must load and unload to serve ``mixture``."""
    wanted = mixture_member_ids(mixture)
    return MixtureDiff(added=wanted - loaded, removed=loaded - wanted)
