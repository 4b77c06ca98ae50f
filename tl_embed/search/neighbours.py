"""Each stored vector's k nearest neighbours (cosine), for the whole store: the k-NN graph.

What the audit reads to find outliers and to show the evidence beside each finding.  Up to
``exact_max`` vectors the graph is exact (a flat inner-product index of all of them); beyond, the
candidates come from the same PCA-reduced IVF index as ``dedup``'s ANN mode (2k + 1 per vector) and
are scored again on the store's full vectors, so every similarity reported is exact and only the
choice of neighbours is approximate.
"""

from __future__ import annotations

import math

import numpy as np

from ..embedding.store import EmbeddingStore
from .build import load_faiss, prepare_vectors
from .dedup import (
    EXACT_PAIRS_MAX,
    PCA_SAMPLES,
    SEARCH_BATCH,
    VERIFY_BYTES,
    Pairs,
    canonical_pairs,
    fit_projection,
    ivf_index,
    normalised_chunks,
    progress_bar,
)


def nearest_neighbours(store: EmbeddingStore, k: int = 10, exact_max: int = EXACT_PAIRS_MAX,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positions), each (N, k): every row's k nearest other rows, nearest first.

    Rows with fewer than k others are padded with position -1 and similarity -inf.
    """
    n = len(store)
    k = max(1, int(k))
    if n <= exact_max:
        sims, idx = _exact(store, k, progress)
    else:
        sims, idx = _approximate(store, k, progress)
    return sims, idx


def graph_pairs(sims: np.ndarray, nbrs: np.ndarray, threshold: float) -> Pairs:
    """The pairs (i < j, each once) the graph links at cosine >= ``threshold``: near-duplicates, no new search.

    Past ``exact_max`` rows this finds what ``dedup``'s ANN mode finds from more candidates per row
    (each row's ``2k + 1`` nearest in the reduced space, scored exactly), and costs nothing more once
    the graph is built; only a pair outside both rows' k nearest is missed.
    """
    rows = np.broadcast_to(np.arange(len(nbrs))[:, None], nbrs.shape)
    near = (nbrs >= 0) & (sims >= threshold - 1e-6)
    return canonical_pairs(len(nbrs), rows[near], nbrs[near], sims[near])


def _top_k_without_self(rows: np.ndarray, sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own position from its candidates, keep the k best (padded with -1 / -inf)."""
    sims = np.where((idx == rows[:, None]) | (idx < 0), -np.inf, sims).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_s, top_i = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
    top_i = np.where(np.isfinite(top_s), top_i, -1)
    if top_s.shape[1] < k:
        pad = k - top_s.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s, top_i


def _exact(store: EmbeddingStore, k: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    faiss = load_faiss()
    index = faiss.IndexFlatIP(store.dim)
    for _, x in normalised_chunks(store, "neighbours: reading", progress):
        index.add(x)
    n = len(store)
    sims = np.empty((n, k), np.float32)
    idx = np.empty((n, k), np.int64)
    for start, x in normalised_chunks(store, "neighbours: exact search", progress):
        s, i = index.search(x, min(k + 1, n))
        rows = np.arange(start, start + len(x))
        sims[start:start + len(x)], idx[start:start + len(x)] = _top_k_without_self(rows, s, i, k)
    return sims, idx


def _approximate(store: EmbeddingStore, k: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from faiss.contrib.ivf_tools import search_preassigned

    n = len(store)
    project = fit_projection(store, PCA_SAMPLES, progress, task="neighbours")
    reduced = np.empty((n, project(np.zeros((1, store.dim), np.float32)).shape[1]), np.float16)
    for start, x in normalised_chunks(store, "neighbours: projecting", progress):
        reduced[start:start + len(x)] = project(x)
    index, probes = ivf_index(reduced, progress, task="neighbours")
    wanted = min(2 * k + 1, n)
    candidates = np.full((n, wanted), -1, np.int64)
    with progress_bar(n, "neighbours: candidates", progress) as bar:
        for start in range(0, n, SEARCH_BATCH):
            q = reduced[start:start + SEARCH_BATCH].astype(np.float32)
            _, found = search_preassigned(index, q, wanted, probes[start:start + len(q)].astype(np.int64))
            candidates[start:start + len(q)] = found
            bar.update(len(q))
    del index, reduced, probes
    sims = _exact_scores(store, candidates, progress)
    top_s, top_i = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for lo in range(0, n, SEARCH_BATCH):  # in blocks: the sort's temporaries stay small
        rows = np.arange(lo, min(n, lo + SEARCH_BATCH))
        top_s[rows], top_i[rows] = _top_k_without_self(rows, sims[rows], candidates[rows], k)
    return top_s, top_i


def _exact_scores(store: EmbeddingStore, candidates: np.ndarray, progress: bool) -> np.ndarray:
    """The exact cosine of every row with each of its candidates (-inf for none or itself), (n, w).

    Reading each candidate's vector at random would fault in pages all over the store (~40 us a row,
    and the store's size in RSS); instead a block of rows is held normalised in memory while the whole
    store streams past once, and each candidate is scored when its chunk goes by: sequential reads only,
    a pass per :data:`VERIFY_BYTES` of rows.
    """
    n, w = candidates.shape
    sims = np.full((n, w), -np.inf, np.float32)
    block = max(1, VERIFY_BYTES // (store.dim * 4))
    passes = math.ceil(n / block)
    with progress_bar(n * passes, "neighbours: exact scores", progress) as bar:
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            held = np.empty((hi - lo, store.dim), np.float32)
            for sub in range(lo, hi, SEARCH_BATCH):  # filled a slice at a time: no second block-sized copy
                held[sub - lo:sub - lo + SEARCH_BATCH] = prepare_vectors(
                    store.take(np.arange(sub, min(hi, sub + SEARCH_BATCH))), "cosine")
                store.release_pages()
            flat = candidates[lo:hi].ravel()
            ok = np.flatnonzero((flat >= 0) & (flat != np.repeat(np.arange(lo, hi), w)))
            ok = ok[np.argsort(flat[ok], kind="stable")]  # by the candidate's position: chunk by chunk
            targets = flat[ok]
            scores = sims[lo:hi].reshape(-1)  # a view: written in place
            for start, _, chunk in store.iter_chunks():
                a, b = np.searchsorted(targets, [start, start + len(chunk)])
                if a < b:
                    chunk = prepare_vectors(chunk, "cosine")
                    for p in range(a, b, 4096):
                        q = ok[p:min(b, p + 4096)]
                        scores[q] = np.einsum("ij,ij->i", held[q // w], chunk[targets[p:p + len(q)] - start])
                bar.update(len(chunk))
    return sims
