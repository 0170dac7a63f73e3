"""The scoreboard: the composed system of a mixture version scored on the union of the
built-in suites' hidden and paraphrase splits, from stored per-example outcomes and the
embedding router's real decisions (all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from evaluation.models import Example, Outcome, Task
from routing.models import MixtureVersion, Scoreboard
from routing.scoreboard.figures import BASE, Candidate, TaskSlice, split_figures
from routing.scoreboard.services import (
    scoreboard_compute,
    scoreboard_compute_now,
)
from routing.services import mixture_publish
from tests.routing.conftest import DATES_PROMPTS, SECRET, UNITS_PROMPTS, admitted_version

# --- The arithmetic ------------------------------------------------------------------------


def test_the_figures_join_routing_decisions_with_outcomes():
    a, b = Candidate(1, "ann/units", 1), Candidate(2, "bob/dates", 3)
    # Examples 0-1 are units (a solves them), 2-3 dates (b solves 2 only), 4 nobody solves.
    scores = {None: [0, 0, 0, 1, 0], 1: [1, 1, 0, 0, 0], 2: [0, 0, 1, 0, 0]}
    picks = {"embedding": [1, 2, 2, None, 1]}
    tasks = [TaskSlice("units", "s", "Units", [0, 1]), TaskSlice("dates", "s", "Dates", [2, 3, 4])]
    figures = split_figures(
        candidates=[Candidate(None, BASE), a, b], scores=scores, picks=picks, tasks=tasks
    )
    assert figures["n"] == 5
    assert figures["base"] == pytest.approx(0.2)
    assert [(x["model_id"], x["score"]) for x in figures["adapters"]] == [
        ("ann/units", 0.4),
        ("bob/dates", 0.2),
    ]
    assert figures["best_single"] == {"model_id": "ann/units", "version": 1, "score": 0.4}
    assert figures["oracle"] == pytest.approx(0.8)  # example 4: nobody
    assert figures["unsolved"] == 1
    routed = figures["routers"]["embedding"]
    assert routed["score"] == pytest.approx(0.6)  # 1 + 0 + 1 + 1 + 0
    assert routed["routed_over_oracle"] == pytest.approx(0.75)
    assert routed["routed_minus_best_single"] == pytest.approx(0.2)
    assert routed["routed_minus_base"] == pytest.approx(0.4)
    # Among the 4 solvable examples the router's pick was as good as the best on 3.
    assert (routed["accuracy"], routed["accuracy_n"]) == (pytest.approx(0.75), 4)
    assert routed["picks"] == {"ann/units": 2, "bob/dates": 2, "base": 1}
    units, dates = figures["tasks"]
    assert (units["task"], units["oracle"], units["routers"]["embedding"]["score"]) == (
        "units",
        1.0,
        0.5,
    )
    assert dates["routers"]["embedding"]["picks"] == {"bob/dates": 1, "base": 1, "ann/units": 1}


def test_a_method_that_solves_what_no_single_model_solves_is_counted_as_emergent():
    a, b = Candidate(1, "ann/units", 1), Candidate(2, "bob/dates", 3)
    # Composite examples scored by parts: every single model gets half of examples 0-1.
    scores = {None: [0, 0, 0], 1: [0.5, 0.5, 1], 2: [0.5, 0, 0]}
    methods = {"embedding/topk": [1.0, 0.5, 1.0], "merged": [0.0, 1.0, 0.0]}
    figures = split_figures(
        candidates=[Candidate(None, BASE), a, b],
        scores=scores,
        picks={"embedding": [1, 1, 1]},
        tasks=[TaskSlice("t", "s", "T", [0, 1, 2])],
        methods=methods,
    )
    assert figures["single_solved"] == pytest.approx(1 / 3)  # only example 2, by ann
    topk = figures["methods"]["embedding/topk"]
    assert topk["score"] == pytest.approx(2.5 / 3)
    assert topk["solved"] == pytest.approx(2 / 3)
    assert topk["emergent"] == pytest.approx(1 / 3)  # example 0: solved by the mix alone
    assert topk["minus_best_single"] == pytest.approx(2.5 / 3 - 2 / 3)
    assert topk["over_oracle"] == pytest.approx((2.5 / 3) / (2 / 3))
    assert figures["methods"]["merged"]["emergent"] == pytest.approx(1 / 3)
    assert figures["tasks"][0]["methods"]["embedding/topk"]["solved"] == topk["solved"]


@pytest.mark.parametrize(("threshold", "mixed"), [(-1.0, True), (0.99, False)])
def test_only_compositions_that_mix_adapters_are_measured(
    mixture, base_model, settings, threshold, mixed
):
    """A composition the router sends to the base model, or to one adapter, is that model's
    stored outcome; only real mixes reach the measuring child."""
    import dataclasses

    from evaluation.services.outcomes import union_splits
    from routing.scoreboard.methods import method_scores
    from routing.scoreboard.services import _split_routing, members_of, public_catalog

    settings.TESSERA_COMPOSITION_K = 2
    members = members_of(mixture)
    catalog = public_catalog(mixture, members)
    # Under a threshold of -1 both adapters are candidates for every prompt; under 0.99
    # neither is, and the base model answers everything.
    catalog = dataclasses.replace(catalog, router_settings={"threshold": threshold})
    candidates = [Candidate(None, BASE)] + [
        Candidate(a.version_id, a.model_id, a.version_number) for a in catalog.adapters
    ]
    hidden = [s for s in union_splits() if s.split == "hidden"]
    routing = _split_routing(base_model.pk, catalog, candidates, hidden)
    measured_parts: list = []

    def measure(*, base_model, versions, parts, extra):
        measured_parts.extend(parts)
        return {part.key: [0.25] * len(part.split.example_ids) for part in parts}

    results = method_scores(
        base_model=base_model,
        members=members,
        catalog=catalog,
        splits={"hidden": routing},
        measure=measure,
    )["hidden"]
    assert set(results) == {"embedding/topk", "embedding/arrow", "embedding/logit"}
    n = len(routing.scores[None])
    for values in results.values():
        if mixed:
            assert values == [0.25] * n  # every example went to the child
        else:
            assert values == list(routing.scores[None])  # the base model's stored outcomes
    assert bool(measured_parts) is mixed


def test_a_mixture_with_no_adapters_scores_as_the_base_model():
    figures = split_figures(
        candidates=[Candidate(None, BASE)],
        scores={None: [1, 0]},
        picks={"embedding": [None, None]},
        tasks=[],
    )
    assert figures["best_single"] is None
    assert figures["routers"]["embedding"]["score"] == figures["oracle"] == 0.5
    assert figures["routers"]["embedding"]["routed_minus_best_single"] is None


# --- On the database, with the real router ----------------------------------------------------


def _outcomes(base_model, version, task_scores: dict[Task, float]) -> None:
    for task, score in task_scores.items():
        for example in Example.objects.filter(task=task):
            Outcome.objects.create(
                base_model=base_model, version=version, example=example, score=score
            )


@pytest.fixture
def mixture(union, base_model, contributor, other_contributor):
    units_task, dates_task = union
    units = admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=1)
    dates = admitted_version(other_contributor, slug="dates", prompts=DATES_PROMPTS, seed=2)
    _outcomes(base_model, None, {units_task: 0.0, dates_task: 0.0})
    _outcomes(base_model, units, {units_task: 1.0, dates_task: 0.0})
    _outcomes(base_model, dates, {units_task: 0.0, dates_task: 1.0})
    return MixtureVersion.objects.get(is_active=True)


def test_the_routed_mixture_beats_every_single_adapter_and_the_base_model(mixture):
    board = scoreboard_compute_now(mixture=mixture)
    assert board.status == Scoreboard.Status.DONE, board.failure_reason
    figures = board.figures
    assert set(figures["splits"]) == {"hidden", "paraphrase"}
    assert [m["model_id"] for m in figures["members"]] == ["owner/units", "other/dates"]
    hidden = figures["splits"]["hidden"]
    assert hidden["n"] == 6
    assert hidden["base"] == 0.0
    assert hidden["oracle"] == 1.0
    assert hidden["best_single"]["score"] == pytest.approx(4 / 6)  # units covers 4 of 6
    routed = hidden["routers"]["embedding"]
    # The router sends each skill's prompts to the adapter that solves them.
    assert routed["score"] == 1.0 and routed["accuracy"] == 1.0
    assert routed["routed_minus_best_single"] == pytest.approx(2 / 6)
    by_task = {t["task"]: t["routers"]["embedding"]["picks"] for t in hidden["tasks"]}
    assert by_task == {"units": {"owner/units": 4}, "dates": {"other/dates": 2}}
    assert figures["splits"]["paraphrase"]["n"] == 4


def test_no_hidden_or_paraphrase_example_appears_in_the_public_api(mixture):
    scoreboard_compute_now(mixture=mixture)
    client = APIClient()
    for url in (
        reverse("routing-api:scoreboard-latest"),
        reverse("routing-api:scoreboard", args=[mixture.number]),
        reverse("routing-api:scoreboard-history"),
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        assert SECRET not in response.content.decode()
        assert "km" not in response.content.decode()
    latest = client.get(reverse("routing-api:scoreboard-latest")).json()
    assert latest["mixture"] == mixture.number and latest["status"] == "done"
    history = client.get(reverse("routing-api:scoreboard-history")).json()
    assert {(p["mixture"], p["split"], p["routed"]) for p in history} == {
        (mixture.number, "hidden", 1.0),
        (mixture.number, "paraphrase", 1.0),
    }


def test_before_any_scoreboard_the_api_answers_404_with_a_code(db):
    client = APIClient()
    response = client.get(reverse("routing-api:scoreboard-latest"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "scoreboard_not_ready"
    for number in (99, 10**30):  # the second would overflow the database's integer
        response = client.get(reverse("routing-api:scoreboard", args=[number]))
        assert (response.status_code, response.json()["error"]["code"]) == (
            404,
            "scoreboard_not_found",
        )


def test_a_private_adapter_is_left_out_of_the_public_scoreboard(union, base_model, contributor):
    units_task, dates_task = union
    _outcomes(base_model, None, {units_task: 0.0, dates_task: 0.0})
    private = admitted_version(
        contributor, slug="units", prompts=UNITS_PROMPTS, private=True, seed=3
    )
    _outcomes(base_model, private, {units_task: 1.0})
    board = scoreboard_compute_now(mixture=MixtureVersion.objects.get(is_active=True))
    assert board.figures["members"] == []
    assert board.figures["splits"]["hidden"]["routers"]["embedding"]["picks"] == {"base": 6}


# --- Queueing and coalescing -----------------------------------------------------------------


def test_publishing_a_mixture_queues_its_scoreboard_after_commit(
    db, base_model, settings, sent_tasks, django_capture_on_commit_callbacks
):
    settings.TESSERA_SCOREBOARD_ON_PUBLISH = True
    with django_capture_on_commit_callbacks(execute=True):
        mixture = mixture_publish(reason="test")
    board = Scoreboard.objects.get(mixture=mixture)
    assert board.status == Scoreboard.Status.QUEUED
    assert sent_tasks == {"routing.score_mixture": [([board.pk], "eval-cpu")]}


def test_a_queued_board_of_an_older_mixture_is_superseded_by_a_newer_one(
    union, base_model, settings
):
    _outcomes(base_model, None, dict.fromkeys(union, 0.0))
    first = mixture_publish(reason="first")
    second = mixture_publish(reason="second")
    old = Scoreboard.objects.create(mixture=first)
    new = Scoreboard.objects.create(mixture=second)
    assert scoreboard_compute(board_id=old.pk) == "superseded"
    assert scoreboard_compute(board_id=new.pk) == "done"
    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.status, new.status) == ("superseded", "done")
    assert old.figures == {}
    assert scoreboard_compute(board_id=new.pk) == "finished"  # a redelivery does nothing
    assert scoreboard_compute(board_id=10**6) == "gone"


def test_the_routers_figures_are_public_before_the_mixing_methods_are_measured(
    mixture, monkeypatch
):
    from routing.scoreboard import services

    board = Scoreboard.objects.create(mixture=mixture)
    seen = {}

    def measure(inputs):
        # Between the two steps: the board is done and public, its methods pending.
        body = APIClient().get(reverse("routing-api:scoreboard-latest")).json()
        seen.update(status=body["status"], pending=body["figures"]["methods_pending"])
        n = len(inputs.routing["hidden"].scores[None])
        return {"hidden": {"embedding/topk": [1.0] * n}}, None

    monkeypatch.setattr(services, "measure_methods", measure)
    assert scoreboard_compute(board_id=board.pk) == "done"
    assert seen == {"status": "done", "pending": True}
    board.refresh_from_db()
    assert board.status == Scoreboard.Status.DONE
    assert board.figures["methods_pending"] is False
    assert board.figures["splits"]["hidden"]["methods"]["embedding/topk"]["score"] == 1.0
    assert board.figures["splits"]["hidden"]["routers"]["embedding"]["score"] == 1.0


def test_a_failure_while_measuring_the_methods_keeps_the_routers_figures(mixture, monkeypatch):
    def explode(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("routing.scoreboard.services.method_scores", explode)
    board = scoreboard_compute_now(mixture=mixture)
    assert board.status == Scoreboard.Status.DONE
    assert board.figures["methods_failed"] == "methods_error"
    assert board.figures["methods_pending"] is False
    assert board.figures["splits"]["hidden"]["routers"]["embedding"]["score"] == 1.0
    assert "out of memory" not in json.dumps(board.figures)  # the board is public


def test_the_command_prints_the_scoreboard_table(mixture, capsys):
    from django.core.management import call_command

    call_command("score_mixture")
    out = capsys.readouterr().out
    assert "| routed (embedding) | **1.000** |" in out
    assert "| oracle routing | 1.000 |" in out
    call_command("score_mixture", "--json")
    figures = json.loads(capsys.readouterr().out)
    assert figures["splits"]["hidden"]["routers"]["embedding"]["accuracy"] == 1.0


def test_a_board_left_running_by_a_lost_worker_is_taken_over_by_the_redelivered_job(
    mixture, settings
):
    from datetime import timedelta

    from django.utils import timezone

    board = Scoreboard.objects.create(mixture=mixture)
    started = timezone.now() - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 1)
    Scoreboard.objects.filter(pk=board.pk).update(status="running", started_at=started)
    assert scoreboard_compute(board_id=board.pk) == "done"
    board.refresh_from_db()
    assert board.status == "done" and board.figures["splits"]["hidden"]["oracle"] == 1.0


def test_a_board_another_worker_is_computing_is_left_to_it(mixture):
    from django.utils import timezone

    board = Scoreboard.objects.create(mixture=mixture)
    Scoreboard.objects.filter(pk=board.pk).update(status="running", started_at=timezone.now())
    assert scoreboard_compute(board_id=board.pk) == "finished"
    board.refresh_from_db()
    assert board.status == "running" and board.figures == {}
