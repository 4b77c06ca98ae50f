"""Re-ranking with the stored vectors alone: query expansion (αQE) and database-side augmentation (αDBA).

Both come from Radenović, Tolias & Chum (TPAMI 2019, "Fine-tuning CNN image retrieval with no human
annotation"), after Chum et al.'s average query expansion and Arandjelović & Zisserman's DBA (CVPR 2012):

* αQE (search time, ``--qe N``): search, then replace the query by the normalised weighted sum of itself
  and its top N results' vectors, weights sim^α, and search again.  Images of the same object that the
  query alone ranks low share features with its top results, so the merged query reaches them.
* αDBA (index time, ``--dba N``): replace every database vector by the normalised weighted sum of itself
  and its N nearest neighbours (weights sim^α) before indexing; queries are unchanged.  The database
  vectors move towards their neighbourhoods, the same gain as QE paid once at build time.

α = 3 (Radenović et al.'s value): the weights fall quickly with similarity, so weak neighbours
hardly move a vector.  A negative similarity weighs 0, never pulling a vector away.  Everything
happens in the index's own space (after whitening), with the vectors the index holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..embedding.store import EmbeddingStore
from .build import Space, load_faiss

ALPHA = 3.0
BLOCK = 4_096  # database rows augmented at a time

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, ids)
Vectors = Callable[[np.ndarray], np.ndarray]  # ids (any shape, -1 allowed) -> their indexed vectors


def weighted_sum(x: np.ndarray, scores: np.ndarray, neighbours: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """L2-normalised ``x + sum_j max(s_j, 0)^alpha * v_j`` per row: ``x`` (b, d), scores (b, n), vectors (b, n, d).

    A neighbour that is missing (score NaN or -inf) weighs 0.
    """
    w = np.where(np.isfinite(scores), np.maximum(scores, 0), 0).astype(np.float32) ** alpha
    y = x + np.einsum("bn,bnd->bd", w, neighbours)
    return np.ascontiguousarray(y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12), np.float32)


def top_others(scores: np.ndarray, ids: np.ndarray, n: int,
               own: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` results of each row that are not its own id (ids -1 padded, scores -inf padded)."""
    keep = (ids >= 0) & (ids != np.array([-2 if o is None else o for o in own], np.int64)[:, None])
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n]  # kept results first, in rank order
    kept = np.take_along_axis(keep, order, 1)
    return (np.where(kept, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32),
            np.where(kept, np.take_along_axis(ids, order, 1), -1))


def expand_queries(q: np.ndarray, n: int, search: Search, vectors: Vectors, own: Sequence[int | None],
                   alpha: float = ALPHA) -> np.ndarray:
    """αQE: each (mapped) query merged with its top ``n`` results other than its own image ``own``."""
    scores, ids = search(q, n + 1)  # one more: a stored image finds itself first
    scores, ids = top_others(scores, ids, n, own)
    return weighted_sum(q, scores, vectors(ids), alpha)


def augment(index, store: EmbeddingStore, space: Space, n: int, search: Search, vectors: Vectors,
            alpha: float = ALPHA):
    """αDBA: a copy of the FAISS ``index`` (trained, emptied) holding every store row merged with its ``n``
    nearest neighbours, found with ``search`` over ``index`` (which holds every row, unaugmented).

    The augmented vectors are computed from the original ones only, never from each other, so the
    result does not depend on the order of the rows.  Memory: the two indexes at once.
    """
    faiss = load_faiss()
    out = faiss.clone_index(index)
    out.reset()
    ids_all = store.ids
    for start in range(0, len(store), BLOCK):
        ids = ids_all[start:start + BLOCK]
        x = space(store.take(np.arange(start, start + len(ids))))
        scores, found = top_others(*search(x, n + 1), n, ids.tolist())
        out.add_with_ids(weighted_sum(x, scores, vectors(found), alpha), np.ascontiguousarray(ids))
    return out
