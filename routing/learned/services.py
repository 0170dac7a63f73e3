"""Training a mixture version's learned router: queued when it is published, trained by a
Celery job (``routing.train_router``), loaded by the serving process into its Catalog.

What it learns from is measured, and public only: each candidate's (the base model's and
every member's) per-example outcome on the public splits of the built-in skill and general
suites (``public_splits``; the hidden, paraphrase and composite splits judge the router on
the scoreboard, so it never sees them), measured first where missing (one sandboxed child,
as the scoreboard does), plus the members' example prompts, each counted as one its adapter
answers well. Features are the prompts' all-MiniLM-L6-v2 embeddings, the same ones a
request gets. routing.learned.fit picks the model.

Private members are trained on like public ones: their columns are only ever scored for
their owner's requests (the router's candidates), and nothing here leaves the database
except counts.
"""

from __future__ import annotations

import logging

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone

from contributions.models import AdapterVersion
from contributions.selectors import base_model_active
from evaluation.models import Example
from evaluation.services.outcomes import outcomes_measure, outcomes_table, public_splits
from routing.jobs import job_enqueue, job_failure_reason, job_settle, job_start
from routing.learned.fit import Fitted, TrainingSet, fit_best
from routing.models import LearnedRouter, MixtureVersion
from routing.router.learned import LearnedRouterModel

logger = logging.getLogger(__name__)

Status = LearnedRouter.Status
# Example prompts per adapter taken into training: contributors give 3 to 50; a cap keeps
# one adapter's many prompts from outweighing another's few in the nearest neighbours.
MAX_PROMPTS_PER_ADAPTER = 50
FILE_NAME = "learned-router.npz"


# --- Queueing -------------------------------------------------------------------------------


def learned_router_request(*, mixture: MixtureVersion) -> LearnedRouter | None:
    """A queued learned router for a just-published mixture; the job is sent after commit.
    Caller holds the publishing transaction. Off with TESSERA_LEARNED_ROUTER_ON_PUBLISH."""
    if not settings.TESSERA_LEARNED_ROUTER_ON_PUBLISH:
        return None
    router = LearnedRouter.objects.create(mixture=mixture)
    router_id = router.pk
    transaction.on_commit(lambda: learned_router_enqueue(router_id=router_id))
    return router


def learned_router_enqueue(*, router_id: int) -> None:
    """Send ``routing.train_router`` to the evaluation queue (measuring missing outcomes
    needs the sandbox and the base model). A broker that is down is logged: the mixture is
    published regardless, the learned router falls back to the embedding router's picks,
    and ``manage.py train_router`` trains it by hand."""
    job_enqueue(task="routing.train_router", pk=router_id, label="learned router")


# --- Training -------------------------------------------------------------------------------


def learned_router_train(*, router_id: int) -> str:
    """Everything ``routing.train_router`` does; returns what happened in one word:
    gone | finished | superseded | busy | done | failed. Idempotent: a redelivered or
    repeated message for a router trained (or failed) already does nothing."""
    router = LearnedRouter.objects.select_related("mixture").filter(pk=router_id).first()
    if router is None:
        return "gone"  # its mixture was deleted, or a command retrained it under a new row
    # Coalesced: a burst of publications (a maintainer approving a queue of versions) trains
    # only the newest mixture version's router; the older ones would never be served.
    stopped = job_start(row=router, coalesced=True)
    if stopped is not None:
        return stopped
    try:
        data, summary = training_set(mixture=router.mixture)
        fitted = fit_best(data)
        _store(router, fitted, summary)
    except Exception as exc:
        logger.exception("training the learned router of %s failed", router.mixture)
        job_settle(
            row=router,
            status=Status.FAILED,
            trained_at=None,
            finished_at=timezone.now(),
            failure_reason=job_failure_reason(exc),
        )
        return "failed"
    return "done"


def _store(router: LearnedRouter, fitted: Fitted, summary: dict) -> None:
    router.parameters_file.save(FILE_NAME, ContentFile(fitted.model.to_npz()), save=False)
    now = timezone.now()
    settled = job_settle(
        row=router,
        status=Status.DONE,
        kind=fitted.kind,
        params=fitted.params,
        cv_accuracy=fitted.cv,
        training=summary,
        parameters_file=router.parameters_file.name,
        trained_at=now,
        finished_at=now,
    )
    if not settled:  # taken over meanwhile: the other worker's file is the one kept
        router.parameters_file.storage.delete(router.parameters_file.name)


def learned_router_train_now(*, mixture: MixtureVersion) -> LearnedRouter:
    """Train ``mixture``'s learned router in this process (the management command),
    whatever its state: a fresh row replaces an old one (and its file)."""
    for old in LearnedRouter.objects.filter(mixture=mixture):
        if old.parameters_file:
            old.parameters_file.delete(save=False)
        old.delete()
    router = LearnedRouter.objects.create(mixture=mixture)
    learned_router_train(router_id=router.pk)
    router.refresh_from_db()
    return router


def members_of(mixture: MixtureVersion) -> list[AdapterVersion]:
    return list(
        AdapterVersion.objects.filter(pk__in=mixture.entries.values("version_id"))
        .select_related("adapter")
        .order_by("pk")
    )


def training_set(*, mixture: MixtureVersion) -> tuple[TrainingSet, dict]:
    """(the training set, a summary of it in counts) for ``mixture``; see the module
    docstring for what goes in."""
    from evaluation.worker.signatures import embed

    base_model = base_model_active()
    members = members_of(mixture)
    splits = [split for split in public_splits() if split.split == Example.Split.PUBLIC]
    unmeasured = outcomes_measure(base_model=base_model, versions=members, splits=splits)
    example_ids = [pk for split in splits for pk in split.example_ids]
    prompts = [prompt for split in splits for prompt in split.prompts()]
    table = outcomes_table(
        base_model_id=base_model.pk,
        version_ids=[v.pk for v in members],
        example_ids=example_ids,
    )
    columns: list[int | None] = [None, *(v.pk for v in members)]
    correct = np.zeros((len(example_ids), len(columns)), dtype=np.float32)
    known = np.zeros_like(correct, dtype=bool)
    for column, version_id in enumerate(columns):
        scores = table[version_id]
        for row, pk in enumerate(example_ids):
            score = scores.get(pk)
            if score is not None:
                correct[row, column], known[row, column] = score, True
    # An example nothing was measured on says nothing.
    keep = known.any(axis=1)
    example_ids = [pk for pk, kept in zip(example_ids, keep, strict=True) if kept]
    prompts = [text for text, kept in zip(prompts, keep, strict=True) if kept]
    correct, known = correct[keep], known[keep]
    owned: list[tuple[int, str]] = []
    for column, version in enumerate(members, start=1):
        own = [str(p) for p in version.adapter.example_prompts or () if str(p).strip()]
        owned.extend((column, text) for text in own[:MAX_PROMPTS_PER_ADAPTER])
    vectors = embed([*prompts, *(text for _column, text in owned)])
    data = TrainingSet(
        points=np.ascontiguousarray(vectors, dtype=np.float32),
        correct=correct,
        known=known,
        owner=np.asarray([column for column, _text in owned], dtype=np.int64),
        version_ids=[v.pk for v in members],
        example_ids=example_ids,
        mixture_number=mixture.number,
    )
    summary = {
        "public_examples": len(example_ids),
        "example_prompts": len(owned),
        "tasks": len(splits),
        "candidates": len(columns),
        "solvable": int((known & (correct >= 0.5)).any(axis=1).sum()),
        "unmeasured": {str(pk): reason for pk, reason in unmeasured.items()},
    }
    return data, summary


# --- Serving --------------------------------------------------------------------------------


def learned_router_load(*, mixture_id: int) -> LearnedRouterModel | None:
    """The trained model of mixture ``mixture_id`` for the serving Catalog, or None when it
    is not trained (yet) or its file cannot be read (logged: the router falls back to the
    embedding router rather than failing requests)."""
    router = (
        LearnedRouter.objects.filter(mixture_id=mixture_id, status=Status.DONE)
        .exclude(parameters_file="")
        .first()
    )
    if router is None:
        return None
    try:
        with router.parameters_file.open("rb") as stored:
            return LearnedRouterModel.from_npz(stored.read())
    except (OSError, ValueError, KeyError) as error:
        logger.error("could not load the learned router of mixture %s: %s", mixture_id, error)
        return None


def learned_router_ready(*, mixture_id: int) -> bool:
    """Whether mixture ``mixture_id`` has a trained router (one indexed read)."""
    return LearnedRouter.objects.filter(mixture_id=mixture_id, status=Status.DONE).exists()
