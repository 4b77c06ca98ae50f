"""Near-duplicate groups in a store: vectors within a cosine threshold, joined into connected groups.

Two ways to find the pairs, both ending in the same exact check and grouping:

* ``exact``: a range search of every vector against a flat index of all of them (O(N^2), the
  reference; the index holds the N x D vectors).
* ``ann``: each vector's ``k`` nearest neighbours in a temporary IVF index over PCA-reduced vectors
  (N x 128 float32, plus a float16 copy as the queries; built from the store streamed in chunks).
  A projection never lengthens a distance, so a pair within the cosine threshold is also within the
  matching L2 radius in the reduced space: only neighbours inside it are candidates, and each
  candidate's cosine is then computed from the store's full vectors, so the answer has no false
  positives.  What it can miss is a duplicate that is not among a vector's ``k`` nearest in the
  reduced space (or not in a probed list); ``benchmarks/dedup_scale.py`` measures that against
  exact search.

Pairs become groups with scipy's connected components; no Python loop ever runs over pairs.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .build import load_faiss, prepare_vectors

MODES = ("auto", "exact", "ann")
EXACT_PAIRS_MAX = 10_000  # auto: exact all-pairs (N^2) comparison up to this many vectors, ANN candidates beyond
REDUCED_DIM = 128  # ANN candidates are searched in this many PCA dimensions
NPROBE = 16  # IVF lists searched per vector
TRAIN_PER_LIST = 16  # k-means training points per IVF list (coarse lists need few)
VERIFY_BYTES = 512 * 2**20  # full-precision vectors gathered at once to verify candidate pairs
PCA_SAMPLES = 20_000  # vectors the projection is fitted on
SEARCH_BATCH = 16_384  # vectors per FAISS add/search call

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # (i, j, cosine) with i < j, each pair once


def find_duplicates(store_path: str | os.PathLike, threshold: float = 0.95, mode: str = "auto", k: int = 10,
                    exact_max: int = EXACT_PAIRS_MAX, progress: bool = False) -> list[list[tuple[str, float]]]:
    """Groups of near-duplicate images (cosine >= threshold), largest first.

    ``mode``: ``exact`` (all pairs), ``ann`` (each vector's ``k`` nearest neighbours as candidates,
    verified exactly) or ``auto`` (exact up to ``exact_max`` vectors, ann beyond).  Groups are
    connected components; each member carries its highest similarity to another member.
    """
    if not 0 < threshold <= 1:
        raise TlEmbedError("--threshold is a cosine similarity in (0, 1]")
    if mode not in MODES:
        raise TlEmbedError(f"dedup mode must be one of {', '.join(MODES)}, not {mode!r}")
    with EmbeddingStore.open(store_path) as store:
        n = len(store)
        if n < 2:
            return []
        pairs = duplicate_pairs(store, threshold, mode, k, exact_max, progress)
        groups = _groups(n, pairs)
        if not groups:
            return []
        paths = store.paths
    best = _best_similarity(n, pairs)
    named = [[(str(store.absolute_path(paths[i])), float(best[i])) for i in g] for g in groups]
    named.sort(key=lambda g: (-len(g), g[0][0]))
    return named


def duplicate_pairs(store: EmbeddingStore, threshold: float, mode: str = "auto", k: int = 10,
                    exact_max: int = EXACT_PAIRS_MAX, progress: bool = False) -> Pairs:
    """Every pair of store rows (i < j) with cosine >= threshold, each once, by ``mode`` (see the module)."""
    exact = mode == "exact" or (mode == "auto" and len(store) <= exact_max)
    return _exact_pairs(store, threshold, progress) if exact else _ann_pairs(store, threshold, k, progress)


def progress_bar(total: int, desc: str, progress: bool):
    """A progress bar on stderr, shown only for steps that last more than a second."""
    from tqdm import tqdm

    return tqdm(total=total, unit="vec", unit_scale=True, desc=desc, disable=not progress, delay=1,
                file=sys.stderr, dynamic_ncols=True)


def normalised_chunks(store: EmbeddingStore, desc: str, progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(start, L2-normalised float32 vectors) for the whole store in bounded chunks, with a progress bar."""
    with progress_bar(len(store), desc, progress) as bar:
        for start, _, chunk in store.iter_chunks():
            yield start, prepare_vectors(chunk, "cosine")
            bar.update(len(chunk))


def canonical_pairs(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> Pairs:
    """Each unordered pair once, as i < j, sorted (self-pairs dropped)."""
    keep = i != j
    lo, hi = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[keep][first]


def _exact_pairs(store: EmbeddingStore, threshold: float, progress: bool) -> Pairs:
    """All pairs with cosine >= threshold: range search of every vector against a flat index of all."""
    faiss = load_faiss()
    index = faiss.IndexFlatIP(store.dim)
    for _, x in normalised_chunks(store, "dedup: reading", progress):
        index.add(x)
    found = []
    for start, x in normalised_chunks(store, "dedup: exact search", progress):
        lims, sims, nbrs = index.range_search(x, threshold - 1e-6)
        rows = start + np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
        found.append((rows, nbrs.astype(np.int64), sims))
    return canonical_pairs(len(store), *(np.concatenate(a) for a in zip(*found, strict=True)))


def _ann_pairs(store: EmbeddingStore, threshold: float, k: int, progress: bool) -> Pairs:
    """Pairs with cosine >= threshold among each vector's k nearest neighbours (see the module's docstring)."""
    from faiss.contrib.ivf_tools import search_preassigned

    n = len(store)
    project = fit_projection(store, PCA_SAMPLES, progress)
    reduced = np.empty((n, min(store.dim, REDUCED_DIM)), np.float16)  # the queries, and the index's input
    for start, x in normalised_chunks(store, "dedup: projecting", progress):
        reduced[start:start + len(x)] = project(x)
    index, probes = ivf_index(reduced, progress)
    radius = 2 * (1 - threshold) * 1.01 + 1e-4  # squared L2 at cosine = threshold, plus float16 rounding
    found = []
    with progress_bar(n, "dedup: neighbours", progress) as bar:
        for start in range(0, n, SEARCH_BATCH):
            q = reduced[start:start + SEARCH_BATCH].astype(np.float32)
            dist, nbrs = search_preassigned(index, q, min(k + 1, n), probes[start:start + len(q)].astype(np.int64))
            rows = np.arange(start, start + len(q))[:, None]
            near = (dist <= radius) & (nbrs >= 0) & (nbrs != rows)
            found.append((np.broadcast_to(rows, near.shape)[near], nbrs[near]))
            bar.update(len(q))
    del index, reduced, probes
    i, j = (np.concatenate(a) for a in zip(*found, strict=True))
    i, j, _ = canonical_pairs(n, i, j, np.zeros(len(i), np.float32))
    s = pair_cosines(store, i, j)
    keep = s >= threshold - 1e-6
    return i[keep], j[keep], s[keep]


def ivf_lists(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest 4 sqrt(n), with enough points per list to train."""
    nearest = round(math.log2(4 * math.sqrt(max(n, 1))))
    trainable = math.floor(math.log2(max(n / TRAIN_PER_LIST, 1)))
    return 2 ** min(nearest, trainable)


def fit_projection(store: EmbeddingStore, samples: int, progress: bool, task: str = "dedup"):
    """Centring, then projection onto the top principal axes fitted on an evenly spread sample (if dim is larger)."""
    step = max(1, len(store) // samples)
    chunks = normalised_chunks(store, f"{task}: sampling", progress)
    sample = np.concatenate([x[(-start) % step::step].copy() for start, x in chunks])  # copies: chunks are freed
    mean = sample.mean(axis=0)
    if store.dim <= REDUCED_DIM:
        return lambda x: x - mean
    from scipy.linalg import eigh

    sample -= mean
    dim = store.dim
    _, vecs = eigh(sample.T @ sample, subset_by_index=[dim - REDUCED_DIM, dim - 1])
    axes = np.ascontiguousarray(vecs, dtype=np.float32)
    return lambda x: (x - mean) @ axes


def ivf_index(reduced: np.ndarray, progress: bool, task: str = "dedup"):
    """An IVF-Flat (L2) index of the reduced vectors (ids = store positions), and each vector's probe lists.

    The coarse assignment of every vector to its nprobe nearest lists is computed once and used
    both to add it (its nearest list) and to search from it.
    """
    from faiss.contrib.ivf_tools import add_preassigned

    faiss = load_faiss()
    n, dim = reduced.shape
    nlist = ivf_lists(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    index.cp.niter = 10
    index.cp.min_points_per_centroid = TRAIN_PER_LIST  # enough for coarse lists; FAISS would warn below 39
    index.train(reduced[:: max(1, n // (nlist * TRAIN_PER_LIST))].astype(np.float32))
    index.nprobe = min(NPROBE, nlist)
    probes = np.empty((n, index.nprobe), np.int32)
    with progress_bar(n, f"{task}: indexing", progress) as bar:
        for start in range(0, n, SEARCH_BATCH):
            x = reduced[start:start + SEARCH_BATCH].astype(np.float32)
            lists = index.quantizer.search(x, index.nprobe)[1]
            add_preassigned(index, x, lists[:, 0].copy())
            probes[start:start + len(x)] = lists
            bar.update(len(x))
    return index, probes


def pair_cosines(store: EmbeddingStore, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact cosine of each pair (i[p], j[p]) from the store's full vectors.

    The rows involved are gathered (normalised, float32) in blocks of at most VERIFY_BYTES, one streamed
    pass of the store per block, so memory stays bounded however many pairs there are.
    """
    out = np.empty(len(i), np.float32)
    rows_per_block = max(2, VERIFY_BYTES // (store.dim * 4))
    pairs_per_block = max(1, len(i) if len(np.union1d(i, j)) <= rows_per_block else rows_per_block // 2)
    for lo in range(0, len(i), pairs_per_block):
        bi, bj = i[lo:lo + pairs_per_block], j[lo:lo + pairs_per_block]
        rows, inverse = np.unique(np.concatenate([bi, bj]), return_inverse=True)
        vectors = store.take(rows)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        a, b = inverse[:len(bi)], inverse[len(bi):]
        for p in range(0, len(bi), 4096):
            sims = np.einsum("ij,ij->i", vectors[a[p:p + 4096]], vectors[b[p:p + 4096]])
            out[lo + p:lo + p + len(sims)] = sims
        store.release_pages()
    return out


def _groups(n: int, pairs: Pairs) -> list[np.ndarray]:
    """Connected components of the pair graph with more than one member, each in store order."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j, _ = pairs
    if not len(i):
        return []
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    members = np.nonzero(sizes[labels] > 1)[0]  # sorted positions of every vector in a group
    order = np.argsort(labels[members], kind="stable")
    members = members[order]
    bounds = np.nonzero(np.diff(labels[members]))[0] + 1
    return np.split(members, bounds)


def _best_similarity(n: int, pairs: Pairs) -> np.ndarray:
    """Each vector's highest cosine to another member of its group (0 for vectors in no pair)."""
    i, j, s = pairs
    best = np.zeros(n, np.float32)
    np.maximum.at(best, i, s)
    np.maximum.at(best, j, s)
    return best
