"""Making a FAISS index from a store in bounded memory: create, train on a sample, add chunk by chunk.

Nothing here holds the store's N x D vectors: training reads a random sample of rows
(:meth:`~tl_embed.embedding.store.EmbeddingStore.take`, cost O(sample)), and adding streams
:meth:`~tl_embed.embedding.store.EmbeddingStore.iter_chunks` (64 MB at a time), normalising each chunk
for cosine (and whitening it, for an index that whitens: :class:`Space`).  Peak memory is the index being
built + the training sample + one chunk.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .choose import POINTS_PER_LIST, check_trainable, training_points
from .whiten import FIT_ROWS, Whitening, from_moments

TRAIN_MIN, TRAIN_MAX = 50_000, 150_000  # training sample rows (bounded: 770 MB at 1280-d)
FIT_CHUNK = 8_192  # rows of the whitening's sample read at a time
ADD_BATCH = 16_384  # rows per add when adding scattered rows (an update)


@dataclass(frozen=True)
class Space:
    """What an index compares: vectors prepared for its metric, then whitened if the index whitens.

    The one map from a store's (or a query's) vectors to what the index holds and is searched with:
    building, updating, measuring, re-ranking and every query go through it.
    """

    metric: str
    whitening: Whitening | None = None

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        x = prepare_vectors(vectors, self.metric)
        return x if self.whitening is None else self.whitening.apply(x)

    def dim(self, given: int) -> int:
        """The dimension of the mapped vectors of ``given``-dimensional ones."""
        return given if self.whitening is None else self.whitening.dim


def load_faiss():
    import faiss

    return faiss


def new_index(factory: str, dim: int, metric: str):
    """An empty index for ``factory`` that takes the store's ids (wrapped in an ID map if it cannot)."""
    faiss = load_faiss()
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise TlEmbedError(f"bad FAISS factory string {factory!r}: {faiss_reason(e)}") from None
    for layer in layers(index):
        if hasattr(layer, "do_polysemous_training"):  # PQ: minutes of annealing for a search mode we never use
            layer.do_polysemous_training = False
        if hasattr(layer, "pq") and layer.pq.M >= 64:
            # hundreds of tiny k-means (one per sub-quantizer) take minutes; one code book shared by
            # all sub-quantizers trains in a second, and re-ranking repairs the coarser shortlist
            layer.pq.train_type = faiss.ProductQuantizer.Train_shared
        if hasattr(layer, "use_precomputed_table"):  # IVF-PQ L2 tables: nlist x d x 256 floats, GBs at 1280-d
            layer.use_precomputed_table = -1
    return index if _takes_ids(index) else faiss.IndexIDMap2(index)


def layers(index) -> Iterator:
    """The index and those it wraps (behind transforms, ID maps, refinement), outermost first."""
    faiss = load_faiss()
    yield index
    for name in ("index", "base_index", "refine_index"):
        inner = getattr(index, name, None)
        if isinstance(inner, faiss.Index):
            yield from layers(faiss.downcast_index(inner))


def _takes_ids(index) -> bool:
    """Whether ``add_with_ids`` works as is: IVF indexes (also behind PCA/OPQ transforms) and ID maps."""
    faiss = load_faiss()
    core = next(i for i in layers(index) if not isinstance(i, faiss.IndexPreTransform))
    return isinstance(core, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def build_streaming(store: EmbeddingStore, factory: str, space: Space, skip: np.ndarray):
    """A new index of every store row except positions ``skip`` (sorted), trained on a sample."""
    n = len(store)
    check_trainable(factory, n)
    index = new_index(factory, space.dim(store.dim), space.metric)
    with faiss_errors(f"build the {factory} index"):
        if not index.is_trained:
            index.train(training_sample(store, factory, space, skip))
        for start, ids, chunk in store.iter_chunks():
            lo, hi = np.searchsorted(skip, [start, start + len(ids)])
            keep = np.ones(len(ids), bool)
            keep[skip[lo:hi] - start] = False
            index.add_with_ids(space(chunk[keep]), np.ascontiguousarray(ids[keep]))
    return index


def training_sample(store: EmbeddingStore, factory: str, space: Space, skip: np.ndarray) -> np.ndarray:
    """Random rows to train on, outside ``skip`` when there are enough of them.

    Size: TRAIN_MIN, or 64 per IVF list (FAISS warns below 39), at most TRAIN_MAX and the store.
    """
    n = len(store)
    nlist = max([int(m) for m in re.findall(r"IVF(\d+)", factory)] or [0])
    want = min(n, max(TRAIN_MIN, 64 * nlist, training_points(factory)), max(TRAIN_MAX, POINTS_PER_LIST * nlist))
    pool = np.setdiff1d(np.arange(n), skip) if n - len(skip) >= want else np.arange(n)
    rows = np.sort(np.random.default_rng(1).choice(pool, want, replace=False))
    return space(store.take(rows))


def fit_whitening(store: EmbeddingStore, dim: int | None, power: float, seed: int = 0) -> Whitening:
    """A whitening (:mod:`.whiten`) fitted on the store's L2-normalised vectors: a random sample of FIT_ROWS
    when larger, streamed (their sum and X^T X, never the sample at once)."""
    n = len(store)
    rows = np.sort(np.random.default_rng(seed).choice(n, FIT_ROWS, replace=False)) if n > FIT_ROWS else np.arange(n)
    total, gram = np.zeros(store.dim), np.zeros((store.dim, store.dim))
    for start in range(0, len(rows), FIT_CHUNK):
        x = prepare_vectors(store.take(rows[start:start + FIT_CHUNK]), "cosine")
        total += x.sum(0, dtype=np.float64)
        gram += x.T @ x
    return from_moments(len(rows), total, gram, dim, power)


def add_positions(index, store: EmbeddingStore, space: Space, positions: np.ndarray) -> None:
    """Add the store rows at ``positions`` (scattered, e.g. an update's new rows), batch by batch."""
    ids = store.ids
    for start in range(0, len(positions), ADD_BATCH):
        part = positions[start:start + ADD_BATCH]
        index.add_with_ids(space(store.take(part)), np.ascontiguousarray(ids[part]))


def can_remove(index) -> bool:
    """Whether the index type implements remove_ids (IVF, Flat in an ID map: yes; HNSW, NSG: no)."""
    try:
        index.remove_ids(np.zeros(0, np.int64))
    except RuntimeError:
        return False
    return True


def indexed_vectors(index, ids: np.ndarray, dim: int) -> np.ndarray:
    """The vectors ``index`` holds for store ids (any shape; zeros for -1), as FAISS reconstructs them:
    exactly for Flat, HNSW-Flat and IVF-Flat, decoded from their codes for the others.

    An IVF index is given a hash-table direct map (id -> list entry) first, if it has none.
    """
    faiss = load_faiss()
    ivf = next((layer for layer in layers(index) if isinstance(layer, faiss.IndexIVF)), None)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    flat = np.asarray(ids, np.int64).ravel()
    out = np.zeros((len(flat), dim), np.float32)
    if (flat >= 0).any():
        out[flat >= 0] = index.reconstruct_batch(np.ascontiguousarray(flat[flat >= 0]))
    return out.reshape(*np.shape(ids), dim)


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, contiguous, and L2-normalised for cosine (inner product of unit vectors).

    Each row is first divided by its largest magnitude: the float32 norm of a valid vector overflows to
    inf from ~1e19 per element and underflows to 0 below ~1e-19, and cosine depends on the direction only.
    An all-zero row stays zero.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        peak = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1), np.float32)
        x = x / np.where(peak > 0, peak, 1)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


@contextlib.contextmanager
def faiss_errors(what: str) -> Iterator[None]:
    """FAISS's C++ exceptions as one user-facing line naming what failed, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        raise TlEmbedError(f"FAISS failed to {what}: {faiss_reason(e)}") from None


def faiss_reason(e: BaseException) -> str:
    """The message of a FAISS exception without its C++ function signature and source location."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", lines[-1])
