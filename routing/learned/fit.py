"""Fitting the learned router: a k-nearest-neighbour model and a linear one, each tuned and
compared by cross-validated routing accuracy; pure numpy and scikit-learn, no database.

Routing accuracy is the scoreboard's: among held-out examples some candidate solves (score
at least 0.5), the share where the candidate the router picks (by the serving rule: the
best adapter if it beats the base model's prediction, else the base model) solves it. Only
public benchmark examples are held out; contributors' example prompts always stay in the
training folds, as they say something about one adapter only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from routing.router.learned import KINDS, LearnedRouterModel

SOLVED = 0.5
KS = (40, 20, 10, 5, 3, 1)  # largest first: on a tie the smoother model wins
CS = (0.1, 1.0, 10.0)  # strongest regularisation first, for the same reason
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


@dataclass(frozen=True)
class Fitted:
    model: LearnedRouterModel
    kind: str
    params: dict
    # {kind: {"accuracy": best cross-validated accuracy or None, "params": its params,
    #         "grid": [{"params": ..., "accuracy": ...}, ...], "n": examples it was over}}
    cv: dict = field(default_factory=dict)


def fit_best(
    data: TrainingSet,
    *,
    kinds: Sequence[str] = KINDS,
    ks: Sequence[int] = KS,
    cs: Sequence[float] = CS,
    folds: int = FOLDS,
    seed: int = 0,
) -> Fitted:
    """Tune each kind in ``kinds`` by cross-validation, keep the best one (ties: the first
    kind listed), refit it on everything."""
    grids = {"knn": [{"k": k} for k in ks], "linear": [{"C": c} for c in cs]}
    splits = _folds(data.scored, folds, seed)
    cv: dict = {}
    best: tuple[float, str, dict] | None = None
    for kind in kinds:
        results = []
        for params in grids[kind]:
            accuracy, n = cross_validated(data, kind, params, splits)
            results.append({"params": params, "accuracy": accuracy})
        scored = [r for r in results if r["accuracy"] is not None]
        top = max(scored, key=lambda r: r["accuracy"]) if scored else results[0]
        cv[kind] = {"accuracy": top["accuracy"], "params": top["params"], "grid": results, "n": n}
        value = -1.0 if top["accuracy"] is None else top["accuracy"]
        if best is None or value > best[0]:
            best = (value, kind, top["params"])
    assert best is not None, "at least one kind to fit"
    _value, kind, params = best
    model = fit(data, kind, params, rows=np.arange(data.scored))
    return Fitted(model=model, kind=kind, params=params, cv=cv)


def cross_validated(
    data: TrainingSet, kind: str, params: dict, splits: list[np.ndarray]
) -> tuple[float | None, int]:
    """(routing accuracy over every held-out fold, how many solvable examples it is over);
    None when there was nothing to hold out or nothing solvable."""
    solved = n = 0
    everything = np.arange(data.scored)
    for held in splits:
        train = np.setdiff1d(everything, held)
        if not len(train) and not len(data.owner):
            continue
        model = fit(data, kind, params, rows=train)
        hits, count = routing_accuracy_counts(model, data, held)
        solved, n = solved + hits, n + count
    return (solved / n if n else None), n


def routing_accuracy_counts(
    model: LearnedRouterModel, data: TrainingSet, rows: np.ndarray
) -> tuple[int, int]:
    """(solvable rows among ``rows`` whose pick solves them, solvable rows)."""
    if not len(rows):
        return 0, 0
    predicted = model.predict(data.points[rows])
    picks = picks_of(predicted)
    solves = data.known[rows] & (data.correct[rows] >= SOLVED)
    solvable = solves.any(axis=1)
    hit = solves[np.arange(len(rows)), picks]
    return int((hit & solvable).sum()), int(solvable.sum())


def picks_of(predicted: np.ndarray) -> np.ndarray:
    """The serving rule over every column: the best adapter if it beats the base model's
    prediction, else the base model (column 0)."""
    if predicted.shape[1] == 1:
        return np.zeros(len(predicted), dtype=np.intp)
    best = 1 + np.argmax(predicted[:, 1:], axis=1)
    beats = predicted[np.arange(len(predicted)), best] > predicted[:, 0]
    return np.where(beats, best, 0)


def fit(data: TrainingSet, kind: str, params: dict, *, rows: np.ndarray) -> LearnedRouterModel:
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
