"""Re-ranking a lossy index's shortlist with the store's full-precision vectors.

Lossy codes (SQ8, PQ) find the right neighbours in a shortlist but score them roughly; scoring the
shortlist again on the stored float vectors restores exact scores and order at little cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .build import Space
from .storage import lookup

RERANK_BLOCK = 64  # queries re-ranked together (their shortlists' vectors in RAM at once)


class Reranker:
    """The store's full-precision vectors by id, read from its memory maps (no copy in RAM).

    The store is opened read-only only to load its id -> shard/row table, then closed: its shards
    stay mapped, so re-ranking reads just the shortlist's rows (from the page cache once warm).
    """

    def __init__(self, store: EmbeddingStore):
        self.store = store
        self.ids = store.ids
        self.order = np.argsort(self.ids, kind="stable")

    @classmethod
    def open(cls, meta: dict, index_path: Path) -> Reranker:
        try:
            store = EmbeddingStore.open(meta["store"], "r")
        except TlEmbedError as e:
            raise TlEmbedError(f"index {index_path} re-ranks against its store {meta['store']}, which cannot be "
                               f"opened: {e}") from None
        with store:
            if meta.get("store_uid") not in (None, store.uid):
                raise TlEmbedError(f"index {index_path} re-ranks against {meta['store']}, which is now another "
                                   "store; rebuild the index")
            return cls(store)

    def vectors(self, ids: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found) of store ids (any shape) mapped into ``space``: zeros where ``found`` is False
        (id -1, or an id the store no longer holds)."""
        flat = np.asarray(ids, np.int64).ravel()
        pos = lookup(self.ids, self.order, flat)
        ok = (flat >= 0) & (pos >= 0)
        vec = np.zeros((len(flat), space.dim(self.store.dim)), np.float32)
        if ok.any():
            vec[ok] = space(self.store.take(pos[ok]))
        return vec.reshape(*np.shape(ids), -1), ok.reshape(np.shape(ids))

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int, space: Space):
        """(scores, ids) of the best k of each query's candidates, scored on full-precision vectors.

        Candidates the store no longer holds (removed since the index was built) are dropped.
        """
        metric = space.metric
        worst = -np.inf if metric == "cosine" else np.inf
        scores = np.full((len(queries), k), worst, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for b in range(0, len(queries), RERANK_BLOCK):
            cand = candidates[b:b + RERANK_BLOCK]
            uniq, inv = np.unique(cand, return_inverse=True)
            vec, ok = self.vectors(uniq, space)
            v = vec[inv.reshape(cand.shape)]
            q = queries[b:b + RERANK_BLOCK]
            s = np.einsum("bsd,bd->bs", v, q) if metric == "cosine" else ((v - q[:, None, :]) ** 2).sum(-1)
            s[~ok[inv.reshape(cand.shape)]] = worst
            order = np.argsort(-s if metric == "cosine" else s, axis=1, kind="stable")[:, :k]
            top = np.take_along_axis(s, order, 1)
            scores[b:b + len(q), :order.shape[1]] = top
            ids[b:b + len(q), :order.shape[1]] = np.where(np.isfinite(top), np.take_along_axis(cand, order, 1), -1)
        return scores, ids
