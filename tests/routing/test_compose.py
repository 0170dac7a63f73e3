"""From a routing decision to a composition: which adapters take part, with which weights,
for every method, and every composition a request cannot have.

Decisions are built by hand (no router, no model): the composition layer only reads what a
router ranked and picked.
"""

from __future__ import annotations

import math

import pytest

from multilora.composition import Composition
from routing.catalog import Catalog
from routing.compose import (
    MAX_CANDIDATES,
    CompositionRefused,
    compose,
    softmax_weights,
)
from routing.router import RoutingDecision
from tests.routing.test_router import served


def catalog_of(*adapters, merged=None) -> Catalog:
    catalog = Catalog(mixture_number=3, router="embedding", adapters=tuple(adapters))
    if merged is not None:
        object.__setattr__(catalog, "merged", merged)
    return catalog


ADAPTERS = [served(f"alice/skill-{i}") for i in range(20)]
CATALOG = catalog_of(*ADAPTERS)


def decided(*scores: float, threshold: float | None = 0.35, pick: bool = True):
    """A decision ranking ADAPTERS[0..] with these scores (best first)."""
    ranked = tuple(zip(ADAPTERS, scores, strict=False))
    above = threshold is None or scores[0] >= threshold
    return RoutingDecision(
        router="embedding",
        adapter=ADAPTERS[0] if pick and above else None,
        scores=(),
        threshold=threshold,
        reason="above_threshold" if pick and above else "below_threshold",
        ranked=ranked,
    )


def test_top1_is_the_routers_pick_alone():
    composed = compose(catalog=CATALOG, decision=decided(0.8, 0.7), method="top1")
    assert composed.engine == Composition.single(ADAPTERS[0].key)
    assert composed.parts == ((ADAPTERS[0], 1.0),)
    assert composed.primary is ADAPTERS[0]


def test_topk_weighs_the_k_best_by_a_softmax_of_their_scores():
    composed = compose(
        catalog=CATALOG, decision=decided(0.9, 0.6, 0.5), method="topk", k=2, temperature=0.1
    )
    expected = [1 / (1 + math.exp(-3)), math.exp(-3) / (1 + math.exp(-3))]
    assert composed.engine.method == "topk"
    assert composed.engine.adapters == (ADAPTERS[0].key, ADAPTERS[1].key)
    assert composed.engine.weights == pytest.approx(expected)
    assert [adapter for adapter, _ in composed.parts] == ADAPTERS[:2]
    assert composed.primary is ADAPTERS[0]


def test_candidates_below_the_threshold_take_no_part():
    # The runner-up is off-topic for the router: mixing it in would only dilute the answer.
    composed = compose(catalog=CATALOG, decision=decided(0.9, 0.2, 0.1), method="topk", k=3)
    assert composed.engine == Composition.single(ADAPTERS[0].key)
    assert composed.parts == ((ADAPTERS[0], 1.0),)


@pytest.mark.parametrize("method", ["top1", "topk", "arrow", "logit"])
def test_a_request_the_router_sends_to_the_base_model_gets_the_base_model(method):
    composed = compose(catalog=CATALOG, decision=decided(0.2, 0.1), method=method, k=2)
    assert composed.engine.is_base
    assert composed.parts == ()
    assert composed.method == method


def test_logit_fuses_the_k_best_with_softmax_weights():
    composed = compose(catalog=CATALOG, decision=decided(0.8, 0.8, 0.8), method="logit", k=3)
    assert composed.engine.method == "logit"
    assert composed.engine.weights == pytest.approx([1 / 3] * 3)


def test_arrow_hands_the_engine_the_ranked_candidates_and_mixes_k_per_token():
    scores = [0.9 - 0.01 * i for i in range(20)]
    composed = compose(catalog=CATALOG, decision=decided(*scores), method="arrow", k=2)
    assert composed.engine.method == "arrow"
    assert composed.engine.k == 2
    assert len(composed.engine.adapters) == MAX_CANDIDATES
    assert composed.engine.adapters[0] == ADAPTERS[0].key
    assert sum(weight for _, weight in composed.parts) == pytest.approx(1.0)


def test_arrow_with_fewer_candidates_than_k_mixes_all_of_them():
    composed = compose(catalog=CATALOG, decision=decided(0.9), method="arrow", k=4)
    assert composed.engine.k == 1


def test_merged_serves_the_catalogs_merged_adapter():
    merged = served("tessera/merged")
    catalog = catalog_of(*ADAPTERS, merged=merged)
    composed = compose(catalog=catalog, decision=decided(0.2), method="merged")
    assert composed.engine == Composition.single(merged.key)
    assert composed.parts == ((merged, 1.0),)


def test_merged_before_one_is_built_is_refused_with_its_code():
    with pytest.raises(CompositionRefused) as caught:
        compose(catalog=CATALOG, decision=decided(0.9), method="merged")
    assert caught.value.code == "merged_unavailable"


def test_a_named_adapter_answers_alone_and_refuses_a_mix():
    named = RoutingDecision(
        router="explicit", adapter=ADAPTERS[4], scores=(), threshold=None, reason="explicit"
    )
    assert compose(catalog=CATALOG, decision=named, named=True).parts == ((ADAPTERS[4], 1.0),)
    with pytest.raises(CompositionRefused) as caught:
        compose(catalog=CATALOG, decision=named, method="topk", named=True)
    assert caught.value.code == "composition_needs_mixture"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"method": "soup"}, "tessera.composition"),
        ({"method": "topk", "k": 0}, "tessera.k"),
        ({"method": "topk", "k": 17}, "tessera.k"),
        ({"method": "topk", "k": True}, "tessera.k"),
        ({"method": "topk", "temperature": 0}, "tessera.temperature"),
        ({"method": "topk", "temperature": float("inf")}, "tessera.temperature"),
        ({"method": "topk", "temperature": float("nan")}, "tessera.temperature"),
    ],
)
def test_bad_composition_values_are_refused_with_the_parameter_named(fields, param):
    with pytest.raises(CompositionRefused) as caught:
        compose(catalog=CATALOG, decision=decided(0.9), **fields)
    assert caught.value.code == "invalid_composition"
    assert caught.value.param == param


def test_the_deployments_default_method_applies_when_the_request_names_none(settings):
    settings.TESSERA_COMPOSITION = "topk"
    settings.TESSERA_COMPOSITION_K = 2
    composed = compose(catalog=CATALOG, decision=decided(0.9, 0.8))
    assert composed.method == "topk" and len(composed.parts) == 2


def test_softmax_weights_are_stable_for_large_scores_and_sum_to_one():
    weights = softmax_weights([1000.0, 999.0], 0.001)
    assert weights == pytest.approx([1.0, 0.0])
    assert sum(softmax_weights([0.3, 0.2, 0.1], 1.0)) == pytest.approx(1.0)


def test_best_serves_the_method_the_scoreboard_found_best_for_the_router(settings):
    settings.TESSERA_COMPOSITION = "best"
    settings.TESSERA_COMPOSITION_K = 2
    unscored = compose(catalog=CATALOG, decision=decided(0.9, 0.8))
    assert unscored.method == "top1"  # until the mixture is scored
    scored = Catalog(
        mixture_number=3,
        router="embedding",
        adapters=tuple(ADAPTERS),
        best_compositions={"embedding": "topk", "learned": "merged"},
    )
    assert compose(catalog=scored, decision=decided(0.9, 0.8)).method == "topk"
    learned = RoutingDecision(
        router="learned",
        adapter=ADAPTERS[0],
        scores=(),
        threshold=0.1,
        reason="above_threshold",
        ranked=((ADAPTERS[0], 0.9),),
    )
    # merged is best for that router, but no merged adapter is loaded: top1 meanwhile.
    assert compose(catalog=scored, decision=learned).method == "top1"
    # A request's own choice always wins.
    assert compose(catalog=scored, decision=decided(0.9, 0.8), method="logit").method == "logit"
