"""How well an index retrieves on labelled images: mAP and recall@k, where relevant means "same label".

The measures of image retrieval benchmarks (Philbin et al., CVPR 2007; Radenović et al., CVPR 2018):
per query, average precision over its ranked list (the mean of the precision at the rank of each relevant
image, relevant images never retrieved counting as 0), averaged over the queries; and recall@k, the share
of queries with at least one relevant image among the first k (re-identification's rank-k accuracy).
By default every labelled image of the index's store is a query against all the others (itself left out,
also of its query expansion); ``queries`` names another store of the same backbone instead (e.g. query
photos embedded apart from the database).  A query whose label no other indexed image has is skipped.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from ..embedding.backbones import check_compatible
from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from ..wording import count
from .index import Index
from .storage import lookup

KS = (1, 5, 10)
DEPTH = 10_000  # ranked list per query: all of a smaller index
BATCH = 256  # queries searched together


@dataclass
class RetrievalScores:
    mean_ap: float  # mAP, 0..1
    recall: dict[int, float]  # k -> share of queries with a relevant image in the first k
    queries: int
    skipped: int  # labelled queries without any other image of their label in the index
    depth: int  # length of each ranked list
    qe: int

    def to_dict(self) -> dict:
        return {**asdict(self), "recall": {str(k): v for k, v in self.recall.items()}}

    def describe(self) -> str:
        recall = ", ".join(f"recall@{k} {100 * v:.1f}" for k, v in self.recall.items())
        return (f"mAP {100 * self.mean_ap:.1f}, {recall} (in %, over {count(self.queries, 'query')}"
                f"{f'; {self.skipped} without another image of their label skipped' if self.skipped else ''}"
                f"{f'; query expansion {self.qe}' if self.qe else ''})")


def average_precision(relevant: np.ndarray, total: int) -> float:
    """AP of one ranked list: ``relevant`` (bool, best first), ``total`` relevant images in the database."""
    hits = np.cumsum(relevant)
    ranks = np.flatnonzero(relevant) + 1
    return float((hits[ranks - 1] / ranks).sum() / total) if total else 0.0


def score_rankings(ranked: np.ndarray, query_labels: np.ndarray, totals: np.ndarray,
                   ks: tuple[int, ...] = KS) -> tuple[float, dict[int, float]]:
    """(mAP, recall@k) of ranked label codes (queries x depth, -1 for none) against each query's label."""
    relevant = ranked == query_labels[:, None]
    aps = [average_precision(r, t) for r, t in zip(relevant, totals, strict=True)]
    recall = {k: float(relevant[:, :k].any(axis=1).mean()) for k in ks}
    return float(np.mean(aps)), recall


def evaluate_search(index: Index | str | os.PathLike, queries: str | os.PathLike | None = None, qe: int = 0,
                    limit: int | None = None, ks: tuple[int, ...] = KS) -> RetrievalScores:
    """Score ``index`` on its store's labels (``tl-embed evaluate-search``); see the module's description.

    ``limit``: at most this many queries, evenly spread over them (a sample, for large stores).
    """
    idx = index if isinstance(index, Index) else Index.open(index)
    with EmbeddingStore.open(idx.meta["store"], "r") as store:
        uid = store.uid
        codes, names = _codes(store.labels)
        pos = lookup(store.ids, np.argsort(store.ids, kind="stable"), idx.ids)
        db_codes = np.where(pos >= 0, codes[np.maximum(pos, 0)], -1)  # label code of each indexed vector
        if queries is None:
            q_vectors, q_codes, own = _queries(store, codes, np.isin(store.ids, idx.ids), limit)
    if queries is not None:
        with EmbeddingStore.open(queries, "r") as qstore:
            check_compatible(idx.spec, qstore.spec, f"query store {queries}")
            known = np.array([-1 if label is None else names.get(str(label), -2) for label in qstore.labels],
                             np.int64)  # -2: a label the index's store lacks
            q_vectors, q_codes, own = _queries(qstore, known, np.ones(len(qstore), bool), limit)
            if qstore.uid != uid:  # another store's ids say nothing about the index's images
                own = np.full(len(own), -1, np.int64)
    per_label = np.bincount(db_codes[db_codes >= 0], minlength=len(names))
    totals = np.where(q_codes >= 0, per_label[np.maximum(q_codes, 0)], 0) - np.isin(own, idx.ids)
    keep = totals > 0
    if not keep.any():
        raise TlEmbedError(f"no query has another image of its label in index {idx.path}: label the images "
                           "(one folder per label) or give --queries from a labelled store")
    depth = min(len(idx), DEPTH)
    ranked = np.concatenate([_ranked(idx, q_vectors[b:b + BATCH][keep[b:b + BATCH]],
                                     own[b:b + BATCH][keep[b:b + BATCH]], depth, qe, db_codes)
                             for b in range(0, len(q_codes), BATCH) if keep[b:b + BATCH].any()])
    mean_ap, recall = score_rankings(ranked, q_codes[keep], totals[keep], ks)
    return RetrievalScores(mean_ap, recall, int(keep.sum()), int((~keep).sum()), depth, qe)


def _codes(labels: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Integer codes of labels (-1 for none) and the label -> code map."""
    names: dict[str, int] = {}
    codes = np.array([-1 if label is None else names.setdefault(str(label), len(names)) for label in labels],
                     np.int64)
    return codes, names


def _queries(store: EmbeddingStore, codes: np.ndarray, usable: np.ndarray,
             limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, label codes, own ids) of the store's labelled, usable rows, evenly thinned to ``limit``."""
    rows = np.flatnonzero(usable & (codes != -1))
    if limit is not None and len(rows) > limit:
        rows = rows[np.round(np.linspace(0, len(rows) - 1, limit)).astype(np.int64)]
    return store.take(rows), codes[rows], store.ids[rows].astype(np.int64)


def _ranked(idx: Index, vectors: np.ndarray, own: np.ndarray, depth: int, qe: int,
            db_codes: np.ndarray) -> np.ndarray:
    """Label codes (-1: unlabelled or none) of each query's ranked list, its own image left out."""
    exclude = [int(o) if o >= 0 else None for o in own]
    _, ids = idx.search_scored(vectors, min(depth + 1, len(idx)), qe, exclude)
    ids = np.array([np.concatenate([row[(row != o) & (row >= 0)], np.full(depth, -1)])[:depth]
                    for row, o in zip(ids, own, strict=True)])
    rows = idx.table.position(ids.ravel()).reshape(ids.shape)
    return np.where(rows >= 0, db_codes[np.maximum(rows, 0)], -1)
