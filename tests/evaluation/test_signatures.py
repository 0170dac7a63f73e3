"""Routing signatures with the bundled all-MiniLM-L6-v2, fully offline."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from evaluation.worker.sandbox import SandboxLimits, run_sandboxed, workdir_create, workdir_remove
from evaluation.worker.signatures import DIMENSIONS, EMBEDDING_MODEL, centroid, embed, signature_for
from tests.evaluation.test_runs import make_task, upload_version

ADDITION = ["What is 123 + 456?", "Add 907 and 88.", "Compute 500 + 501.", "Sum 12 and 30."]
DATES = [
    "Write 2021-03-04 as a date in words.",
    "Format the date 12/05/2019 in ISO 8601.",
    "What day of the week was 1 January 2000?",
]


def test_embeddings_are_384_dimensional_and_normalised():
    vectors = embed(["What is 2 + 2?", "Bonjour"])
    assert vectors.shape == (2, DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embed([]).shape == (0, DIMENSIONS)


def test_a_centroid_is_normalised_and_semantically_sensible():
    addition, dates = centroid(embed(ADDITION)), centroid(embed(DATES))
    assert np.linalg.norm(addition) == pytest.approx(1.0)
    query = embed(["How much is 44 plus 58?"])[0]
    assert query @ addition > query @ dates + 0.1
    date_query = embed(["Convert 2020-01-02 to 2 January 2020."])[0]
    assert date_query @ dates > date_query @ addition + 0.1


def test_the_model_loads_and_embeds_with_no_network_at_all():
    """Inside the sandbox (a new network namespace, HF_HUB_OFFLINE=1): no download is
    attempted or needed."""
    code = textwrap.dedent(
        """
        import json, os
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        from evaluation.worker.signatures import embed
        vector = embed(["What is 2 + 2?"])
        print(json.dumps({"result": {"shape": list(vector.shape)}}), flush=True)
        """
    )
    workdir, _ = workdir_create(files={})
    try:
        outcome = run_sandboxed(
            [sys.executable, "-c", code],
            stdin_bytes=b"",
            limits=SandboxLimits(
                memory_bytes=12 * 1024**3,
                cpu_seconds=300,
                open_files=512,
                file_bytes=64 * 1024**2,
                wall_seconds=120,
            ),
            workdir=workdir,
        )
    finally:
        workdir_remove(workdir)
    assert outcome.failure() is None, outcome.log[-3000:]
    assert outcome.mode in ("bwrap", "unshare")
    assert outcome.result == {"shape": [1, DIMENSIONS]}


@pytest.mark.django_db
def test_a_versions_signature_uses_its_prompts_and_public_prompts_never_hidden(
    contributor, base_model
):
    task = make_task(
        tags=["arithmetic"],
        public=[{"a": 1, "b": 2}, {"a": 30, "b": 40}],
        hidden=[{"a": 9000, "b": 1}],
        template="Add {a} and {b}.",
    )
    version = upload_version(contributor, tags=["arithmetic"], prompts=ADDITION[:3])
    vector, count = signature_for(version)
    assert count == 3 + 2
    assert len(vector) == DIMENSIONS
    expected = centroid(embed([*ADDITION[:3], "Add 1 and 2.", "Add 30 and 40."]))
    assert np.allclose(vector, expected, atol=1e-5)
    with_hidden = centroid(
        embed([*ADDITION[:3], "Add 1 and 2.", "Add 30 and 40.", "Add 9000 and 1."])
    )
    assert not np.allclose(vector, with_hidden, atol=1e-4)
    assert json.loads(json.dumps(vector)) == vector  # plain floats, storable as JSON
    assert task.tags == ["arithmetic"]
    assert EMBEDDING_MODEL.endswith("all-MiniLM-L6-v2")


# --- Weight sketches ---------------------------------------------------------------------------


def lora_tensors(seed: int, *, scale_b: float = 1.0, modules=("q_proj", "v_proj")):
    """PEFT-style LoRA tensors for a 2-layer model: A (r × in), B (out × r)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = rng.standard_normal((4, 64))
            b = rng.standard_normal((32, 4)) * scale_b
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    return tensors


def delta_vector(tensors) -> np.ndarray:
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
    return np.concatenate(
        [(tensors[f"{m}.lora_B.weight"] @ tensors[f"{m}.lora_A.weight"]).ravel() for m in modules]
    )


KINDS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def sketch(tensors):
    from evaluation.worker.sketch import sketch_from_tensors, sketch_vector

    return sketch_vector(sketch_from_tensors(tensors, scale=2.0), kinds=KINDS)


def test_a_weight_sketch_is_fixed_normalised_and_blind_to_scale():
    from evaluation.worker.sketch import BLOCK, cosine

    first = sketch(lora_tensors(1))
    assert len(first) == BLOCK * len(KINDS)
    assert np.linalg.norm(first) == pytest.approx(1.0)
    assert sketch(lora_tensors(1)) == first  # the projection is seeded: same input, same sketch
    assert cosine(first, sketch(lora_tensors(1, scale_b=3.0))) == pytest.approx(1.0)
    assert abs(cosine(first, sketch(lora_tensors(2)))) < 0.5  # unrelated adapters


def test_a_weight_sketch_estimates_the_cosine_of_the_weight_deltas():
    from evaluation.worker.sketch import cosine

    base = lora_tensors(3)
    noise = lora_tensors(4)
    near = {k: v + (0.3 * noise[k] if k.endswith("lora_B.weight") else 0) for k, v in base.items()}
    true = cosine(delta_vector(base), delta_vector(near))
    assert true > 0.8
    assert cosine(sketch(base), sketch(near)) == pytest.approx(true, abs=0.15)


@pytest.mark.django_db
def test_similar_admitted_flags_near_copies_of_admitted_versions_only(contributor, base_model):
    from contributions.models import AdapterVersion
    from evaluation.models import WeightSketch
    from evaluation.worker.sketch import similar_admitted

    admitted = upload_version(contributor, variant=0)
    copy = upload_version(contributor, variant=1)
    other_modules = upload_version(contributor, variant=5)  # q, k, v: overlaps q and v
    vector = sketch(lora_tensors(1))
    for version in (admitted, copy, other_modules):
        WeightSketch.objects.create(version=version, vector=vector)
    assert similar_admitted(copy) == []  # nothing admitted yet
    AdapterVersion.objects.filter(pk=admitted.pk).update(status="admitted")
    flagged = similar_admitted(copy)
    assert [(v.pk, round(c, 6)) for v, c in flagged] == [(admitted.pk, 1.0)]
    assert similar_admitted(copy, threshold=1.01) == []
    # A version whose modules share nothing with the admitted one is never compared.
    AdapterVersion.objects.filter(pk=other_modules.pk).update(target_modules=["o_proj"])
    assert similar_admitted(AdapterVersion.objects.get(pk=other_modules.pk)) == []
