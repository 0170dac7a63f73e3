"""The merged adapter of a mixture version: queued when the mixture is published, built by a
Celery job (``routing.merge_mixture``), served as model "tessera-merged".

The job loads the active base model on the CPU, merges the mixture's public members with
PEFT (routing.merging.merge: TESSERA_MERGE_METHOD, TESSERA_MERGE_DENSITY, equal weights,
a fixed seed for DARE) and stores the result like an uploaded adapter: a safetensors file
of lora_A/lora_B tensors and our normalised config, never a pickle. Private members are
left out: the merged adapter is served to everyone.

A mixture without public members is a done row with no files and the reason; a merge that
fails (PEFT refuses members of different ranks for TIES, a weights file is unreadable) is a
failed row with the reason, and serving carries on without a merged adapter.

Coalesced like the scoreboard: a job that finds a newer mixture version's build already
queued, running or done marks its own row superseded and stops.
"""

from __future__ import annotations

import json
import logging

import torch
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from safetensors.torch import save as safetensors_save

from contributions.base_models import base_model_load
from contributions.intake.files import CONFIG_NAME, WEIGHTS_NAME
from contributions.models import Adapter, AdapterVersion
from contributions.selectors import base_model_active
from multilora import tensors_from_safetensors
from routing.jobs import job_enqueue, job_failure_reason, job_settle, job_start
from routing.merging.merge import LoraInput, MergedLora, MergeRefused, merge_loras
from routing.models import MergedAdapter, MixtureVersion

logger = logging.getLogger(__name__)

Status = MergedAdapter.Status
NO_PUBLIC_MEMBERS = "The mixture has no public adapter to merge."


# --- Queueing -------------------------------------------------------------------------------


def merge_request(*, mixture: MixtureVersion) -> MergedAdapter | None:
    """A queued build for a just-published mixture; the job is sent after commit. Caller
    holds the publishing transaction. Off with TESSERA_MERGE_ON_PUBLISH=false."""
    if not settings.TESSERA_MERGE_ON_PUBLISH:
        return None
    merged = MergedAdapter.objects.create(
        mixture=mixture,
        method=settings.TESSERA_MERGE_METHOD,
        density=settings.TESSERA_MERGE_DENSITY,
    )
    merged_id = merged.pk
    transaction.on_commit(lambda: merge_enqueue(merged_id=merged_id))
    return merged


def merge_enqueue(*, merged_id: int) -> None:
    """Send ``routing.merge_mixture`` to the evaluation queue (its workers hold the base
    model). A broker that is down is logged: the mixture is published regardless, and
    ``manage.py merge_mixture`` builds the merged adapter by hand."""
    job_enqueue(task="routing.merge_mixture", pk=merged_id, label="merged adapter")


# --- Building -------------------------------------------------------------------------------


def merge_compute(*, merged_id: int) -> str:
    """Everything ``routing.merge_mixture`` does; returns what happened in one word:
    gone | finished | superseded | busy | done | failed."""
    merged = MergedAdapter.objects.select_related("mixture").filter(pk=merged_id).first()
    if merged is None:
        return "gone"
    # Coalesced: a burst of publications builds only the newest mixture version's merge.
    stopped = job_start(row=merged, coalesced=True)
    if stopped is not None:
        return stopped
    try:
        versions = public_members(merged.mixture)
        result = (
            merged_lora(versions, method=merged.method, density=merged.density)
            if versions
            else None
        )
    except MergeRefused as refused:
        logger.warning("merged adapter of %s refused: %s", merged.mixture, refused)
        return _fail(merged, str(refused))
    except Exception as exc:
        logger.exception("merged adapter of %s failed", merged.mixture)
        return _fail(merged, job_failure_reason(exc))
    return _finish(merged, versions, result)


def _fail(merged: MergedAdapter, reason: str) -> str:
    job_settle(row=merged, status=Status.FAILED, finished_at=timezone.now(), reason=reason[:2000])
    return "failed"


def _finish(
    merged: MergedAdapter, versions: list[AdapterVersion], result: MergedLora | None
) -> str:
    fields = {
        "status": Status.DONE,
        "finished_at": timezone.now(),
        "version_ids": [version.pk for version in versions],
        "reason": "" if result is not None else NO_PUBLIC_MEMBERS,
    }
    if result is not None:
        config = json.dumps(result.config, indent=2, sort_keys=True).encode()
        merged.config_file.save(CONFIG_NAME, ContentFile(config), save=False)
        merged.weights_file.save(
            WEIGHTS_NAME, ContentFile(safetensors_save(result.tensors)), save=False
        )
        fields.update(
            rank=result.rank,
            adapter_config=result.config,
            config_file=merged.config_file.name,
            weights_file=merged.weights_file.name,
        )
    if not job_settle(row=merged, **fields):
        # Taken over meanwhile (we ran past the time limit): the other build owns the row.
        _delete_files(merged)
        return "busy"
    return "done"


def _delete_files(merged: MergedAdapter) -> None:
    for field in (merged.config_file, merged.weights_file):
        if field.name:
            default_storage.delete(field.name)


def merge_compute_now(
    *, mixture: MixtureVersion, method: str | None = None, density: float | None = None
) -> MergedAdapter:
    """Build ``mixture``'s merged adapter in this process (the management command),
    whatever its row's state: a fresh row (and files) replaces an old one."""
    for old in MergedAdapter.objects.filter(mixture=mixture):
        _delete_files(old)
        old.delete()
    merged = MergedAdapter.objects.create(
        mixture=mixture,
        method=method or settings.TESSERA_MERGE_METHOD,
        density=settings.TESSERA_MERGE_DENSITY if density is None else density,
    )
    merge_compute(merged_id=merged.pk)
    merged.refresh_from_db()
    return merged


def public_members(mixture: MixtureVersion) -> list[AdapterVersion]:
    """The mixture's members that everyone may use, in version order (the merge order)."""
    return list(
        AdapterVersion.objects.filter(pk__in=mixture.entries.values("version_id"))
        .exclude(adapter__visibility=Adapter.Visibility.PRIVATE)
        .select_related("adapter")
        .order_by("pk")
    )


def lora_input(version: AdapterVersion) -> LoraInput:
    """A member as the merge takes it: our validated config and its stored tensors."""
    with version.weights_file.open("rb") as weights:
        tensors = tensors_from_safetensors(weights.read())
    return LoraInput(name=str(version), config=version.adapter_config, tensors=tensors)


def merged_lora(versions: list[AdapterVersion], *, method: str, density: float) -> MergedLora:
    """Merge ``versions`` on the active base model, loaded on the CPU in float32 (where
    DARE's seeded drops are reproducible and PEFT keeps LoRA weights anyway)."""
    inputs = [lora_input(version) for version in versions]
    model, _tokenizer = base_model_load(base_model_active(), dtype=torch.float32)
    return merge_loras(model, inputs, method=method, density=density)
