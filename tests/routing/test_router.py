"""The request router: who answers a request, for every reason a decision can give, and the
two scoring methods (embedding signatures, request-level Arrow) on inputs whose answer is
known in advance.

Catalogs are built by hand (no database). The embedding model is the real all-MiniLM-L6-v2
from evaluation.worker.signatures (offline); signatures are centroids of a few real prompts, as
evaluation builds them. Arrow runs on hand-made LoRA tensors and on the tiny random Llama of
tests.support.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import ArrowConfig
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from transformers import AutoModelForCausalLM

from evaluation.worker.signatures import centroid, embed
from multilora import LoraRegistry, MultiLoraModel
from routing.catalog import BASE_MODEL_ID, MIXTURE_MODEL_ID, Catalog, ServedAdapter
from routing.router import (
    MAX_SCORES,
    ArrowPrototypeBank,
    RoutingError,
    RoutingPolicy,
    arrow_prototypes,
    arrow_request_scores,
    candidates,
    capture_module_inputs,
    route,
    signature_matrix,
    top_right_singular_vector,
)
from tests.support.tiny_model import save_tiny_llama, tiny_architecture

OWNER_ID, OTHER_ID = 1, 2
_version_ids = itertools.count(10_000)

UNIT_PROMPTS = [
    "Convert 12 inches to centimeters.",
    "How many grams are in 3 pounds?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "How many meters is 5 miles?",
    "Convert 2 liters to cups.",
]
DATE_PROMPTS = [
    "Format the date 2024-03-05 as 'March 5, 2024'.",
    "Rewrite 07/04/1999 in ISO 8601 format.",
    "What day of the week was 1 January 2000?",
    "Write the date 31/12/2023 in US format.",
    "Convert '5 Feb 2021' to YYYY-MM-DD.",
]
UNIT_REQUEST = "Convert 3 feet to meters."
DATE_REQUEST = "Format 2023-11-09 as a long date."
OFF_TOPIC_REQUEST = "What is the capital of France?"


# --- Building catalogs ------------------------------------------------------------------------


def served(
    model_id: str,
    *,
    owner_id: int = OWNER_ID,
    private: bool = False,
    license: str = "apache-2.0",
    version_number: int = 1,
    signature: np.ndarray | None = None,
    version_id: int | None = None,
) -> ServedAdapter:
    owner, _, slug = model_id.partition("/")
    version_id = version_id if version_id is not None else next(_version_ids)
    return ServedAdapter(
        key=f"v{version_id}",
        version_id=version_id,
        version_number=version_number,
        adapter_id=version_id,
        model_id=model_id,
        title=slug.replace("-", " "),
        owner_id=owner_id,
        owner_username=owner,
        license=license,
        private=private,
        task_tags=(),
        signature=signature,
    )


def catalog_of(*adapters: ServedAdapter, router: str = "embedding", **settings) -> Catalog:
    return Catalog(mixture_number=1, router=router, router_settings=settings, adapters=adapters)


@functools.cache
def signature_of(prompts: tuple[str, ...]) -> np.ndarray:
    return centroid(embed(list(prompts))).astype(np.float32)


def skills_catalog(**settings) -> Catalog:
    """A unit-conversion and a date-formatting adapter, signed from real prompts."""
    return catalog_of(
        served("alice/units", signature=signature_of(tuple(UNIT_PROMPTS))),
        served("bob/dates", owner_id=OTHER_ID, signature=signature_of(tuple(DATE_PROMPTS))),
        **settings,
    )


def decide(catalog: Catalog, model: str = MIXTURE_MODEL_ID, **kwargs):
    kwargs.setdefault("text", UNIT_REQUEST)
    kwargs.setdefault("user_id", None)
    kwargs.setdefault("policy", RoutingPolicy())
    return route(catalog=catalog, model=model, **kwargs)


@pytest.fixture(autouse=True)
def _default_threshold(settings) -> None:
    # The deployment default the router falls back on, pinned so that the tests do not
    # depend on the environment the suite runs in.
    settings.TESSERA_ROUTER_THRESHOLD = 0.35


# --- Reasons ----------------------------------------------------------------------------------


def test_the_base_model_answers_a_request_that_names_it():
    decision = decide(skills_catalog(), BASE_MODEL_ID)

    assert (decision.router, decision.adapter, decision.reason) == ("base", None, "base_requested")
    assert decision.scores == ()


def test_a_base_only_policy_sends_the_mixture_to_the_base_model():
    decision = decide(skills_catalog(), policy=RoutingPolicy(base_only=True))

    assert (decision.router, decision.adapter, decision.reason) == ("base", None, "base_only")


def test_a_request_naming_an_adapter_gets_it_without_scoring():
    catalog = skills_catalog()

    decision = decide(catalog, "bob/dates", text=UNIT_REQUEST)  # off its topic: no matter

    assert decision.adapter is catalog.by_model_id("bob/dates")
    assert (decision.router, decision.reason, decision.scores) == ("explicit", "explicit", ())


def test_the_embedding_router_sends_each_request_to_the_adapter_signed_with_similar_prompts():
    catalog = skills_catalog()

    units = decide(catalog, text=UNIT_REQUEST)
    dates = decide(catalog, text=DATE_REQUEST)

    assert units.adapter is catalog.by_model_id("alice/units")
    assert dates.adapter is catalog.by_model_id("bob/dates")
    for decision in (units, dates):
        assert (decision.router, decision.reason, decision.threshold) == (
            "embedding",
            "above_threshold",
            0.35,
        )
        assert decision.scores[0].model_id == decision.adapter.model_id
        assert decision.scores[0].score >= 0.35 > decision.scores[1].score


def test_an_off_topic_request_falls_below_the_threshold_to_the_base_model():
    decision = decide(skills_catalog(), text=OFF_TOPIC_REQUEST)

    assert (decision.adapter, decision.reason) == (None, "below_threshold")
    # The scores still say how close the router came.
    assert [s.model_id for s in decision.scores] == ["alice/units", "bob/dates"]
    assert 0 < decision.scores[0].score < 0.35


def test_no_candidates_when_no_adapter_has_a_signature():
    catalog = catalog_of(served("alice/unsigned"))

    decision = decide(catalog)

    assert (decision.router, decision.adapter, decision.reason) == (
        "embedding",
        None,
        "no_candidates",
    )


def test_an_adapter_with_an_unusable_signature_is_not_scored():
    units = signature_of(tuple(UNIT_PROMPTS))
    catalog = catalog_of(
        served("alice/short", signature=units[:100]),
        served("alice/zero", signature=np.zeros(384, dtype=np.float32)),
        served("alice/nan", signature=np.full(384, np.nan, dtype=np.float32)),
        served("alice/units", signature=2 * units),  # not unit length: normalised on stacking
    )

    decision = decide(catalog, text=UNIT_REQUEST)

    assert [score.model_id for score in decision.scores] == ["alice/units"]
    assert decision.scores[0].score == pytest.approx(decide(skills_catalog()).scores[0].score)
    assert list(signature_matrix(catalog).row_of) == [catalog.by_model_id("alice/units")]


def test_no_candidates_when_the_policy_filters_every_adapter_out():
    decision = decide(skills_catalog(), policy=RoutingPolicy(licenses=frozenset({"mit"})))

    assert (decision.adapter, decision.reason, decision.scores) == (None, "no_candidates", ())


def test_the_explicit_router_answers_the_mixture_with_the_base_model():
    catalog = skills_catalog()

    by_default = decide(catalog_of(*catalog.adapters, router="explicit"))
    by_request = decide(catalog, router="explicit")

    for decision in (by_default, by_request):
        assert (decision.router, decision.adapter, decision.reason) == (
            "explicit",
            None,
            "no_candidates",
        )


# --- Visibility and names ---------------------------------------------------------------------


def private_catalog() -> Catalog:
    return catalog_of(
        served("alice/secret", private=True, signature=signature_of(tuple(UNIT_PROMPTS))),
        served("bob/dates", owner_id=OTHER_ID, signature=signature_of(tuple(DATE_PROMPTS))),
    )


def test_a_private_adapter_is_served_to_its_owner_by_name_and_by_routing():
    catalog = private_catalog()

    named = decide(catalog, "alice/secret", user_id=OWNER_ID)
    routed = decide(catalog, text=UNIT_REQUEST, user_id=OWNER_ID)

    assert named.adapter is catalog.by_model_id("alice/secret")
    assert routed.adapter is catalog.by_model_id("alice/secret")


@pytest.mark.parametrize("user_id", [OTHER_ID, None], ids=["other contributor", "anonymous"])
def test_a_private_adapter_reads_as_missing_to_anyone_else(user_id):
    catalog = private_catalog()

    with pytest.raises(RoutingError) as private:
        decide(catalog, "alice/secret", user_id=user_id)
    with pytest.raises(RoutingError) as unknown:
        decide(catalog, "alice/nothing-here", user_id=user_id)

    assert private.value.code == unknown.value.code == "model_not_found"
    # Same words apart from the name: nothing tells a private adapter from a missing one.
    assert str(private.value).replace("secret", "X") == str(unknown.value).replace(
        "nothing-here", "X"
    )
    routed = decide(catalog, text=UNIT_REQUEST, user_id=user_id)
    assert routed.adapter is not catalog.by_model_id("alice/secret")
    assert "alice/secret" not in [score.model_id for score in routed.scores]
    assert [
        a.model_id for a in candidates(catalog=catalog, user_id=user_id, policy=RoutingPolicy())
    ] == ["bob/dates"]


def test_a_versioned_name_matches_only_the_served_version():
    catalog = catalog_of(served("alice/units", version_number=3))

    assert decide(catalog, "alice/units@v3").adapter is catalog.by_model_id("alice/units")
    for stale in ("alice/units@v2", "alice/units@v4", "alice/units@v03", "alice/units@v"):
        with pytest.raises(RoutingError) as error:
            decide(catalog, stale)
        assert error.value.code == "model_not_found", stale


def test_a_versioned_name_of_someone_elses_private_adapter_reveals_no_version():
    catalog = catalog_of(served("alice/secret", private=True, version_number=3))

    with pytest.raises(RoutingError) as error:
        decide(catalog, "alice/secret@v2", user_id=OTHER_ID)

    assert error.value.code == "model_not_found"
    assert "v3" not in str(error.value)


def test_an_unknown_router_is_refused():
    with pytest.raises(RoutingError) as by_request:
        decide(skills_catalog(), router="random")
    with pytest.raises(RoutingError) as by_mixture:
        decide(catalog_of(router="nearest"))

    assert by_request.value.code == by_mixture.value.code == "invalid_router"


@pytest.mark.parametrize(
    ("catalog_settings", "threshold"),
    [({}, math.nan), ({}, math.inf), ({}, "high"), ({"threshold": "high"}, None)],
)
def test_a_threshold_that_is_not_a_finite_number_is_refused(catalog_settings, threshold):
    with pytest.raises(RoutingError) as error:
        decide(skills_catalog(**catalog_settings), threshold=threshold)

    assert error.value.code == "invalid_threshold"


# --- Policy filters ---------------------------------------------------------------------------


def policy_catalog() -> Catalog:
    return catalog_of(
        served("alice/units", license="apache-2.0"),
        served("alice/dates", license="mit"),
        served("bob/sums", owner_id=OTHER_ID, license="apache-2.0"),
        served("carol/poems", owner_id=3, license="cc-by-4.0"),
    )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RoutingPolicy(), ["alice/units", "alice/dates", "bob/sums", "carol/poems"]),
        (RoutingPolicy(licenses=frozenset({"apache-2.0"})), ["alice/units", "bob/sums"]),
        (RoutingPolicy(include_contributors=frozenset({"alice"})), ["alice/units", "alice/dates"]),
        (RoutingPolicy(exclude_contributors=frozenset({"alice"})), ["bob/sums", "carol/poems"]),
        (RoutingPolicy(include_adapters=frozenset({"bob/sums", "x/y"})), ["bob/sums"]),
        (
            RoutingPolicy(exclude_adapters=frozenset({"alice/dates", "carol/poems"})),
            ["alice/units", "bob/sums"],
        ),
        (
            RoutingPolicy(
                licenses=frozenset({"apache-2.0", "mit"}),
                exclude_contributors=frozenset({"bob"}),
            ),
            ["alice/units", "alice/dates"],
        ),
        (RoutingPolicy(base_only=True), []),
    ],
    ids=[
        "open",
        "licenses",
        "include contributors",
        "exclude contributors",
        "include adapters",
        "exclude adapters",
        "combined",
        "base only",
    ],
)
def test_each_policy_filter_narrows_the_candidates(policy, expected):
    found = candidates(catalog=policy_catalog(), user_id=OWNER_ID, policy=policy)

    assert [adapter.model_id for adapter in found] == expected


@pytest.mark.parametrize(
    "policy",
    [
        RoutingPolicy(licenses=frozenset({"mit"})),
        RoutingPolicy(include_contributors=frozenset({"bob"})),
        RoutingPolicy(exclude_contributors=frozenset({"alice"})),
        RoutingPolicy(include_adapters=frozenset({"bob/sums"})),
        RoutingPolicy(exclude_adapters=frozenset({"alice/units"})),
        RoutingPolicy(base_only=True),
    ],
)
def test_naming_an_adapter_the_policy_excludes_is_refused(policy):
    with pytest.raises(RoutingError) as error:
        decide(policy_catalog(), "alice/units", policy=policy)

    assert error.value.code == "adapter_filtered_out"


def test_the_router_never_scores_an_adapter_the_policy_excludes():
    catalog = skills_catalog()

    decision = decide(
        catalog, text=UNIT_REQUEST, policy=RoutingPolicy(exclude_contributors=frozenset({"alice"}))
    )

    assert [score.model_id for score in decision.scores] == ["bob/dates"]
    assert (decision.adapter, decision.reason) == (None, "below_threshold")


# --- Thresholds -------------------------------------------------------------------------------


def test_the_threshold_comes_from_the_request_then_the_mixture_then_the_settings(settings):
    settings.TESSERA_ROUTER_THRESHOLD = 0.99
    strict_deployment = decide(skills_catalog(), text=UNIT_REQUEST)
    lenient_mixture = decide(skills_catalog(threshold=0.1), text=OFF_TOPIC_REQUEST)
    strict_request = decide(skills_catalog(threshold=0.1), text=UNIT_REQUEST, threshold=0.99)

    assert (strict_deployment.reason, strict_deployment.threshold) == ("below_threshold", 0.99)
    assert (lenient_mixture.reason, lenient_mixture.threshold) == ("above_threshold", 0.1)
    assert lenient_mixture.adapter.model_id == "alice/units"
    assert (strict_request.reason, strict_request.threshold) == ("below_threshold", 0.99)


# --- Many adapters ----------------------------------------------------------------------------


def test_a_thousand_adapters_route_to_the_one_signed_for_the_request():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1000, 384)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    unit_signature = signature_of(tuple(UNIT_PROMPTS))
    adapters = [
        served(
            f"user{i}/skill-{i}",
            owner_id=10 + i,
            version_id=i,
            signature=unit_signature if i == 737 else noise[i],
        )
        for i in range(1000)
    ]
    catalog = catalog_of(*adapters)

    decision = decide(catalog, text=UNIT_REQUEST)

    assert decision.adapter is adapters[737]
    assert decision.reason == "above_threshold"
    assert len(decision.scores) == MAX_SCORES
    values = [score.score for score in decision.scores]
    assert values == sorted(values, reverse=True)
    assert values[0] > 0.35 > values[1]  # random directions in 384-d are near-orthogonal
    # The stacked signatures are built once per catalog object.
    assert signature_matrix(catalog) is signature_matrix(catalog)
    assert signature_matrix(catalog).matrix.shape == (1000, 384)


def test_scores_hold_at_most_five_candidates_best_first():
    query = embed([UNIT_REQUEST])[0].astype(np.float64)
    other = np.random.default_rng(1).standard_normal(384)
    other -= (other @ query) * query
    other /= np.linalg.norm(other)
    # Eight signatures whose cosine with the request is exactly 0.9, 0.8, ..., 0.2.
    cosines = [0.9 - 0.1 * i for i in range(8)]
    adapters = [
        served(f"u{i}/s", signature=c * query + math.sqrt(1 - c * c) * other)
        for i, c in enumerate(cosines)
    ]

    decision = decide(catalog_of(*reversed(adapters)), text=UNIT_REQUEST)

    assert [score.model_id for score in decision.scores] == [f"u{i}/s" for i in range(5)]
    assert [score.score for score in decision.scores] == pytest.approx(cosines[:5], abs=1e-5)
    assert decision.adapter is adapters[0]


# --- Arrow: routing with the injected scores --------------------------------------------------


def arrow_catalog(**settings) -> Catalog:
    return catalog_of(
        served("alice/units"),
        served("alice/secret", private=True),
        served("bob/dates", owner_id=OTHER_ID, license="mit"),
        served("carol/poems", owner_id=3),
        router="arrow",
        **settings,
    )


def test_the_arrow_router_picks_the_best_scored_candidate():
    seen: list[list[str]] = []

    def scores(candidates: list[ServedAdapter]) -> np.ndarray:
        seen.append([adapter.model_id for adapter in candidates])
        return np.array(
            [
                {"alice/units": 0.2, "bob/dates": 0.7, "carol/poems": 0.4}[a.model_id]
                for a in candidates
            ]
        )

    decision = decide(arrow_catalog(), user_id=OTHER_ID, arrow_scores=scores)

    assert seen == [["alice/units", "bob/dates", "carol/poems"]]  # no private adapter
    assert decision.adapter.model_id == "bob/dates"
    assert (decision.router, decision.reason, decision.threshold) == (
        "arrow",
        "above_threshold",
        None,
    )
    assert [s.model_id for s in decision.scores] == ["bob/dates", "carol/poems", "alice/units"]


def test_the_arrow_router_scores_only_what_the_policy_allows():
    seen: list[list[str]] = []

    def scores(candidates: list[ServedAdapter]) -> np.ndarray:
        seen.append([adapter.model_id for adapter in candidates])
        return np.arange(len(candidates), dtype=float)

    decision = decide(
        arrow_catalog(),
        user_id=OWNER_ID,
        policy=RoutingPolicy(licenses=frozenset({"apache-2.0"})),
        arrow_scores=scores,
    )

    assert seen == [["alice/units", "alice/secret", "carol/poems"]]
    assert decision.adapter.model_id == "carol/poems"


def test_the_arrow_threshold_applies_only_when_the_mixture_sets_one():
    def scores(candidates: list[ServedAdapter]) -> np.ndarray:
        return np.full(len(candidates), 0.3)

    free = decide(arrow_catalog(), arrow_scores=scores)
    strict = decide(arrow_catalog(arrow_threshold=0.5), arrow_scores=scores)

    assert (free.reason, free.adapter.model_id) == ("above_threshold", "alice/units")
    assert (strict.reason, strict.adapter, strict.threshold) == ("below_threshold", None, 0.5)


def test_the_arrow_router_without_a_scorer_is_unavailable():
    with pytest.raises(RoutingError) as error:
        decide(arrow_catalog())

    assert error.value.code == "arrow_unavailable"


@pytest.mark.parametrize("bad", [np.zeros(1), np.array([0.1, math.inf, 0.2])])
def test_arrow_scores_of_the_wrong_shape_or_not_finite_are_refused(bad):
    with pytest.raises(RoutingError) as error:
        decide(arrow_catalog(), arrow_scores=lambda candidates: bad)

    assert error.value.code == "arrow_failed"


# --- Arrow: prototypes and scores -------------------------------------------------------------


TINY_MODULES = tiny_architecture()["linear_modules"]
LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "bias": "none",
}


def lora_tensors(seed: int, *, config: dict = LORA_CONFIG) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (in_features, out_features) in TINY_MODULES.items():
        if path.rsplit(".", 1)[-1] in config["target_modules"]:
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(
                config["r"], in_features, generator=generator
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(
                out_features, config["r"], generator=generator
            )
    return tensors


def test_arrow_prototypes_are_the_top_right_singular_vectors_of_each_delta():
    tensors = lora_tensors(seed=0)

    prototypes = arrow_prototypes(lora_config=LORA_CONFIG, tensors=tensors)

    targeted = sorted(
        {name.split(".lora_")[0].removeprefix("base_model.model.") for name in tensors}
    )
    assert sorted(prototypes) == targeted and len(targeted) == 6
    for path, prototype in prototypes.items():
        a = tensors[f"base_model.model.{path}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
        expected = torch.linalg.svd(b @ a).Vh[0]  # the hand computation, ΔW formed in full
        assert prototype.shape == (TINY_MODULES[path][0],)
        assert prototype.dtype == torch.float32
        assert float(prototype.norm()) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(prototype.double() @ expected)) == pytest.approx(1.0, abs=1e-5)


def test_arrow_prototypes_agree_with_peft_power_iteration():
    config = ArrowConfig(rng_seed=0)
    config.task_adapter_names, config.gks_adapter_names = [], []
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 64, generator=generator), torch.randn(96, 8, generator=generator)

    peft_vector = ArrowLoraLinearLayer(64, config).top_right_singular_vec_from_BA(a, b, iters=200)

    assert abs(float(top_right_singular_vector(a, b) @ peft_vector)) == pytest.approx(1, abs=1e-4)


def test_arrow_prototypes_check_the_tensors_against_the_base_when_given_its_shapes():
    tensors = lora_tensors(seed=0)
    wrong = {path: (in_features + 1, out) for path, (in_features, out) in TINY_MODULES.items()}

    with pytest.raises(ValueError, match="expected"):
        arrow_prototypes(lora_config=LORA_CONFIG, tensors=tensors, module_shapes=wrong)
    with pytest.raises(ValueError, match="not a PEFT"):
        arrow_prototypes(lora_config=LORA_CONFIG, tensors={"weights": torch.zeros(2, 2)})


def rank_one_delta(direction: torch.Tensor, *, out_features: int, seed: int, rank: int = 4):
    """(A, B) whose ΔW = B·A has ``direction`` as its dominant input direction, plus weaker
    random ones (so the SVD has something to choose between)."""
    generator = torch.Generator().manual_seed(seed)
    a = 0.05 * torch.randn(rank, direction.numel(), generator=generator)
    a[0] = 5 * direction / direction.norm()
    b = torch.randn(out_features, rank, generator=generator)
    return a, b


def test_arrow_scores_prefer_the_adapter_whose_delta_points_along_the_input():
    path = "model.layers.0.self_attn.q_proj"
    in_features, out_features = TINY_MODULES[path]
    east, north = torch.eye(in_features)[0], torch.eye(in_features)[1]
    config = {**LORA_CONFIG, "target_modules": ["q_proj"]}
    prototypes = []
    for seed, direction in enumerate((east, north)):
        a, b = rank_one_delta(direction, out_features=out_features, seed=seed)
        tensors = {
            f"base_model.model.{path}.lora_A.weight": a,
            f"base_model.model.{path}.lora_B.weight": b,
        }
        prototypes.append(arrow_prototypes(lora_config=config, tensors=tensors))
    generator = torch.Generator().manual_seed(9)
    noise = 0.2 * torch.randn(12, in_features, generator=generator)

    # Tokens along one direction, with a sign flip on half of them: Arrow is sign-free.
    signs = torch.tensor([1.0, -1.0] * 6).unsqueeze(1)
    towards_east = arrow_request_scores(
        hidden_inputs={path: 3 * signs * east + noise}, prototypes_by_adapter=prototypes
    )
    towards_north = arrow_request_scores(
        hidden_inputs={path: 30 * signs * north + noise}, prototypes_by_adapter=prototypes
    )

    assert towards_east[0] > 0.8 > 0.2 > towards_east[1]
    assert towards_north[1] > 0.8 > 0.2 > towards_north[0]


def test_arrow_scores_average_over_the_modules_each_adapter_targets():
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.1.self_attn.v_proj"
    east = torch.eye(64)[0]
    x = torch.stack([east, -east, torch.zeros(64)])  # a zero token has no direction: skipped
    bank = ArrowPrototypeBank(
        [
            {q: east},  # only q: perfect there
            {q: east, v: torch.eye(64)[1]},  # perfect on q, orthogonal on v: mean 0.5
            {"model.layers.1.mlp.down_proj": torch.eye(128)[0]},  # no input captured there
        ]
    )

    scores = bank.scores({q: x, v: x})

    assert scores == pytest.approx([1.0, 0.5, 0.0])
    assert bank.module_paths() == sorted([q, v, "model.layers.1.mlp.down_proj"])


# --- Arrow: capturing the base model's inputs -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def load_tiny(tiny_dir: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


PROMPT_IDS = torch.tensor([1, 40, 41, 42, 43, 44, 45, 2])
CAPTURED = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.mlp.down_proj",
]


def reference_inputs(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The same inputs taken the long way: forward hooks over a complete forward."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: inputs.__setitem__(name, args[0][0].clone())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model(input_ids=PROMPT_IDS.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def test_capture_returns_the_inputs_of_the_named_modules(tiny_dir):
    model = load_tiny(tiny_dir)

    captured = capture_module_inputs(model, PROMPT_IDS, CAPTURED)

    expected = reference_inputs(model, CAPTURED)
    assert list(captured) == CAPTURED
    for name in CAPTURED:
        assert captured[name].shape == (len(PROMPT_IDS), TINY_MODULES[name][0])
        torch.testing.assert_close(captured[name], expected[name])
    # q_proj's input is the first layer's normalised embeddings, checked by hand too.
    layer = model.model.layers[0]
    with torch.no_grad():
        by_hand = layer.input_layernorm(model.model.embed_tokens(PROMPT_IDS))
    torch.testing.assert_close(captured["model.layers.0.self_attn.q_proj"], by_hand)


def test_capture_stops_the_forward_once_it_has_every_input(tiny_dir):
    model = load_tiny(tiny_dir)
    calls: list[str] = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append("layer 1"))
    model.lm_head.register_forward_pre_hook(lambda *_: calls.append("head"))

    capture_module_inputs(model, PROMPT_IDS, ["model.layers.0.mlp.down_proj"])
    assert calls == []
    capture_module_inputs(model, PROMPT_IDS, ["model.layers.1.mlp.down_proj"])
    assert calls == ["layer 1"]


def test_capture_through_the_engine_wrappers_sees_the_base_model_alone(tiny_dir):
    bare = load_tiny(tiny_dir)
    wrapped = load_tiny(tiny_dir)
    registry = LoraRegistry.for_model(wrapped)
    multi = MultiLoraModel(wrapped, registry)
    slot = registry.add("a", lora_config=LORA_CONFIG, tensors=lora_tensors(seed=1))

    captured = capture_module_inputs(wrapped, PROMPT_IDS, CAPTURED)

    expected = capture_module_inputs(bare, PROMPT_IDS, CAPTURED)
    for name in CAPTURED:
        torch.testing.assert_close(captured[name], expected[name])
    with multi.adapters([slot]), pytest.raises(RuntimeError, match="bound"):
        capture_module_inputs(wrapped, PROMPT_IDS, CAPTURED)


def test_arrow_end_to_end_on_the_tiny_model_picks_the_adapter_built_for_the_prompt(tiny_dir):
    """An adapter whose every ΔW points along the prompt's mean activation at that module is
    the one the captured inputs favour over random adapters."""
    model = load_tiny(tiny_dir)
    paths = [p for p in TINY_MODULES if p.rsplit(".", 1)[-1] in LORA_CONFIG["target_modules"]]
    inputs = capture_module_inputs(model, PROMPT_IDS, paths)
    tuned = {}
    for path in paths:
        a, b = rank_one_delta(inputs[path].mean(dim=0), out_features=TINY_MODULES[path][1], seed=5)
        tuned[f"base_model.model.{path}.lora_A.weight"] = a
        tuned[f"base_model.model.{path}.lora_B.weight"] = b
    adapters = [lora_tensors(seed=11), tuned, lora_tensors(seed=12)]
    bank = ArrowPrototypeBank(
        [arrow_prototypes(lora_config=LORA_CONFIG, tensors=tensors) for tensors in adapters]
    )
    catalog = catalog_of(served("a/one"), served("b/tuned"), served("c/three"), router="arrow")

    def scores(candidates: list[ServedAdapter]) -> np.ndarray:
        captured = capture_module_inputs(model, PROMPT_IDS, bank.module_paths())
        index = {adapter.model_id: i for i, adapter in enumerate(catalog.adapters)}
        return bank.scores(captured)[[index[adapter.model_id] for adapter in candidates]]

    decision = decide(catalog, arrow_scores=scores)

    assert decision.adapter.model_id == "b/tuned"
    assert decision.scores[0].score > decision.scores[1].score + 0.1


# --- Ranked candidates, for composing several adapters -----------------------------------------


def test_a_decision_ranks_its_candidates_as_adapters_best_first():
    catalog = skills_catalog()
    decision = decide(catalog)
    assert [adapter.model_id for adapter, _score in decision.ranked] == [
        score.model_id for score in decision.scores
    ]
    assert decision.ranked[0][0] is decision.adapter
    values = [score for _adapter, score in decision.ranked]
    assert values == sorted(values, reverse=True)
    assert all(adapter in catalog.adapters for adapter, _score in decision.ranked)


def test_ranked_holds_at_most_max_compose_candidates_and_survives_the_threshold():
    from routing.router import MAX_COMPOSE

    signature = signature_of(tuple(UNIT_PROMPTS))
    catalog = catalog_of(*(served(f"u{i}/units", signature=signature) for i in range(20)))
    decision = decide(catalog, text=OFF_TOPIC_REQUEST, threshold=0.99)
    assert (decision.adapter, decision.reason) == (None, "below_threshold")
    assert len(decision.ranked) == MAX_COMPOSE and len(decision.scores) == MAX_SCORES


def test_an_explicitly_named_adapter_is_ranked_alone():
    decision = decide(skills_catalog(), "alice/units")
    assert [(adapter.model_id, score) for adapter, score in decision.ranked] == [
        ("alice/units", 1.0)
    ]
