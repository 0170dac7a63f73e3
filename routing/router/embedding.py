"""The embedding router's arithmetic: every signature of a catalog stacked once, so scoring a
request against a thousand adapters is one matrix-vector product.

A Catalog is immutable and replaced wholesale when the mixture changes, so the stacked matrix
is cached per Catalog object (weakly: it goes with the catalog). Measured on this machine's
kind (2 CPU cores, 1 torch thread, benchmarks/bench_router.py): a whole decision among 1,000
adapters with the request already embedded takes about 0.5 ms (candidates, the product,
the top 5), embedding the request about 14 ms, and stacking 1,000 signatures, once per
mixture, about 2.4 ms.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluation.worker.signatures import DIMENSIONS
from routing.catalog import Catalog, ServedAdapter


@dataclass(frozen=True)
class SignatureMatrix:
    """The signatures of a catalog's adapters that have one, one unit row each."""

    matrix: np.ndarray  # [n, dims] float32, rows L2-normalised
    row_of: dict[ServedAdapter, int]  # ServedAdapter hashes by identity (eq=False)


_cache: weakref.WeakKeyDictionary[Catalog, SignatureMatrix] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def signature_matrix(catalog: Catalog) -> SignatureMatrix:
    """The catalog's stacked signatures, built on first use and kept while the catalog lives."""
    with _cache_lock:
        cached = _cache.get(catalog)
    if cached is not None:
        return cached
    # Built outside the lock: two requests racing on a fresh catalog both build the same
    # value, which is cheaper than making every request wait on one lock.
    built = _build(catalog.adapters)
    with _cache_lock:
        return _cache.setdefault(catalog, built)


def _build(adapters: Sequence[ServedAdapter]) -> SignatureMatrix:
    signed = [adapter for adapter in adapters if adapter.signature is not None]
    vectors = [np.asarray(adapter.signature, dtype=np.float32).reshape(-1) for adapter in signed]
    # A signature of another size than the embedding model's can match nothing: such an
    # adapter stays reachable by explicit and arrow routing only, like one without one.
    kept = [i for i, vector in enumerate(vectors) if vector.shape[0] == DIMENSIONS]
    matrix = np.stack([vectors[i] for i in kept]) if kept else np.zeros((0, DIMENSIONS))
    norms = np.linalg.norm(matrix, axis=1)
    # So is one with no direction (zero or not finite).
    usable = np.isfinite(norms) & (norms > 0)
    matrix = matrix[usable] / norms[usable, None]  # evaluation stores them normalised already
    row_of = {signed[i]: row for row, i in enumerate(np.asarray(kept)[usable].tolist())}
    return SignatureMatrix(matrix=np.ascontiguousarray(matrix, dtype=np.float32), row_of=row_of)


def embedding_scores(
    *, catalog: Catalog, candidates: Sequence[ServedAdapter], query: np.ndarray
) -> tuple[list[ServedAdapter], np.ndarray]:
    """(the candidates that have a signature, their cosine with ``query``), in candidate order.

    ``query`` is the request's unit embedding. One product over the whole catalog's matrix,
    then the candidates' rows picked out: cheaper than gathering a sub-matrix first when the
    candidates are most of the catalog, which is the usual case.
    """
    signatures = signature_matrix(catalog)
    scored = [adapter for adapter in candidates if adapter in signatures.row_of]
    if not scored:
        return [], np.zeros(0, dtype=np.float32)
    rows = np.fromiter((signatures.row_of[a] for a in scored), dtype=np.intp, count=len(scored))
    cosines = signatures.matrix @ np.asarray(query, dtype=np.float32).reshape(-1)
    return scored, cosines[rows]
