"""The live mixture: every admission, withdrawal and suspension publishes a new immutable
snapshot in the same transaction; rollbacks keep the mixture equal to the admitted set."""

from __future__ import annotations

import pytest
from django.db import transaction

from contributions import services
from contributions.models import AdapterVersion, AuditEvent
from routing import selectors
from routing import services as routing_services
from routing.models import MixtureVersion
from tests.factories import AdapterFactory
from tests.support import crafted

pytestmark = pytest.mark.django_db

Status = AdapterVersion.Status
PATH = [Status.QUEUED, Status.EVALUATING, Status.PASSED, Status.ADMITTED]


def walk_to(version: AdapterVersion, target: str) -> AdapterVersion:
    """Walk a version along the life cycle (as the evaluation would) up to ``target``."""
    version.refresh_from_db()
    start = PATH.index(version.status) + 1 if version.status in PATH else 0
    for status in PATH[start : PATH.index(target) + 1]:
        version = services.adapter_version_transition(version=version, to_status=status, actor=None)
    return version


@pytest.fixture
def versions(contributor, base_model):
    made = []
    for rank in (2, 4, 8):
        adapter = AdapterFactory(owner=contributor)
        made.append(
            services.adapter_version_create(
                adapter=adapter,
                actor=contributor,
                parts=crafted.real_adapter(rank=rank).parts(),
            )
        )
    return made


def active_number() -> int:
    """The number the serving process sees (0 before anything is published)."""
    key = selectors.mixture_active_key()
    return key[1] if key else 0


def member_ids() -> set[int]:
    return set(selectors.mixture_member_ids(selectors.mixture_active()))


def test_nothing_is_published_before_the_first_admission(versions):
    walk_to(versions[0], Status.PASSED)
    assert selectors.mixture_active() is None
    assert active_number() == 0


def test_each_admission_publishes_the_next_snapshot(versions):
    walk_to(versions[0], Status.ADMITTED)
    assert active_number() == 1
    assert member_ids() == {versions[0].pk}
    walk_to(versions[1], Status.ADMITTED)
    assert active_number() == 2
    assert member_ids() == {versions[0].pk, versions[1].pk}
    first = MixtureVersion.objects.get(number=1)
    assert set(selectors.mixture_member_ids(first)) == {versions[0].pk}, "snapshots never change"
    assert MixtureVersion.objects.filter(is_active=True).count() == 1


def test_withdrawal_and_suspension_leave_the_mixture_at_once(versions, contributor, maintainer):
    for version in versions[:2]:
        walk_to(version, Status.ADMITTED)
    services.adapter_version_withdraw(version=versions[0], actor=contributor, reason="bug")
    assert member_ids() == {versions[1].pk}
    services.adapter_version_transition(
        version=versions[1], to_status=Status.SUSPENDED, actor=maintainer, reason="abuse"
    )
    assert member_ids() == set()
    assert active_number() == 4
    assert "withdrawn" in MixtureVersion.objects.get(number=3).reason


def test_a_failed_transition_publishes_nothing(versions):
    walk_to(versions[0], Status.PASSED)
    with pytest.raises(services.DomainError), transaction.atomic():
        services.adapter_version_transition(
            version=versions[0], to_status=Status.ADMITTED, actor=None
        )
        raise services.DomainError("boom", "rolled back")
    assert not MixtureVersion.objects.exists()
    versions[0].refresh_from_db()
    assert versions[0].status == Status.PASSED


def test_the_diff_names_what_to_load_and_unload(versions):
    walk_to(versions[0], Status.ADMITTED)
    loaded = selectors.mixture_member_ids(selectors.mixture_active())
    walk_to(versions[1], Status.ADMITTED)
    services.adapter_version_withdraw(version=versions[0], actor=versions[0].adapter.owner)
    diff = selectors.mixture_diff(loaded, selectors.mixture_active())
    assert diff.added == {versions[1].pk}
    assert diff.removed == {versions[0].pk}


def test_rollback_serves_the_old_snapshot_and_suspends_newer_admissions(versions, maintainer):
    walk_to(versions[0], Status.ADMITTED)
    old = selectors.mixture_active()
    walk_to(versions[1], Status.ADMITTED)
    walk_to(versions[2], Status.ADMITTED)
    new = routing_services.mixture_rollback(mixture=old, actor=maintainer)
    assert new.number == 4
    assert new.is_active
    assert member_ids() == {versions[0].pk}
    for version in versions[1:]:
        version.refresh_from_db()
        assert version.status == Status.SUSPENDED
    assert (
        AuditEvent.objects.filter(
            to_status="suspended", actor=maintainer, reason="Rolled back to mixture v1."
        ).count()
        == 2
    )


def test_rollback_never_resurrects_a_withdrawn_version(versions, maintainer):
    walk_to(versions[0], Status.ADMITTED)
    old = selectors.mixture_active()
    services.adapter_version_withdraw(version=versions[0], actor=versions[0].adapter.owner)
    routing_services.mixture_rollback(mixture=old, actor=maintainer)
    assert member_ids() == set()


def test_the_admin_rolls_back_for_a_maintainer(versions, maintainer, client):
    services.maintainer_grant(user=maintainer)
    walk_to(versions[0], Status.ADMITTED)
    old = selectors.mixture_active()
    walk_to(versions[1], Status.ADMITTED)
    client.force_login(maintainer)
    response = client.post(
        "/admin/routing/mixtureversion/",
        {"action": "roll_back", "_selected_action": [old.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert member_ids() == {versions[0].pk}
    assert b"is now active" in response.content
