"""The learned router's fitted model: what it predicts, and how it is stored.

Pure numpy, no catalog and no Django: the serving catalog holds one, the training job makes
one, the router reads one (routing.router.learned says how it is used and why it is shaped
so). Stored as an .npz of plain numeric and string arrays, read with ``allow_pickle=False``:
the file is data, never code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

KINDS = ("knn", "linear")
FORMAT_VERSION = 1
# The inverse-distance weighting of files written before the bandwidth existed: 1 / (cosine
# distance + 0.05), so a training prompt identical to the request weighs 20 times one at
# distance 1, not infinitely more.
DISTANCE_EPS = 0.05
# Rows scored together when predicting many queries at once (cross-validation): bounds the
# gathered [rows, k, columns] block to a few tens of megabytes with 1,000 columns.
_CHUNK = 256


@dataclass(frozen=True, eq=False)
class LearnedRouterModel:
    """A fitted learned router; immutable, shared by every request of a catalog."""

    kind: str  # "knn" | "linear"
    version_ids: np.ndarray  # int64 [C - 1]: the adapter version of columns 1..C-1
    prior: np.ndarray  # float32 [C]: each column's mean score on the public examples
    mixture_number: int = 0
    # knn: training prompts (unit rows), the first len(correct) of them public examples
    # with a score per column (``known`` says which), the rest example prompts of one column
    # each (``owner``).
    points: np.ndarray | None = None  # float32 [N, d]
    correct: np.ndarray | None = None  # float32 [N_public, C], 0 where unknown
    known: np.ndarray | None = None  # float32 [N_public, C], 1 known / 0 unknown
    owner: np.ndarray | None = None  # int64 [N - N_public]
    k: int = 0
    alpha: float = 1.0
    # knn: a neighbour at cosine distance d from the request weighs exp(-d / bandwidth)
    # relative to the nearest one (0: the inverse distance above). A narrow kernel lets the
    # request's own task speak: with 1 / (d + 0.05), the neighbours of another task that
    # fill up k (a units adapter's example prompts, for an addition prompt) weighed a third
    # of the nearest and voted their adapter in where nobody is measured to help.
    bandwidth: float = 0.0
    # How much an adapter's predicted P(correct) must exceed the base model's for it to
    # answer (chosen by cross-validation with the rest of the setting, routing.learned.fit).
    margin: float = 0.0
    # linear
    weights: np.ndarray | None = None  # float32 [C, d]
    bias: np.ndarray | None = None  # float32 [C]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown learned router kind {self.kind!r}")
        if self.kind == "knn" and (self.points is None or self.correct is None or self.k < 1):
            raise ValueError("a knn router needs its training points, scores and k >= 1")
        if self.kind == "linear" and (self.weights is None or self.bias is None):
            raise ValueError("a linear router needs its weights and bias")

    @property
    def columns(self) -> int:
        return int(self.version_ids.shape[0]) + 1

    @property
    def column_of(self) -> dict[int, int]:
        """{adapter version id: its column}."""
        index = self.__dict__.get("_column_of")
        if index is None:
            index = {int(v): j + 1 for j, v in enumerate(self.version_ids.tolist())}
            object.__setattr__(self, "_column_of", index)
        return index

    def predict(self, queries: np.ndarray) -> np.ndarray:
        """P(correct) per column: [n, C] for ``queries`` [n, d] (or [C] for one [d])."""
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        queries = queries.reshape(1, -1) if single else queries
        if self.kind == "linear":
            logits = queries @ self.weights.T + self.bias
            out = 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))
        else:
            out = (
                np.concatenate(
                    [self._knn(queries[i : i + _CHUNK]) for i in range(0, len(queries), _CHUNK)]
                )
                if len(queries)
                else np.zeros((0, self.columns), dtype=np.float32)
            )
        return out[0] if single else out

    def _knn(self, queries: np.ndarray) -> np.ndarray:
        points, correct, known = self.points, self.correct, self.known
        n, dense = len(queries), len(correct)
        if not len(points):  # trained on nothing: every column at its prior
            return np.broadcast_to(self.prior, (n, self.columns)).astype(np.float32)
        k = min(self.k, len(points))
        similarity = queries @ points.T  # [n, N]: the one product
        if k < len(points):
            top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(len(points)), (n, len(points)))
        near = np.take_along_axis(similarity, top, axis=1)
        if self.bandwidth > 0:
            # Relative to the nearest neighbour (weight 1), so that it cannot underflow; the
            # prediction is a ratio of weighted sums, unchanged by a common factor.
            weight = np.exp((near - near.max(axis=1, keepdims=True)) / self.bandwidth)
        else:
            weight = 1.0 / (np.maximum(1.0 - near, 0.0) + DISTANCE_EPS)  # [n, k]
        is_dense = top < dense
        rows = np.where(is_dense, top, 0)
        dense_weight = np.where(is_dense, weight, 0.0)
        if dense:
            numerator = np.einsum("nk,nkc->nc", dense_weight, correct[rows])
            denominator = np.einsum("nk,nkc->nc", dense_weight, known[rows])
        else:
            numerator = np.zeros((n, self.columns), dtype=np.float64)
            denominator = np.zeros((n, self.columns), dtype=np.float64)
        if self.owner is not None and len(self.owner) and not is_dense.all():
            prompt_weight = np.where(is_dense, 0.0, weight)
            owners = self.owner[np.where(is_dense, 0, top - dense)]
            at = (np.repeat(np.arange(n), top.shape[1]), owners.reshape(-1))
            np.add.at(numerator, at, prompt_weight.reshape(-1))
            np.add.at(denominator, at, prompt_weight.reshape(-1))
        # Every column is pulled towards the base model's prior, not its own: where the
        # neighbours say nothing about an adapter, it predicts what the base does (and the
        # base answers, the tie going to it); a column's own mean would hand a prompt that
        # nobody solves to whichever adapter does best elsewhere.
        pull = self.alpha * weight.mean(axis=1, keepdims=True)
        return ((numerator + pull * self.prior[0]) / (denominator + pull)).astype(np.float32)

    # --- Storage: an .npz without pickles -----------------------------------------------------

    def to_npz(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
            "kind": np.asarray(self.kind),  # a fixed-width unicode array, not an object
            "mixture_number": np.asarray(self.mixture_number, dtype=np.int64),
            "version_ids": np.asarray(self.version_ids, dtype=np.int64),
            "prior": np.asarray(self.prior, dtype=np.float32),
            "k": np.asarray(self.k, dtype=np.int64),
            "alpha": np.asarray(self.alpha, dtype=np.float64),
            "bandwidth": np.asarray(self.bandwidth, dtype=np.float64),
            "margin": np.asarray(self.margin, dtype=np.float64),
        }
        for name in ("points", "correct", "known", "weights", "bias"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value, dtype=np.float32)
        if self.owner is not None:
            arrays["owner"] = np.asarray(self.owner, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> LearnedRouterModel:
        """Read what ``to_npz`` wrote; raises ValueError on anything else (an object array
        among them: allow_pickle=False refuses it)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if int(arrays.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError("not a learned router file of a format this code reads")

        def optional(name: str, dtype) -> np.ndarray | None:
            value = arrays.get(name)
            return None if value is None else np.ascontiguousarray(value, dtype=dtype)

        model = cls(
            kind=str(arrays["kind"]),
            version_ids=np.asarray(arrays["version_ids"], dtype=np.int64).reshape(-1),
            prior=np.asarray(arrays["prior"], dtype=np.float32).reshape(-1),
            mixture_number=int(arrays["mixture_number"]),
            points=optional("points", np.float32),
            correct=optional("correct", np.float32),
            known=optional("known", np.float32),
            owner=optional("owner", np.int64),
            k=int(arrays["k"]),
            alpha=float(arrays["alpha"]),
            # Files written before the margin existed route with none.
            margin=float(arrays["margin"]) if "margin" in arrays else 0.0,
            bandwidth=float(arrays["bandwidth"]) if "bandwidth" in arrays else 0.0,
            weights=optional("weights", np.float32),
            bias=optional("bias", np.float32),
        )
        model.check()
        return model

    def check(self) -> None:
        """Shapes that agree with each other, and finite values (a file is not trusted to)."""
        columns = self.columns
        if self.prior.shape != (columns,):
            raise ValueError("prior does not have one value per column")
        present = [
            a
            for a in (self.prior, self.points, self.correct, self.weights, self.bias)
            if a is not None
        ]
        if not all(np.isfinite(a).all() for a in present):
            raise ValueError("a learned router's arrays must be finite")
        if not (np.isfinite(self.bandwidth) and 0.0 <= self.bandwidth <= 10.0):
            raise ValueError("a learned router's bandwidth is a cosine distance in [0, 10]")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError("a learned router's margin is a probability difference in [0, 1)")
        if self.kind == "knn":
            dense = len(self.correct)
            prompts = 0 if self.owner is None else len(self.owner)
            if self.correct.shape[1:] != (columns,) or self.known.shape != self.correct.shape:
                raise ValueError("scores and known-masks must have one column per candidate")
            if self.points.ndim != 2 or len(self.points) != dense + prompts:
                raise ValueError("one training point per scored example and example prompt")
            if prompts and not ((self.owner >= 1) & (self.owner < columns)).all():
                raise ValueError("an example prompt's owner must be an adapter's column")
        elif self.weights.shape[0] != columns or self.bias.shape != (columns,):
            raise ValueError("weights and bias must have one row per candidate")
