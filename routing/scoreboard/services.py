"""Scoring a mixture version: queued when it is published, computed by a Celery job.

The job reads every member's and the base model's per-example outcomes on the union and on
the composite suite (evaluation measures the missing ones first, in one sandboxed child),
embeds each example's prompt once, asks each router (embedding, and the mixture's learned
router) what it would pick for it in this mixture (the same decision the inference server
makes, from the same catalog values), and joins the two (routing.scoreboard.figures). The
mixing methods' answers (top-k sums, Arrow, logit fusion, the merged adapter) are measured
where no stored outcome is their answer (routing.scoreboard.methods). Private adapters are
left out: the scoreboard is what a member of the public gets.

Coalesced: a job that finds a newer mixture version already queued for scoring marks its
own board superseded and stops, so a burst of admissions scores only the last mixture.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from contributions.models import AdapterVersion
from contributions.selectors import base_model_active
from evaluation.services.composed import ExtraAdapter
from evaluation.services.outcomes import (
    UNION_SPLITS,
    UnionSplit,
    composite_splits,
    outcomes_measure,
    outcomes_table,
    union_splits,
)
from evaluation.services.runs import RunFailure
from routing.catalog import Catalog
from routing.jobs import job_enqueue, job_failure_reason, job_settle, job_start
from routing.learned.services import learned_router_load, learned_router_train
from routing.merging.services import merge_compute
from routing.models import LearnedRouter, MergedAdapter, MixtureVersion, Scoreboard
from routing.router import RoutingDecision
from routing.router.decision import route_embedded
from routing.router.learned import route_learned_embedded
from routing.scoreboard.figures import BASE, Candidate, TaskSlice, split_figures
from routing.scoreboard.methods import (
    MERGED_KEY,
    SplitRouting,
    deployment_composition,
    method_scores,
)

logger = logging.getLogger(__name__)

Status = Scoreboard.Status
ROUTERS = ("embedding", "learned")
COMPOSITE = "composite"  # the composite suite's hidden split, on the board as its own split


# --- Queueing -------------------------------------------------------------------------------


def scoreboard_request(*, mixture: MixtureVersion) -> Scoreboard | None:
    """A queued board for a just-published mixture; the job is sent after commit. Caller
    holds the publishing transaction. Off with TESSERA_SCOREBOARD_ON_PUBLISH=false."""
    if not settings.TESSERA_SCOREBOARD_ON_PUBLISH:
        return None
    board = Scoreboard.objects.create(mixture=mixture)
    board_id = board.pk
    transaction.on_commit(lambda: scoreboard_enqueue(board_id=board_id))
    return board


def scoreboard_enqueue(*, board_id: int) -> None:
    """Send ``routing.score_mixture`` to the evaluation queue (it may need the sandbox and
    the base model). A broker that is down is logged: the mixture is published regardless,
    and ``manage.py score_mixture`` computes the board by hand."""
    job_enqueue(task="routing.score_mixture", pk=board_id, label="scoreboard")


# --- Computing ------------------------------------------------------------------------------


def scoreboard_compute(*, board_id: int) -> str:
    """Everything ``routing.score_mixture`` does; returns what happened in one word:
    gone | finished | superseded | busy | done | failed.

    In two steps, so that the board is public within seconds of the members' admission:
    first what stands on the outcomes admission stored (the hidden and paraphrase splits,
    under the embedding router and the learned router if it is trained already), settled
    with ``methods_pending``; then what needs a sandboxed child and takes minutes (the
    learned router's training, the composite split's outcomes, the mixing methods), written
    over the same row."""
    board = Scoreboard.objects.select_related("mixture").filter(pk=board_id).first()
    if board is None:
        return "gone"
    # Coalesced: a burst of publications scores only the newest mixture version.
    stopped = job_start(row=board, coalesced=True)
    if stopped is not None:
        return stopped
    try:
        first = board_inputs(mixture=board.mixture, stored_only=True)
    except Exception as exc:
        logger.exception("scoreboard of %s failed", board.mixture)
        job_settle(
            row=board,
            status=Status.FAILED,
            finished_at=timezone.now(),
            failure_reason=job_failure_reason(exc),
        )
        return "failed"
    settled = job_settle(
        row=board,
        status=Status.DONE,
        finished_at=timezone.now(),
        figures=first.figures(methods={}, methods_pending=True),
    )
    if not settled:  # taken over meanwhile: the other worker measures the rest
        return "done"
    try:
        inputs = board_inputs(mixture=board.mixture)
    except RunFailure as failure:  # the composite split could not be measured
        logger.error("the composite split of %s could not be measured: %s", board.mixture, failure)
        inputs, methods, methods_failed = first, {}, failure.code
    except Exception:
        logger.exception("the second step of the board of %s failed", board.mixture)
        inputs, methods, methods_failed = first, {}, "methods_error"
    else:
        methods, methods_failed = measure_methods(inputs)
    figures = inputs.figures(methods=methods, methods_failed=methods_failed)
    # Only over this job's own first step: a board recomputed meanwhile is left alone.
    Scoreboard.objects.filter(pk=board.pk, figures__methods_pending=True).update(
        figures=figures, finished_at=timezone.now()
    )
    return "done"


def scoreboard_compute_now(*, mixture: MixtureVersion) -> Scoreboard:
    """Score ``mixture`` in this process (the management command), whatever its board's
    state: a fresh board replaces an old one."""
    Scoreboard.objects.filter(mixture=mixture).delete()
    board = Scoreboard.objects.create(mixture=mixture)
    scoreboard_compute(board_id=board.pk)
    board.refresh_from_db()
    return board


def members_of(mixture: MixtureVersion) -> list[AdapterVersion]:
    return list(
        AdapterVersion.objects.filter(pk__in=mixture.entries.values("version_id"))
        .select_related("adapter__owner__contributor", "routing_signature")
        .order_by("pk")
    )


@dataclasses.dataclass
class BoardInputs:
    """What a board is computed from: the members' and the base model's outcomes on every
    split, each router's picks, and the merged adapter; ``figures`` joins them with the
    mixing methods' scores (none yet, in the board's first step)."""

    mixture: MixtureVersion
    base_model: Any
    members: list[AdapterVersion]
    catalog: Catalog
    candidates: list[Candidate]
    routing: dict[str, SplitRouting]
    merged: ExtraAdapter | None
    unmeasured: dict[int, str]
    started: float

    def figures(
        self,
        *,
        methods: dict[str, Any],
        methods_failed: str | None = None,
        methods_pending: bool = False,
    ) -> dict[str, Any]:
        served = list(self.catalog.adapters)
        by_name = {
            name: split_figures(
                candidates=self.candidates,
                scores=split.scores,
                picks={
                    router: [_version_of(decision) for decision in decisions]
                    for router, decisions in split.decisions.items()
                },
                tasks=_task_slices(split.parts),
                methods=methods.get(name),
            )
            for name, split in self.routing.items()
        }
        mixture = self.mixture
        return {
            "mixture": mixture.number,
            "router": mixture.router,
            "routers": list(ROUTERS),
            "learned": _learned_summary(mixture) if self.catalog.learned is not None else None,
            "merged": self.merged is not None,
            # True between the board's two steps: the hidden and paraphrase splits' routers
            # are in; the learned router, the composite split and the mixing methods follow.
            "methods_pending": methods_pending,
            "methods_failed": methods_failed,
            "composition": deployment_composition(),
            "threshold": (mixture.router_settings or {}).get("threshold"),
            "members": [
                {
                    "model_id": a.model_id,
                    "version": a.version_number,
                    "title": a.title,
                    "contributor": a.contributor_name,
                    "license": a.license,
                    "task_tags": list(a.task_tags),
                }
                for a in served
            ],
            "splits": by_name,
            "unmeasured": {
                next(a.model_id for a in served if a.version_id == pk): reason
                for pk, reason in self.unmeasured.items()
            },
            "computed_at": timezone.now().isoformat(),
            "seconds": round(time.monotonic() - self.started, 1),
        }


def board_inputs(*, mixture: MixtureVersion, stored_only: bool = False) -> BoardInputs:
    """Everything but the mixing methods (see the module docstring). ``stored_only``: the
    board's first step, from the outcomes admission stored, without the composite split
    and with the learned router only if it is trained already (neither starts a child,
    unless a member's union outcomes are missing)."""
    started = time.monotonic()
    base_model = base_model_active()
    members = [
        v for v in members_of(mixture) if v.adapter.visibility != v.adapter.Visibility.PRIVATE
    ]
    splits = union_splits()
    composite = [] if stored_only else composite_splits()
    unmeasured = outcomes_measure(
        base_model=base_model, versions=members, splits=[*splits, *composite]
    )
    learned = learned_router_load(mixture_id=mixture.pk) if stored_only else _learned_model(mixture)
    catalog = dataclasses.replace(public_catalog(mixture, members), learned=learned)
    candidates = [Candidate(None, BASE)] + [
        Candidate(a.version_id, a.model_id, a.version_number) for a in catalog.adapters
    ]
    grouped = {name: [s for s in splits if s.split == name] for name in UNION_SPLITS}
    if not stored_only:
        grouped[COMPOSITE] = composite
    routing = {
        name: _split_routing(base_model.pk, catalog, candidates, parts)
        for name, parts in grouped.items()
        if parts
    }
    return BoardInputs(
        mixture=mixture,
        base_model=base_model,
        members=members,
        catalog=catalog,
        candidates=candidates,
        routing=routing,
        merged=_merged_adapter(mixture),
        unmeasured=unmeasured,
        started=started,
    )


def measure_methods(inputs: BoardInputs) -> tuple[dict[str, Any], str | None]:
    """The mixing methods' scores per split, and the failure code when they could not be
    measured (the routers' figures stand on stored outcomes; only the methods are lost)."""
    try:
        methods = method_scores(
            base_model=inputs.base_model,
            members=inputs.members,
            catalog=inputs.catalog,
            splits=inputs.routing,
            merged=inputs.merged,
        )
    except RunFailure as failure:
        logger.error("the compositions of %s could not be measured: %s", inputs.mixture, failure)
        return {}, failure.code  # a code only: the board is public
    except Exception:
        logger.exception("the compositions of %s could not be measured", inputs.mixture)
        return {}, "methods_error"
    return methods, None


def mixture_figures(*, mixture: MixtureVersion) -> dict[str, Any]:
    """The board's whole figures for ``mixture``, in one go."""
    inputs = board_inputs(mixture=mixture)
    methods, methods_failed = measure_methods(inputs)
    return inputs.figures(methods=methods, methods_failed=methods_failed)


def _split_routing(
    base_model_id: int, catalog: Catalog, candidates: list[Candidate], parts: list[UnionSplit]
) -> SplitRouting:
    example_ids = [pk for part in parts for pk in part.example_ids]
    table = outcomes_table(
        base_model_id=base_model_id,
        version_ids=[c.version_id for c in candidates if c.version_id is not None],
        example_ids=example_ids,
    )
    # An outcome still missing (its version could not be measured) counts as unsolved.
    scores = {
        c.version_id: [table[c.version_id].get(pk, 0.0) for pk in example_ids] for c in candidates
    }
    return SplitRouting(parts=parts, scores=scores, decisions=router_decisions(catalog, parts))


def _task_slices(parts: list[UnionSplit]) -> list[TaskSlice]:
    tasks, cursor = [], 0
    for part in parts:
        positions = list(range(cursor, cursor + len(part.example_ids)))
        cursor += len(part.example_ids)
        suite = part.task.suite_version.suite.slug
        tasks.append(TaskSlice(part.task.slug, suite, part.task.title, positions))
    return tasks


def _version_of(decision: RoutingDecision) -> int | None:
    return decision.adapter.version_id if decision.adapter is not None else None


def router_decisions(catalog: Catalog, parts: list[UnionSplit]) -> dict[str, list[RoutingDecision]]:
    """Each router's decision for each example's prompt, exactly as the inference server
    would decide it in this catalog: the embedding router, and the learned router when the
    mixture has a trained one."""
    n = sum(len(part.example_ids) for part in parts)
    if not catalog.adapters:
        empty = RoutingDecision(
            router="embedding", adapter=None, scores=(), threshold=None, reason="no_candidates"
        )
        return {"embedding": [empty] * n}
    queries = union_queries(parts)
    decisions = {"embedding": [route_embedded(catalog=catalog, query=q) for q in queries]}
    if catalog.learned is not None:
        decisions["learned"] = [route_learned_embedded(catalog=catalog, query=q) for q in queries]
    return decisions


def _learned_model(mixture: MixtureVersion):
    """The mixture's trained learned router, training it here first when its job is still
    queued (the board would otherwise miss it); None when there is none to be had."""
    row = LearnedRouter.objects.filter(mixture=mixture).first()
    if row is not None and row.status == LearnedRouter.Status.QUEUED:
        learned_router_train(router_id=row.pk)
    return learned_router_load(mixture_id=mixture.pk)


def _learned_summary(mixture: MixtureVersion) -> dict[str, Any] | None:
    row = LearnedRouter.objects.filter(mixture=mixture, status=LearnedRouter.Status.DONE).first()
    if row is None:
        return None
    return {"kind": row.kind, "params": row.params, "cv_accuracy": row.cv_accuracy}


def _merged_adapter(mixture: MixtureVersion) -> ExtraAdapter | None:
    """The mixture's merged adapter for measuring, building it here first when its job is
    still queued; None when there is none (no build asked for, or it failed)."""
    merged = MergedAdapter.objects.filter(mixture=mixture).first()
    if merged is not None and merged.status == MergedAdapter.Status.QUEUED:
        merge_compute(merged_id=merged.pk)
        merged.refresh_from_db()
    if merged is None or merged.status != MergedAdapter.Status.DONE or not merged.weights_file:
        return None
    with merged.weights_file.open("rb") as handle:
        weights = handle.read()
    return ExtraAdapter(key=MERGED_KEY, weights=weights, lora_config=dict(merged.adapter_config))


# Example rows never change once their suite version is used (versions are locked), so an
# example's prompt embedding is kept for the life of the worker process; keyed by the text
# too, so a reused primary key (a test database, a restored dump) never gets a stale one.
_embedded: dict[tuple[int, str], Any] = {}


def union_queries(parts: list[UnionSplit]) -> list[Any]:
    """Each example's prompt embedding (unit vectors), in the parts' order."""
    from evaluation.worker.signatures import embed

    keys = [
        (pk, prompt)
        for part in parts
        for pk, prompt in zip(part.example_ids, part.prompts(), strict=True)
    ]
    missing = list(dict.fromkeys(key for key in keys if key not in _embedded))
    if missing:
        vectors = embed([prompt for _pk, prompt in missing])
        _embedded.update(zip(missing, vectors, strict=True))
    return [_embedded[key] for key in keys]


def public_catalog(mixture: MixtureVersion | None, versions: list[AdapterVersion]) -> Catalog:
    """A catalog of ``versions`` (public ones only) as the serving process would build it."""
    from routing.serving.sync import served_adapter

    served = sorted(
        (
            served_adapter(version)
            for version in versions
            if version.adapter.visibility != version.adapter.Visibility.PRIVATE
        ),
        key=lambda adapter: adapter.version_id,
    )
    return Catalog(
        mixture_number=mixture.number if mixture else 0,
        router=mixture.router if mixture else settings.TESSERA_ROUTER,
        router_settings=dict(mixture.router_settings or {})
        if mixture
        else {"threshold": settings.TESSERA_ROUTER_THRESHOLD},
        adapters=tuple(served),
    )
