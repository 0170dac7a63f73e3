"""Fitting the learned router: a k-nearest-neighbour model and a linear one, each tuned and
compared by cross-validation; pure numpy and scikit-learn, no database.

A setting is judged by how it routes the held-out examples, under the serving rule (the
best adapter if it beats the base model's prediction by the margin, else the base model).
Each example has a right answer: a candidate that solves it (score at least 0.5) where any
does, else the base model, the safe default, since an adapter that is not measured to help
should not answer. The setting that routes the largest share of held-out examples right is
kept. Routing accuracy alone (the scoreboard's: the share of solvable examples whose pick
solves them) is blind to the examples nobody solves, where every pick scores the same: by
it, a model that hands every prompt of a skill no admitted adapter has to the adapter with
the most similar prompts (a units adapter, for prompts full of numbers) was as good as one
that left them to the base model, and one solvable example more made it better. Ties go to
the higher routing accuracy, then to the better calibrated setting (the lower Brier score of
its predicted P(correct) against every measured outcome held out), as a few dozen public
examples tie often. Only public benchmark examples are held out; contributors' example
prompts always stay in the training folds, as they say something about one adapter only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from routing.router.learned import KINDS, LearnedRouterModel

SOLVED = 0.5
KS = (40, 20, 10, 5, 3, 1)  # largest first: on a tie the smoother model wins
# The nearest neighbours' kernel widths (cosine distance; 0: the inverse distance), widest
# first for the same reason.
BANDWIDTHS = (0.0, 0.1, 0.05, 0.02)
CS = (0.1, 1.0, 10.0)  # strongest regularisation first, for the same reason
# How much an adapter's P(correct) must beat the base model's: the one kept routes the
# held-out examples best (as the settings are judged; the larger margin on a tie). Never
# none: an adapter predicted a hair above the base model (a far neighbour's faint vote,
# where the near ones say nobody helps) is no reason to leave it, so the least is one point.
MARGINS = (0.01, 0.05, 0.1, 0.2, 0.3)
FOLDS = 5
MIN_SCORED = 2  # fewer scored examples than this: nothing to cross-validate on


@dataclass(frozen=True)
class TrainingSet:
    """Column 0 is the base model, column j the adapter version ``version_ids[j - 1]``.

    The first ``len(example_ids)`` rows of ``points`` are public examples with a measured
    score per column (``known`` says which were measured); the rest are example prompts,
    each a 1 for its adapter's column ``owner`` and unknown for every other."""

    points: np.ndarray  # float32 [N, d], unit rows
    correct: np.ndarray  # float32 [N_public, C], 0 where unknown
    known: np.ndarray  # bool [N_public, C]
    owner: np.ndarray  # int64 [N - N_public]
    version_ids: list[int]
    example_ids: list[int]  # the public examples' primary keys, one per scored row
    mixture_number: int = 0

    @property
    def scored(self) -> int:
        return len(self.example_ids)

    def only(self, version_ids: Sequence[int]) -> TrainingSet:
        """The same set for a mixture of only ``version_ids`` (each one of this set's): the
        base model's column and theirs, and their example prompts."""
        columns = [0, *(1 + self.version_ids.index(v) for v in version_ids)]
        renumber = {column: new for new, column in enumerate(columns)}
        owned = np.isin(self.owner, columns)
        return TrainingSet(
            points=np.concatenate([self.points[: self.scored], self.points[self.scored :][owned]]),
            correct=self.correct[:, columns],
            known=self.known[:, columns],
            owner=np.asarray([renumber[int(o)] for o in self.owner[owned]], dtype=np.int64),
            version_ids=list(version_ids),
            example_ids=list(self.example_ids),
            mixture_number=self.mixture_number,
        )


@dataclass(frozen=True)
class Fitted:
    model: LearnedRouterModel
    kind: str
    params: dict
    # {kind: {"right": its best setting's share of held-out examples routed right,
    #         "accuracy": its routing accuracy or None, "base_kept": its share of unsolved
    #         examples kept on the base model, "brier": its Brier score, "params": its
    #         params, "grid": [{"params": ..., "right": ..., ...}, ...],
    #         "n": solvable examples it was over}}
    cv: dict = field(default_factory=dict)
    # [{"margin": m, "right": ..., "accuracy": ..., ...}, ...] for the chosen kind
    margins: list = field(default_factory=list)


@dataclass(frozen=True)
class CrossValidated:
    """How held-out examples were routed: ``accuracy`` over the solvable ones (None: none),
    ``base_kept`` the share of the unsolvable ones left to the base model (None: none)."""

    accuracy: float | None
    n: int
    base_kept: float | None
    unsolved: int
    brier: float | None = None  # mean (P(correct) - score)² over the measured cells

    @property
    def right(self) -> float | None:
        """The share of held-out examples routed right: solvable ones to a candidate that
        solves them, the others to the base model."""
        hits = (self.accuracy or 0.0) * self.n
        kept = (self.base_kept or 0.0) * self.unsolved
        total = self.n + self.unsolved
        return (hits + kept) / total if total else None

    def key(self) -> tuple[float, float, float]:
        """Routed right first, then accuracy, then calibration (see the module docstring)."""
        right = self.right
        return (
            -1.0 if right is None else right,
            -1.0 if self.accuracy is None else self.accuracy,
            -1.0 if self.brier is None else -self.brier,
        )

    def entry(self) -> dict:
        return {
            "right": self.right,
            "accuracy": self.accuracy,
            "base_kept": self.base_kept,
            "brier": self.brier,
        }


def fit_best(
    data: TrainingSet,
    *,
    kinds: Sequence[str] = KINDS,
    ks: Sequence[int] = KS,
    bandwidths: Sequence[float] = BANDWIDTHS,
    cs: Sequence[float] = CS,
    folds: int = FOLDS,
    seed: int = 0,
) -> Fitted:
    """Tune each kind in ``kinds`` by cross-validation, keep the best one (ties: the first
    kind listed), choose its margin, refit it on everything."""
    grids = {
        "knn": [{"k": k, "bandwidth": h} for k in ks for h in bandwidths],
        "linear": [{"C": c} for c in cs],
    }
    splits = _folds(data.scored, folds, seed)
    cv: dict = {}
    best: tuple[tuple[float, float, float], str, dict] | None = None
    for kind in kinds:
        results = [(params, cross_validated(data, kind, params, splits)) for params in grids[kind]]
        # max keeps the first of equals: the smoother setting, listed first.
        params, top = max(results, key=lambda result: result[1].key())
        cv[kind] = {
            **top.entry(),
            "params": params,
            "grid": [{"params": p, **r.entry()} for p, r in results],
            "n": top.n,
        }
        if best is None or top.key() > best[0]:
            best = (top.key(), kind, params)
    assert best is not None, "at least one kind to fit"
    _key, kind, params = best
    margin, margins = _margin(data, kind, params, splits)
    model = fit(data, kind, params, rows=np.arange(data.scored), margin=margin)
    return Fitted(
        model=model, kind=kind, params={**params, "margin": margin}, cv=cv, margins=margins
    )


def _margin(
    data: TrainingSet, kind: str, params: dict, splits: list[np.ndarray]
) -> tuple[float, list]:
    """The margin of MARGINS that routes held-out examples best (the larger margin on a
    tie), and each one's figures."""
    held, predicted = held_out_predictions(data, kind, params, splits)
    results = [(m, routing_hits(predicted, data, held, margin=m)) for m in MARGINS]
    chosen = max(results, key=lambda result: (result[1].key(), result[0]))[0]
    return chosen, [{"margin": m, **r.entry()} for m, r in results]


def cross_validated(
    data: TrainingSet, kind: str, params: dict, splits: list[np.ndarray]
) -> CrossValidated:
    """How the held-out folds were routed by models fitted without them."""
    held, predicted = held_out_predictions(data, kind, params, splits)
    return routing_hits(predicted, data, held)


def held_out_predictions(
    data: TrainingSet, kind: str, params: dict, splits: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(the held-out rows, each one's prediction by the model fitted without its fold)."""
    everything = np.arange(data.scored)
    rows, predictions = [], []
    for held in splits:
        train = np.setdiff1d(everything, held)
        if not len(held) or (not len(train) and not len(data.owner)):
            continue
        model = fit(data, kind, params, rows=train)
        rows.append(held)
        predictions.append(model.predict(data.points[held]))
    if not rows:
        columns = data.correct.shape[1]
        return np.zeros(0, dtype=np.intp), np.zeros((0, columns), dtype=np.float32)
    return np.concatenate(rows), np.concatenate(predictions)


def routing_hits(
    predicted: np.ndarray, data: TrainingSet, rows: np.ndarray, *, margin: float = 0.0
) -> CrossValidated:
    """How ``rows`` are routed by their ``predicted`` values (see the module docstring)."""
    if not len(rows):
        return CrossValidated(None, 0, None, 0)
    picks = picks_of(predicted, margin=margin)
    known = data.known[rows]
    solves = known & (data.correct[rows] >= SOLVED)
    solvable = solves.any(axis=1)
    unsolved = known.any(axis=1) & ~solvable
    hit = solves[np.arange(len(rows)), picks] & solvable
    kept = (picks == 0) & unsolved
    error = (predicted - data.correct[rows]) ** 2
    return CrossValidated(
        accuracy=_accuracy(int(hit.sum()), int(solvable.sum())),
        n=int(solvable.sum()),
        base_kept=_accuracy(int(kept.sum()), int(unsolved.sum())),
        unsolved=int(unsolved.sum()),
        brier=float(error[known].mean()) if known.any() else None,
    )


def routing_accuracy_counts(
    model: LearnedRouterModel, data: TrainingSet, rows: np.ndarray
) -> CrossValidated:
    """How ``model`` routes ``rows``."""
    return routing_hits(
        model.predict(data.points[rows]) if len(rows) else np.zeros((0, model.columns)),
        data,
        rows,
        margin=model.margin,
    )


def _accuracy(solved: int, n: int) -> float | None:
    return solved / n if n else None


def picks_of(predicted: np.ndarray, *, margin: float = 0.0) -> np.ndarray:
    """The serving rule over every column: the best adapter if it beats the base model's
    prediction by ``margin``, else the base model (column 0)."""
    if predicted.shape[1] == 1:
        return np.zeros(len(predicted), dtype=np.intp)
    best = 1 + np.argmax(predicted[:, 1:], axis=1)
    beats = predicted[np.arange(len(predicted)), best] > predicted[:, 0] + margin
    return np.where(beats, best, 0)


def fit(
    data: TrainingSet, kind: str, params: dict, *, rows: np.ndarray, margin: float = 0.0
) -> LearnedRouterModel:
    """A model of ``kind`` on the scored ``rows`` and every example prompt."""
    prior = _prior(data, rows)
    if kind == "knn":
        dense = data.points[rows]
        prompts = data.points[data.scored :]
        return LearnedRouterModel(
            kind="knn",
            version_ids=np.asarray(data.version_ids, dtype=np.int64),
            prior=prior,
            mixture_number=data.mixture_number,
            points=np.ascontiguousarray(np.concatenate([dense, prompts]), dtype=np.float32),
            correct=np.ascontiguousarray(data.correct[rows], dtype=np.float32),
            known=np.ascontiguousarray(data.known[rows], dtype=np.float32),
            owner=np.asarray(data.owner, dtype=np.int64),
            k=int(params["k"]),
            bandwidth=float(params.get("bandwidth", 0.0)),
            margin=margin,
        )
    if kind == "linear":
        weights, bias = _logistic(data, rows, prior, float(params["C"]))
        return LearnedRouterModel(
            kind="linear",
            version_ids=np.asarray(data.version_ids, dtype=np.int64),
            prior=prior,
            mixture_number=data.mixture_number,
            weights=weights,
            bias=bias,
            margin=margin,
        )
    raise ValueError(f"unknown learned router kind {kind!r}")


def _prior(data: TrainingSet, rows: np.ndarray) -> np.ndarray:
    """Each column's mean measured score on ``rows``; a column measured on none of them
    gets the base model's (or one half, when nothing at all was measured)."""
    known = data.known[rows]
    counts = known.sum(axis=0)
    sums = (data.correct[rows] * known).sum(axis=0)
    base = sums[0] / counts[0] if counts[0] else 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        prior = np.where(counts > 0, sums / np.maximum(counts, 1), base)
    return prior.astype(np.float32)


def _logistic(
    data: TrainingSet, rows: np.ndarray, prior: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per column on what is known of it: its measured scores on
    ``rows`` (solved or not) and its own example prompts (solved). A column with one class
    only predicts its prior everywhere."""
    from sklearn.linear_model import LogisticRegression

    columns = len(data.version_ids) + 1
    dims = data.points.shape[1]
    weights = np.zeros((columns, dims), dtype=np.float32)
    bias = np.zeros(columns, dtype=np.float32)
    dense = data.points[rows]
    prompts = data.points[data.scored :]
    for column in range(columns):
        mask = data.known[rows, column]
        own = data.owner == column
        x = np.concatenate([dense[mask], prompts[own]])
        y = np.concatenate([data.correct[rows, column][mask] >= SOLVED, np.ones(own.sum(), bool)])
        if len(y) >= 2 and 0 < y.sum() < len(y):
            fitted = LogisticRegression(C=c, max_iter=1000).fit(x, y)
            weights[column] = fitted.coef_[0]
            bias[column] = fitted.intercept_[0]
        else:
            p = float(np.clip(y.mean() if len(y) else prior[column], 0.02, 0.98))
            bias[column] = np.log(p / (1.0 - p))
    return weights, bias


def _folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Shuffled folds of the scored rows; none when there are too few to hold any out."""
    if n < MIN_SCORED:
        return []
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, min(folds, n))]
