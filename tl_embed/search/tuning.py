"""Held-out quality: recall@10, latency and QPS measured with queries the index does not hold.

Why held out: a leave-one-out measure, searching with stored vectors and dropping each query's
own id from both answers, is optimistic for HNSW (a stored vector enters the graph right next to
itself, so its neighbours are easier to reach than a fresh query's).  Here a sample of the store's rows,
the *probes*, is left out of the index while it is measured: a new build adds every other row,
measures, then adds the probes; an update removes the probes, measures, and adds them back.  The
probes are real images from the same collection, so they are as close to future queries as the
store can offer, and ground truth is exact search over exactly the rows the index held meanwhile
(streamed from the store chunk by chunk, so it costs no N x D copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..embedding.store import EmbeddingStore
from .build import Space

PROBES = 500  # held-out queries (at most a tenth of the store)
K = 10
FACTORS = (1, 2, 4, 8, 16)  # re-ranked shortlist = factor x k


def probe_positions(n: int, seed: int = 0) -> np.ndarray:
    """Sorted store rows held out of the index while it is measured."""
    count = min(PROBES, n // 10)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False)) if count else np.zeros(0, np.int64)


def exact_truth(store: EmbeddingStore, queries: np.ndarray, space: Space, k: int, skip: np.ndarray) -> np.ndarray:
    """Store ids of the exact k nearest rows to each (mapped) query in ``space``, leaving out rows ``skip``."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start, ids, chunk in store.iter_chunks():
        x = space(chunk)
        s = queries @ x.T if space.metric == "cosine" else 2 * queries @ x.T - (x * x).sum(1)  # larger is nearer
        lo, hi = np.searchsorted(skip, [start, start + len(x)])
        s[:, skip[lo:hi] - start] = -np.inf
        s = np.concatenate([best_s, s], 1)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(queries), len(ids)))], 1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, 1)
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return np.where(np.isfinite(best_s), best_i, -1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@k: the share of the exact top-k ids (those that exist) that the index also returned."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)


@dataclass
class Quality:
    recall: float
    params: dict
    reached: bool
    latency_ms: float
    qps: float
    queries: int

    def to_meta(self, target: float) -> dict:
        return {"recall_at_10": round(self.recall, 4), "search_params": self.params, "recall_queries": self.queries,
                "target_recall": target, "target_reached": self.reached, "latency_ms": round(self.latency_ms, 3),
                "qps": round(self.qps, 1), "recall_measure": "held-out"}


def tune(index, queries: np.ndarray, truth: np.ndarray, target: float) -> Quality:
    """The cheapest nprobe/efSearch (and re-rank shortlist) reaching ``target`` recall@10, measured.

    ``index`` is an :class:`~tl_embed.search.index.Index` holding everything but the probes.
    """
    k = truth.shape[1]
    knob, values = index.knob()
    params = {"rerank_factor": FACTORS[-1]} if index.rerank else {}
    reached = False
    for value in values or [None]:
        if knob:
            params[knob] = value
        index.set_params(params)
        got = recall(index.search_ids(queries, k), truth)
        if got >= target:
            reached = True
            break
    if index.rerank and reached:  # now the smallest shortlist that keeps the target
        for factor in FACTORS:
            index.set_params({**params, "rerank_factor": factor})
            if (r := recall(index.search_ids(queries, k), truth)) >= target:
                params["rerank_factor"], got = factor, r
                break
    index.set_params(params)
    latency, qps = speed(index, queries, k)
    return Quality(float(got), params, reached, latency, qps, len(queries))


def speed(index, queries: np.ndarray, k: int, singles: int = 100) -> tuple[float, float]:
    """(median ms of one query searched alone, queries per second of the whole batch)."""
    times = []
    for q in queries[:singles]:
        t = time.perf_counter()
        index.search_ids(q[None, :], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    index.search_ids(queries, k)
    batch = time.perf_counter() - t
    return 1000 * float(np.median(times)) if times else 0.0, len(queries) / batch if batch else 0.0
