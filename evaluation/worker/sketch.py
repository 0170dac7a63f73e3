"""Weight sketches: a short, fixed random projection of an adapter's weight deltas, to flag
uploads that are nearly the same adapter as one already admitted (redundant or copied).

For each LoRA module (full path, e.g. ``model.layers.3.self_attn.q_proj``) the delta is
ΔW = scale·B·A (out × in). Its sketch is the bilinear random projection Lᵀ·ΔW·R, with L
(out × 16) and R (in × 16) standard Gaussians seeded from the module's path and shape, so
the same module of any two adapters is projected the same way. E[⟨LᵀXR, LᵀYR⟩] ∝ ⟨X, Y⟩,
so cosines between sketches estimate cosines between the deltas. It is computed without
ever forming ΔW: (Lᵀ·B)·(A·R) costs O((out + in)·r·16).

The 256 numbers of every module of one kind (``q_proj`` of all layers) are summed: with
independent L, R per layer that is a random projection of the concatenation of those
layers' deltas. The version's vector is the per-kind blocks in the base model's order of
module kinds (zeros for kinds it does not target), L2-normalised. Two versions are compared
only when they target at least one common kind (a cosine over disjoint blocks is 0 anyway)
and have the same base model (the layout follows the base's module kinds).

The child computes ``sketch_from_tensors`` inside the sandbox (it holds the tensors); this
module imports neither torch nor Django at module level for that reason.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from contributions.models import AdapterVersion

SIDE = 16
BLOCK = SIDE * SIDE  # numbers per module kind
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _gaussian(module: str, role: str, rows: int) -> np.ndarray:
    digest = hashlib.sha256(f"tessera-sketch/1/{module}/{role}/{rows}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.standard_normal((rows, SIDE))


def module_sketch(a: np.ndarray, b: np.ndarray, *, scale: float, module: str) -> np.ndarray:
    """Lᵀ·(scale·B·A)·R as BLOCK numbers, for A (r × in) and B (out × r)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    left = _gaussian(module, "L", b.shape[0])  # out × 16
    right = _gaussian(module, "R", a.shape[1])  # in × 16
    return (scale * (left.T @ b) @ (a @ right)).reshape(-1)


def sketch_from_tensors(tensors: Mapping[str, Any], *, scale: float) -> dict[str, list[float]]:
    """{module kind: BLOCK floats} from a PEFT LoRA state dict (arrays or tensors already
    converted to numpy), keys ``base_model.model.<module>.lora_{A,B}.weight``."""
    modules: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        for suffix in _SUFFIXES:
            if name.startswith(_PREFIX) and name.endswith(suffix):
                module = name[len(_PREFIX) : -len(suffix)]
                modules.setdefault(module, {})[suffix[6]] = value  # "A" or "B"
    kinds: dict[str, np.ndarray] = {}
    for module in sorted(modules):
        pair = modules[module]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {module} lacks lora_A or lora_B")
        kind = module.rsplit(".", 1)[-1]
        block = module_sketch(pair["A"], pair["B"], scale=scale, module=module)
        kinds[kind] = kinds.get(kind, 0) + block
    return {kind: [float(x) for x in block] for kind, block in kinds.items()}


def sketch_vector(blocks: Mapping[str, Sequence[float]], *, kinds: Sequence[str]) -> list[float]:
    """The version's vector: blocks in the base's kind order, zeros elsewhere, normalised."""
    unknown = set(blocks) - set(kinds)
    if unknown:
        raise ValueError(f"module kinds not in the base model: {sorted(unknown)}")
    vector = np.zeros(len(kinds) * BLOCK)
    for index, kind in enumerate(kinds):
        if kind in blocks:
            vector[index * BLOCK : (index + 1) * BLOCK] = np.asarray(blocks[kind], dtype=float)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        return [0.0] * len(vector)
    return [float(x) for x in vector / norm]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        return 0.0
    denominator = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / denominator if denominator else 0.0


def similar_admitted(
    version: AdapterVersion, threshold: float = 0.95
) -> list[tuple[AdapterVersion, float]]:
    """Admitted versions (other adapters', or earlier ones of the same adapter) whose sketch
    has a cosine ≥ ``threshold`` with this version's, most similar first. Only versions on
    the same base model that target at least one common module kind are compared. For the
    review queue's "nearly identical to an admitted adapter" flag."""
    from contributions.models import AdapterVersion
    from evaluation.models import WeightSketch

    mine = WeightSketch.objects.filter(version=version).first()
    if mine is None:
        return []
    kinds = set(version.target_modules)
    candidates = (
        WeightSketch.objects.select_related("version", "version__adapter")
        .filter(
            version__status=AdapterVersion.Status.ADMITTED,
            version__base_model_id=version.base_model_id,
        )
        .exclude(version=version)
    )
    found = []
    for other in candidates:
        if not kinds & set(other.version.target_modules):
            continue
        similarity = cosine(mine.vector, other.vector)
        if similarity >= threshold:
            found.append((other.version, similarity))
    found.sort(key=lambda pair: -pair[1])
    return found
