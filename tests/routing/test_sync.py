"""The mixture sync: the serving process follows the active mixture, loading only the
versions that joined and retiring those that left, with a catalog the router can read."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from django.core.files.base import ContentFile
from transformers import AutoModelForCausalLM

from contributions import services
from contributions.models import AdapterVersion
from multilora import Engine
from routing.serving import sync as sync_module
from routing.serving.sync import MixtureSync, engine_key
from tests.routing.conftest import UNITS_PROMPTS, admitted_version
from tests.support.tiny_model import tiny_llama_config, tiny_tokenizer

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_evaluation")]
Status = AdapterVersion.Status


@pytest.fixture
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(AutoModelForCausalLM.from_config(tiny_llama_config()), tiny_tokenizer())


@pytest.fixture
def loads(monkeypatch) -> list[int]:
    """The version ids the sync reads from storage."""
    seen: list[int] = []
    original = sync_module.add_adapter_version

    def spy(registry, version, *, key):
        seen.append(version.pk)
        return original(registry, version, key=key)

    monkeypatch.setattr(sync_module, "add_adapter_version", spy)
    return seen


def test_the_sync_loads_only_what_joined_the_mixture(engine, loads, contributor, base_model):
    sync = MixtureSync(engine)
    assert sync.refresh() is False  # nothing published yet
    first = admitted_version(contributor, slug="one", prompts=UNITS_PROMPTS, seed=11)
    assert sync.refresh() is True
    assert loads == [first.pk]
    second = admitted_version(contributor, slug="two", prompts=UNITS_PROMPTS, seed=12)
    assert sync.refresh() is True
    assert loads == [first.pk, second.pk]  # the first one was not read again
    assert sync.refresh() is False  # no change, no work
    assert sorted(a.version_id for a in sync.catalog) == [first.pk, second.pk]
    assert engine_key(first.pk) in engine.registry and engine_key(second.pk) in engine.registry


def test_the_catalog_describes_each_adapter_for_the_router(engine, contributor, base_model):
    contributor.contributor.display_name = "Ada L."
    contributor.contributor.save()
    version = admitted_version(
        contributor, slug="units", prompts=UNITS_PROMPTS, private=True, seed=13
    )
    sync = MixtureSync(engine)
    sync.refresh()
    (adapter,) = sync.catalog
    assert adapter.model_id == f"{contributor.username}/units"
    assert adapter.private is True and adapter.owner_id == contributor.pk
    assert adapter.contributor_name == "Ada L."
    assert adapter.signature is not None and adapter.signature.shape == (384,)
    assert adapter.license == version.adapter.license
    assert sync.catalog.by_model_id(f"{contributor.username}/units@v1") is adapter


def test_a_suspended_adapter_leaves_the_catalog_at_once_and_the_engine_after_a_grace(
    engine, contributor, maintainer, base_model, monkeypatch
):
    version = admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=14)
    sync = MixtureSync(engine)
    sync.refresh()
    services.adapter_version_transition(
        version=version, to_status=Status.SUSPENDED, actor=maintainer, reason="Misbehaves."
    )
    assert sync.refresh() is True
    assert len(sync.catalog) == 0  # no new request can be routed to it
    assert engine_key(version.pk) in engine.registry  # requests already routed still run
    monkeypatch.setattr(sync_module, "RETIRE_GRACE_SECONDS", 0.0)
    sync._retiring = [(0.0, key) for _, key in sync._retiring]
    sync.refresh()
    assert engine_key(version.pk) not in engine.registry


def test_an_unreadable_adapter_is_skipped_and_the_others_are_served(
    engine, contributor, base_model
):
    good = admitted_version(contributor, slug="good", prompts=UNITS_PROMPTS, seed=15)
    broken = admitted_version(contributor, slug="broken", prompts=UNITS_PROMPTS, seed=16)
    broken.weights_file.storage.delete(broken.weights_file.name)
    sync = MixtureSync(engine)
    sync.refresh()
    assert [a.version_id for a in sync.catalog] == [good.pk]
    assert broken.pk in sync.failed


def test_the_best_composition_per_router_follows_the_served_mixtures_scoreboard(
    engine, contributor, base_model
):
    from routing.models import MixtureVersion, Scoreboard

    admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=17)
    sync = MixtureSync(engine)
    sync.refresh()
    assert sync.catalog.best_compositions == {}  # not scored yet: top1 is served
    mixture = MixtureVersion.objects.get(is_active=True)
    board = Scoreboard.objects.create(mixture=mixture)
    assert sync.refresh() is False  # queued: nothing to read yet
    hidden = {
        "routers": {"embedding": {"score": 0.80}, "learned": {"score": 0.84}},
        "methods": {
            "embedding/topk": {"score": 0.86},
            "embedding/arrow": {"score": 0.86},  # as good as topk, and slower to serve
            "learned/topk": {"score": 0.83},
            "merged": {"score": 0.50},
        },
    }
    Scoreboard.objects.filter(pk=board.pk).update(
        status=Scoreboard.Status.DONE, figures={"splits": {"hidden": hidden}}
    )
    assert sync.refresh() is True
    assert sync.catalog.best_compositions == {"embedding": "topk", "learned": "top1"}
    # embedding/topk (0.86) beats every learned figure (0.84 at best).
    assert sync.catalog.best_router == "embedding"
    hidden["methods"]["learned/logit"] = {"score": 0.90}
    Scoreboard.objects.filter(pk=board.pk).update(figures={"splits": {"hidden": hidden}})
    sync._board_seen = None  # the same row with new figures: read it again
    assert sync.refresh() is True
    assert sync.catalog.best_router == "learned"
    assert sync.catalog.best_compositions["learned"] == "logit"


def test_edits_after_admission_are_served_at_the_next_poll_without_reloading(
    engine, loads, contributor, base_model
):
    version = admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=18)
    sync = MixtureSync(engine)
    sync.refresh()
    assert sync.refresh() is False  # nothing edited: nothing swapped
    services.adapter_update(
        adapter=version.adapter,
        actor=contributor,
        visibility="private",
        license="MIT",
        title="Units, renamed",
    )
    contributor.contributor.display_name = "Ada L."
    contributor.contributor.save()
    assert sync.refresh() is True
    (adapter,) = sync.catalog
    assert (adapter.private, adapter.license, adapter.title) == (True, "MIT", "Units, renamed")
    assert adapter.contributor_name == "Ada L."
    assert sync.catalog.visible_to(contributor.pk + 1000) == []
    assert sync.catalog.by_model_id(f"{contributor.username}/units") is adapter
    assert loads == [version.pk]  # the weights were not read again
    assert sync.refresh() is False


def test_a_merged_adapter_holding_a_member_made_private_is_no_longer_served(
    engine, contributor, base_model, monkeypatch
):
    from routing.catalog import MERGED_MODEL_ID, ServedAdapter

    version = admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=19)
    sync = MixtureSync(engine)
    sync.refresh()
    (member,) = sync.catalog
    merged = ServedAdapter(
        key="merged-test",
        version_id=0,
        version_number=1,
        adapter_id=0,
        model_id=MERGED_MODEL_ID,
        title="Merged",
        owner_id=0,
        owner_username="tessera",
        license=member.license,
        private=False,
        task_tags=(),
        signature=None,
        members=(member.version_id,),
    )
    sync.catalog = replace(sync.catalog, merged=merged)
    services.adapter_update(adapter=version.adapter, actor=contributor, license="MIT")
    assert sync.refresh() is True
    assert sync.catalog.merged.license == "MIT"  # follows its members
    services.adapter_update(adapter=version.adapter, actor=contributor, visibility="private")
    assert sync.refresh() is True
    assert sync.catalog.merged is None


def test_a_weights_file_changed_on_disk_after_admission_is_refused_and_the_rest_served(
    engine, contributor, base_model, caplog
):
    good = admitted_version(contributor, slug="good", prompts=UNITS_PROMPTS, seed=20)
    tampered = admitted_version(contributor, slug="tampered", prompts=UNITS_PROMPTS, seed=21)
    storage = tampered.weights_file.storage
    with storage.open(tampered.weights_file.name, "rb") as weights:
        data = bytearray(weights.read())
    data[-1] ^= 0x01  # one bit of one weight: still a valid safetensors file
    storage.delete(tampered.weights_file.name)
    storage.save(tampered.weights_file.name, ContentFile(bytes(data)))
    sync = MixtureSync(engine)
    with caplog.at_level("ERROR", logger="routing.serving.sync"):
        sync.refresh()
    assert [a.version_id for a in sync.catalog] == [good.pk]
    assert engine_key(tampered.pk) not in engine.registry
    assert "sha256" in sync.failed[tampered.pk]
    assert any("changed on disk" in record.getMessage() for record in caplog.records)
