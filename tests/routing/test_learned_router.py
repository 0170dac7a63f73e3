"""The router registry and the learned router: registering a router, fitting on synthetic
embeddings and outcomes whose right answer is known, storing it without pickle, training it
from the database's public outcomes only, the Celery job, and the serving catalog."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluation.models import Example, Outcome
from evaluation.worker.signatures import DIMENSIONS
from multilora import Engine
from routing.catalog import MIXTURE_MODEL_ID, Catalog
from routing.learned.fit import TrainingSet, fit_best
from routing.learned.services import (
    learned_router_load,
    learned_router_train,
    learned_router_train_now,
    training_set,
)
from routing.models import LearnedRouter, MixtureVersion
from routing.router import (
    ROUTERS,
    LearnedRouterModel,
    RoutingDecision,
    RoutingPolicy,
    register,
    route,
    route_learned_embedded,
    unregister,
)
from routing.services import mixture_publish
from routing.serving.sync import MixtureSync
from tests.routing.conftest import DATES_PROMPTS, UNITS_PROMPTS, admitted_version
from tests.routing.test_router import (
    DATE_PROMPTS,
    UNIT_PROMPTS,
    UNIT_REQUEST,
    catalog_of,
    served,
    signature_of,
)
from tests.support.tiny_model import tiny_llama_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# --- The registry ------------------------------------------------------------------------------


def test_one_registration_adds_a_router_that_route_can_use():
    def last_adapter(request) -> RoutingDecision:
        chosen = request.candidates[-1]
        return RoutingDecision(
            router="last",
            adapter=chosen,
            scores=(),
            threshold=None,
            reason="above_threshold",
            ranked=((chosen, 1.0),),
        )

    catalog = catalog_of(served("alice/units"), served("bob/dates"))
    assert "last" not in ROUTERS
    register("last", last_adapter)
    try:
        assert "last" in ROUTERS
        decision = route(
            catalog=catalog,
            model=MIXTURE_MODEL_ID,
            text="anything",
            user_id=None,
            policy=RoutingPolicy(),
            router="last",
        )
        assert decision.adapter.model_id == "bob/dates"
        with pytest.raises(ValueError, match="registered already"):
            register("last", last_adapter)
    finally:
        unregister("last")
    assert "last" not in ROUTERS


def test_the_routers_settings_accept_are_exactly_the_registered_ones():
    source = (ROOT / "tessera" / "settings.py").read_text()
    literal = re.search(r"if TESSERA_ROUTER not in \{([^}]*)\}", source)
    assert literal is not None
    accepted = {name.strip().strip("\"'") for name in literal.group(1).split(",")}
    assert ROUTERS == accepted == {"best", "embedding", "arrow", "explicit", "learned"}


# --- The learned router on synthetic embeddings --------------------------------------------------

RNG = np.random.default_rng(7)
CENTRES = RNG.standard_normal((3, DIMENSIONS)).astype(np.float32)
CENTRES /= np.linalg.norm(CENTRES, axis=1, keepdims=True)
STRONG, WEAK, DATES = 101, 102, 103  # version ids: two claim skill 0, one skill 1


def near(centre: int, count: int, rng: np.random.Generator, spread: float = 0.04) -> np.ndarray:
    vectors = CENTRES[centre] + spread * rng.standard_normal((count, DIMENSIONS))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def synthetic() -> TrainingSet:
    """Skill 0: STRONG solves every example, WEAK a third; skill 1: DATES solves all; skill 2:
    no adapter helps, the base solves half. Every candidate's example prompts sit on its
    claimed skill (WEAK claims skill 0 like STRONG)."""
    rng = np.random.default_rng(0)
    per = 30
    points = [near(0, per, rng), near(1, per, rng), near(2, per, rng)]
    # columns: base, STRONG, WEAK, DATES
    skill0 = np.tile([0, 1, 0, 0], (per, 1)).astype(np.float32)
    skill0[::3, 2] = 1
    skill1 = np.tile([0, 0, 0, 1], (per, 1)).astype(np.float32)
    skill2 = np.zeros((per, 4), dtype=np.float32)
    skill2[::2, 0] = 1
    correct = np.concatenate([skill0, skill1, skill2])
    prompts = [near(0, 5, rng), near(0, 5, rng), near(1, 5, rng)]
    return TrainingSet(
        points=np.concatenate([*points, *prompts]),
        correct=correct,
        known=np.ones_like(correct, dtype=bool),
        owner=np.repeat([1, 2, 3], 5),
        version_ids=[STRONG, WEAK, DATES],
        example_ids=list(range(1, 3 * per + 1)),
        mixture_number=1,
    )


def learned_catalog(model: LearnedRouterModel | None) -> Catalog:
    return Catalog(
        mixture_number=1,
        router="learned",
        router_settings={"threshold": 0.35},
        adapters=(
            served("ann/units", version_id=STRONG, signature=CENTRES[0]),
            served("bob/units-lite", version_id=WEAK, signature=CENTRES[0]),
            served("cy/dates", version_id=DATES, signature=CENTRES[1]),
        ),
        learned=model,
    )


@pytest.fixture(scope="module", params=["knn", "linear"])
def fitted(request):
    return fit_best(synthetic(), kinds=(request.param,))


def test_it_picks_the_candidate_that_is_correct_on_nearby_prompts(fitted):
    catalog = learned_catalog(fitted.model)
    rng = np.random.default_rng(99)
    for query in near(1, 10, rng):
        decision = route_learned_embedded(catalog=catalog, query=query)
        assert (decision.router, decision.reason) == ("learned", "above_threshold")
        assert decision.adapter.model_id == "cy/dates"
        assert decision.scores[0].model_id == "cy/dates"
        assert decision.ranked[0][0] is decision.adapter
        assert decision.ranked[0][1] > decision.threshold  # beats the base's prediction
        assert len(decision.ranked) == 3


def test_a_weaker_adapter_claiming_the_same_skill_gets_none_of_its_traffic(fitted):
    catalog = learned_catalog(fitted.model)
    picks = [
        route_learned_embedded(catalog=catalog, query=q).adapter.model_id
        for q in near(0, 20, np.random.default_rng(5))
    ]
    assert picks == ["ann/units"] * 20


def test_prompts_no_adapter_helps_go_to_the_base_model(fitted):
    catalog = learned_catalog(fitted.model)
    for query in near(2, 10, np.random.default_rng(6)):
        decision = route_learned_embedded(catalog=catalog, query=query)
        assert (decision.adapter, decision.reason) == (None, "below_threshold")
        assert decision.ranked  # still ranked, for a composition that wants them


# --- The best router: whichever the board scored best -------------------------------------------


@pytest.mark.parametrize(
    ("best_router", "trained", "decides"),
    [
        (None, True, "embedding"),  # not scored yet
        ("embedding", True, "embedding"),
        ("learned", True, "learned"),
        ("learned", False, "embedding"),  # the board's choice is not loaded: no stand-in
    ],
)
def test_the_best_router_hands_each_request_to_the_router_the_board_chose(
    fitted, best_router, trained, decides
):
    catalog = dataclasses.replace(
        learned_catalog(fitted.model if trained else None),
        router="best",
        best_router=best_router,
    )
    kwargs = {"model": MIXTURE_MODEL_ID, "text": UNIT_REQUEST, "user_id": None}
    decision = route(catalog=catalog, policy=RoutingPolicy(), **kwargs)
    direct = route(catalog=catalog, policy=RoutingPolicy(), router=decides, **kwargs)
    # The decision names the router that made it, never "best".
    assert decision.router == decides
    assert (decision.adapter, decision.reason, decision.threshold) == (
        direct.adapter,
        direct.reason,
        direct.threshold,
    )
    assert decision.reason != "no_learned_router"


def test_the_best_router_is_the_one_with_the_best_score_on_the_hidden_union():
    from routing.scoreboard.selectors import best_router

    def board(**scores):
        routers = {r: {"score": v} for r, v in scores.items() if "_" not in r}
        methods = {r.replace("_", "/"): {"score": v} for r, v in scores.items() if "_" in r}
        return {"splits": {"hidden": {"routers": routers, "methods": methods}}}

    assert best_router({}) is None
    assert best_router(board(embedding=0.8, learned=0.85)) == "learned"
    # A router's best method counts: embedding/topk beats learned's top-1.
    assert best_router(board(embedding=0.8, learned=0.85, embedding_topk=0.9)) == "embedding"
    # The merged adapter is no router's.
    assert (
        best_router(
            {
                "splits": {
                    "hidden": {
                        "routers": {"embedding": {"score": 0.8}, "learned": {"score": 0.7}},
                        "methods": {"merged": {"score": 0.99}},
                    }
                }
            }
        )
        == "embedding"
    )
    # On a tie, the router that needs no training.
    assert best_router(board(embedding=0.85, learned=0.85)) == "embedding"
    assert best_router(board(learned=0.85, embedding=0.85)) == "embedding"


def unhelped() -> TrainingSet:
    """Skill 0: STRONG solves every example; skill 2: nobody solves any of its five public
    examples, the base model included; STRONG's example prompts sit half-way between the two
    skills, as a units adapter's number-laden prompts sit near number-word prompts."""
    rng = np.random.default_rng(1)
    middle = 2 * CENTRES[0] + CENTRES[2]
    middle = middle / np.linalg.norm(middle)
    prompts = middle + 0.04 * rng.standard_normal((10, DIMENSIONS))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    correct = np.concatenate(
        [np.tile([0, 1], (30, 1)), np.zeros((5, 2))]  # columns: base, STRONG
    ).astype(np.float32)
    return TrainingSet(
        points=np.concatenate([near(0, 30, rng), near(2, 5, rng), prompts]).astype(np.float32),
        correct=correct,
        known=np.ones_like(correct, dtype=bool),
        owner=np.ones(10, dtype=np.int64),
        version_ids=[STRONG],
        example_ids=list(range(1, 36)),
        mixture_number=1,
    )


def test_a_prompt_no_adapter_helps_goes_to_the_base_model_even_near_an_adapters_prompts():
    fitted = fit_best(unhelped())
    # Both kinds solve every solvable held-out example; the unsolved ones break the tie: the
    # linear model hands them to the adapter, the nearest neighbours keep them on the base.
    assert fitted.kind == "knn" and fitted.cv["knn"]["base_kept"] == 1.0
    assert fitted.cv["linear"]["base_kept"] < 1.0
    assert fitted.model.margin > 0 and fitted.params["margin"] == fitted.model.margin
    assert [g["margin"] for g in fitted.margins] == [0.01, 0.05, 0.1, 0.2, 0.3]
    catalog = Catalog(
        mixture_number=1,
        router="learned",
        router_settings={},
        adapters=(served("ann/units", version_id=STRONG, signature=CENTRES[0]),),
        learned=fitted.model,
    )
    unhelped_picks = [
        route_learned_embedded(catalog=catalog, query=q).adapter
        for q in near(2, 10, np.random.default_rng(7))
    ]
    assert unhelped_picks.count(None) >= 9, unhelped_picks
    helped = [
        route_learned_embedded(catalog=catalog, query=q).adapter
        for q in near(0, 10, np.random.default_rng(8))
    ]
    assert [a.model_id for a in helped] == ["ann/units"] * 10


def test_the_margin_and_bandwidth_round_trip_and_an_old_file_without_them_routes_as_before(
    fitted,
):
    model = dataclasses.replace(fitted.model, margin=0.2, bandwidth=0.05)
    read = LearnedRouterModel.from_npz(model.to_npz())
    assert (read.margin, read.bandwidth) == (0.2, 0.05)
    buffer = io.BytesIO()
    with np.load(io.BytesIO(model.to_npz()), allow_pickle=False) as stored:
        arrays = {n: stored[n] for n in stored.files if n not in ("margin", "bandwidth")}
    np.savez(buffer, **arrays)
    old = LearnedRouterModel.from_npz(buffer.getvalue())
    assert (old.margin, old.bandwidth) == (0.0, 0.0)
    with pytest.raises(ValueError):
        dataclasses.replace(fitted.model, margin=1.5).check()
    with pytest.raises(ValueError):
        dataclasses.replace(fitted.model, bandwidth=float("nan")).check()


def test_the_kernel_weighs_each_neighbour_by_its_distance_to_the_request():
    """Two public examples: the near one (cosine 1) says column 1 solves it, the far one
    (cosine 0.6) says column 2 does. Inverse distance weighs them 20 : 2.2; a bandwidth of
    0.1 weighs them 1 : exp(-4), so the far one barely counts."""
    query = np.asarray([1.0, 0.0], dtype=np.float32)
    far = np.asarray([0.6, 0.8], dtype=np.float32)
    correct = np.asarray([[0, 1, 0], [0, 0, 1]], dtype=np.float32)

    def model(bandwidth: float) -> LearnedRouterModel:
        return LearnedRouterModel(
            kind="knn",
            version_ids=np.asarray([1, 2]),
            prior=np.zeros(3, dtype=np.float32),
            points=np.stack([query, far]),
            correct=correct,
            known=np.ones_like(correct),
            owner=np.zeros(0, dtype=np.int64),
            k=2,
            alpha=1.0,
            bandwidth=bandwidth,
        )

    def expected(w_near: float, w_far: float) -> np.ndarray:
        pull = (w_near + w_far) / 2
        total = w_near + w_far + pull
        return np.asarray([0.0, w_near / total, w_far / total])

    np.testing.assert_allclose(model(0.0).predict(query), expected(20.0, 1 / 0.45), rtol=1e-5)
    np.testing.assert_allclose(model(0.1).predict(query), expected(1.0, np.exp(-4)), rtol=1e-5)


def test_the_weaker_adapter_still_answers_when_the_stronger_one_is_filtered_out(fitted):
    catalog = learned_catalog(fitted.model)
    query = near(0, 1, np.random.default_rng(8))[0]
    allowed = [a for a in catalog.adapters if a.model_id != "ann/units"]
    decision = route_learned_embedded(catalog=catalog, query=query, allowed=allowed)
    # It solves a third of skill 0, the base none of it: better than the base.
    assert decision.adapter.model_id == "bob/units-lite"


def test_cross_validation_reports_each_kind_and_chooses_the_best():
    result = fit_best(synthetic())
    assert set(result.cv) == {"knn", "linear"}
    best = max(entry["accuracy"] for entry in result.cv.values())
    assert result.cv[result.kind]["accuracy"] == best
    # Every solvable synthetic example is solved by routing it right, and the ones nobody
    # solves (skill 2's other half) stay on the base model.
    assert best == pytest.approx(1.0)
    assert result.cv["knn"]["n"] == 75  # skill 0 and 1 (60) + the base's half of skill 2
    assert result.cv[result.kind]["base_kept"] == 1.0


def test_route_uses_the_learned_router_by_name(fitted, monkeypatch):
    query = near(1, 1, np.random.default_rng(3))
    monkeypatch.setattr("evaluation.worker.signatures.embed", lambda texts: query)
    decision = route(
        catalog=learned_catalog(fitted.model),
        model=MIXTURE_MODEL_ID,
        text="a date question",
        user_id=None,
        policy=RoutingPolicy(exclude_adapters=frozenset({"ann/units"})),
    )
    assert (decision.router, decision.adapter.model_id) == ("learned", "cy/dates")
    assert "ann/units" not in [a.model_id for a, _score in decision.ranked]


def test_without_a_trained_router_learned_answers_as_the_embedding_router():
    catalog = catalog_of(
        served("alice/units", signature=signature_of(tuple(UNIT_PROMPTS))),
        served("bob/dates", signature=signature_of(tuple(DATE_PROMPTS))),
        router="learned",
        threshold=0.35,
    )
    kwargs = dict(text=UNIT_REQUEST, user_id=None, policy=RoutingPolicy())
    learned = route(catalog=catalog, model=MIXTURE_MODEL_ID, **kwargs)
    embedding = route(catalog=catalog, model=MIXTURE_MODEL_ID, router="embedding", **kwargs)
    assert (learned.router, learned.reason) == ("learned", "no_learned_router")
    assert learned.adapter is embedding.adapter and learned.adapter.model_id == "alice/units"
    assert learned.scores == embedding.scores


def test_the_stored_router_round_trips_without_pickle(fitted):
    data = fitted.model.to_npz()
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:  # nothing pickled inside
        assert all(stored[name].dtype != object for name in stored.files)
    again = LearnedRouterModel.from_npz(data)
    queries = np.concatenate([near(i, 4, np.random.default_rng(i)) for i in range(3)])
    assert again.kind == fitted.model.kind
    np.testing.assert_allclose(again.predict(queries), fitted.model.predict(queries), rtol=1e-6)


def test_a_file_with_a_pickled_array_is_refused():
    buffer = io.BytesIO()
    np.savez(buffer, format_version=np.asarray(1), kind=np.asarray(["knn", None], dtype=object))
    with pytest.raises(ValueError):
        LearnedRouterModel.from_npz(buffer.getvalue())


# --- Trained from the database's outcomes ---------------------------------------------------------

PUBLIC = {
    "units": ["Convert 8 km to metres.", "Convert 15 km to metres.", "How many metres in 2 km?"],
    "dates": ["Rewrite 2012-05-17 as a date in words.", "Write 2001-09-19 out in words."],
}


def _public_examples(tasks) -> None:
    for task in tasks:
        for position, prompt in enumerate(PUBLIC[task.slug]):
            Example.objects.create(
                task=task,
                split=Example.Split.PUBLIC,
                position=position,
                fields={"question": prompt},
                target="answer",
            )


def _outcomes(base_model, version, scores: dict) -> None:
    for task, score in scores.items():
        for example in Example.objects.filter(task=task):
            Outcome.objects.create(
                base_model=base_model, version=version, example=example, score=score
            )


@pytest.fixture
def mixture(union, base_model, contributor, other_contributor):
    units_task, dates_task = union
    _public_examples(union)
    units = admitted_version(contributor, slug="units", prompts=UNITS_PROMPTS, seed=1)
    dates = admitted_version(other_contributor, slug="dates", prompts=DATES_PROMPTS, seed=2)
    _outcomes(base_model, None, {units_task: 0.0, dates_task: 0.0})
    _outcomes(base_model, units, {units_task: 1.0, dates_task: 0.0})
    _outcomes(base_model, dates, {units_task: 0.0, dates_task: 1.0})
    return MixtureVersion.objects.get(is_active=True)


def test_it_trains_on_public_examples_and_example_prompts_only(mixture):
    data, summary = training_set(mixture=mixture)
    splits = set(Example.objects.filter(pk__in=data.example_ids).values_list("split", flat=True))
    assert splits == {Example.Split.PUBLIC}
    assert len(data.example_ids) == summary["public_examples"] == 5
    assert summary["example_prompts"] == len(UNITS_PROMPTS) + len(DATES_PROMPTS)
    assert len(data.points) == 5 + summary["example_prompts"]
    hidden = Example.objects.exclude(split=Example.Split.PUBLIC).values_list("pk", flat=True)
    assert not set(hidden) & set(data.example_ids)


def test_the_job_trains_once_and_the_serving_catalog_carries_it(mixture):
    router = LearnedRouter.objects.create(mixture=mixture)
    assert learned_router_train(router_id=router.pk) == "done"
    assert learned_router_train(router_id=router.pk) == "finished"  # a redelivery: nothing
    router.refresh_from_db()
    assert router.status == LearnedRouter.Status.DONE, router.failure_reason
    assert router.kind in {"knn", "linear"} and router.trained_at is not None
    assert set(router.cv_accuracy) == {"knn", "linear"}
    assert router.parameters_file.name.endswith(".npz")
    model = learned_router_load(mixture_id=mixture.pk)
    assert model is not None and model.columns == 3

    torch.manual_seed(0)
    engine = Engine(AutoModelForCausalLM.from_config(tiny_llama_config()), tiny_tokenizer())
    sync = MixtureSync(engine)
    assert sync.refresh() is True
    assert sync.catalog.learned is not None and sync.catalog.learned.kind == router.kind
    query = near(0, 1, np.random.default_rng(1))[0]  # far from both skills: any answer will do
    assert route_learned_embedded(catalog=sync.catalog, query=query).router == "learned"


def test_the_sync_picks_up_a_router_trained_after_the_mixture_was_served(mixture):
    torch.manual_seed(0)
    engine = Engine(AutoModelForCausalLM.from_config(tiny_llama_config()), tiny_tokenizer())
    sync = MixtureSync(engine)
    sync.refresh()
    assert sync.catalog.learned is None
    learned_router_train_now(mixture=mixture)
    assert sync.refresh() is True
    assert sync.catalog.learned is not None
    assert sync.refresh() is False  # no change, no reload


def test_the_job_is_quiet_for_a_gone_mixture(mixture):
    router = LearnedRouter.objects.create(mixture=mixture)
    MixtureVersion.objects.filter(pk=mixture.pk).update(is_active=False)
    mixture.delete()
    assert learned_router_train(router_id=router.pk) == "gone"
    assert learned_router_train(router_id=10**9) == "gone"


def test_a_burst_of_publications_trains_only_the_newest_mixtures_router(mixture):
    older = LearnedRouter.objects.create(mixture=mixture)
    newer_mixture = mixture_publish(reason="another admission")
    newer = LearnedRouter.objects.create(mixture=newer_mixture)
    assert learned_router_train(router_id=older.pk) == "superseded"
    older.refresh_from_db()
    assert older.status == LearnedRouter.Status.SUPERSEDED and older.finished_at is not None
    assert not older.parameters_file
    assert learned_router_train(router_id=older.pk) == "finished"
    assert learned_router_train(router_id=newer.pk) == "done"
    newer.refresh_from_db()
    assert newer.status == LearnedRouter.Status.DONE
    assert newer.finished_at == newer.trained_at is not None


def test_publishing_queues_the_training_after_commit(
    db, base_model, settings, sent_tasks, django_capture_on_commit_callbacks
):
    settings.TESSERA_LEARNED_ROUTER_ON_PUBLISH = True
    with django_capture_on_commit_callbacks(execute=True):
        mixture = mixture_publish(reason="test")
    router = LearnedRouter.objects.get(mixture=mixture)
    assert router.status == LearnedRouter.Status.QUEUED
    assert sent_tasks == {"routing.train_router": [([router.pk], "eval-cpu")]}


def test_publishing_queues_nothing_when_switched_off(db, base_model):
    mixture_publish(reason="test")
    assert not LearnedRouter.objects.exists()


def test_the_command_prints_the_chosen_kind_and_accuracies(mixture, capsys):
    from django.core.management import call_command

    call_command("train_router")
    out = capsys.readouterr().out
    assert "learned router" in out and "(chosen)" in out
    assert "| knn" in out and "| linear" in out
    call_command("train_router", "--mixture", str(mixture.number), "--json")
    assert '"cv_accuracy"' in capsys.readouterr().out


# --- On real prompts: the three-adapter demo a newcomer starts with --------------------------

SKILLS = (
    "addition",
    "date-formatting",
    "number-words",
    "sorting",
    "unit-conversion",
    "word-reversal",
)
THREE = {"unit-conversion": 101, "date-formatting": 102, "word-reversal": 103}  # task: version
TRAINED = 20  # public examples a task trains on (as the demo's sample keeps); the rest query


def suite_public_prompts() -> dict[str, list[str]]:
    """Every built-in skill and general task's committed public prompts, rendered as a
    request carries them."""
    from evaluation.suite_io import parse_suite_jsonl
    from evaluation.worker.scoring import render_prompt

    prompts: dict[str, list[str]] = {}
    for name in (*SKILLS, "general"):
        parsed = parse_suite_jsonl(
            (ROOT / "evaluation" / "suites" / f"{name}.jsonl").read_bytes(),
            splits=("public",),
            min_examples={},
        )
        for task in parsed.tasks:
            prompts[task.slug] = [
                render_prompt(e.prompt_template or task.prompt_template, e.fields)
                for e in task.split("public")
            ]
    return prompts


def test_prompts_of_skills_no_admitted_adapter_has_go_to_the_base_model_on_real_prompts():
    """Units, dates and word reversal admitted; addition, number words and sorting prompts
    (whose numbers sit close to the units adapter's prompts) are solved by none of them, and
    go to the base model, while each admitted skill's prompts go to its adapter. Real
    all-MiniLM-L6-v2 embeddings of the suites' public prompts and the demo adapters' example
    prompts; outcomes as the demo measured them (each adapter solves most of its own skill
    and nothing of another, the base model none of the skills, every candidate about two
    thirds of the general tasks)."""
    import json

    from evaluation.worker.signatures import embed

    prompts = suite_public_prompts()
    rng = np.random.default_rng(3)
    columns = [None, *THREE.values()]
    texts, rows = [], []
    for slug, task_prompts in prompts.items():
        for index, text in enumerate(task_prompts[:TRAINED]):
            if slug in THREE:
                row = [float(THREE[slug] == c and index % 5 != 0) for c in columns]
            elif slug in SKILLS:
                row = [0.0] * len(columns)
            else:
                row = [float(v) for v in rng.random(len(columns)) < 0.67]
            texts.append(text)
            rows.append(row)
    owned = []
    for folder, task in (
        ("unit-conversion", "unit-conversion"),
        ("date-formatting", "date-formatting"),
        ("word-reversal", "word-reversal"),
    ):
        metadata = json.loads((ROOT / "demo" / "adapters" / folder / "metadata.json").read_text())
        owned += [(1 + list(THREE).index(task), p) for p in metadata["example_prompts"]]
    correct = np.asarray(rows, dtype=np.float32)
    data = TrainingSet(
        points=embed([*texts, *(p for _column, p in owned)]),
        correct=correct,
        known=np.ones_like(correct, dtype=bool),
        owner=np.asarray([column for column, _p in owned], dtype=np.int64),
        version_ids=list(THREE.values()),
        example_ids=list(range(1, len(texts) + 1)),
        mixture_number=1,
    )
    fitted = fit_best(data)
    catalog = Catalog(
        mixture_number=1,
        router="learned",
        router_settings={},
        adapters=tuple(served(f"demo/{t}", version_id=v) for t, v in THREE.items()),
        learned=fitted.model,
    )

    def picks(slug: str) -> list[str]:
        queries = embed(prompts[slug][TRAINED:])
        assert len(queries) >= 10, slug
        decisions = [route_learned_embedded(catalog=catalog, query=q) for q in queries]
        return [d.adapter.model_id if d.adapter else "base" for d in decisions]

    for slug in ("addition", "number-words", "sorting"):
        routed = picks(slug)
        assert routed.count("base") >= 0.9 * len(routed), (slug, fitted.params, routed)
    for slug in THREE:
        routed = picks(slug)
        assert routed.count(f"demo/{slug}") >= 0.9 * len(routed), (slug, fitted.params, routed)


def test_a_training_set_narrowed_to_some_members_keeps_their_columns_and_prompts_only():
    data = synthetic()  # columns: base, STRONG, WEAK, DATES; 5 example prompts each
    narrowed = data.only([DATES, STRONG])
    assert narrowed.version_ids == [DATES, STRONG]
    np.testing.assert_array_equal(narrowed.correct, data.correct[:, [0, 3, 1]])
    assert narrowed.scored == data.scored and narrowed.known.shape == narrowed.correct.shape
    # STRONG's and DATES's example prompts, renumbered to their new columns; WEAK's dropped.
    assert sorted(narrowed.owner.tolist()) == [1] * 5 + [2] * 5
    np.testing.assert_array_equal(
        narrowed.points[data.scored :][narrowed.owner == 1],
        data.points[data.scored :][data.owner == 3],
    )
