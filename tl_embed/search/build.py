"""Making a FAISS index from a store in bounded memory: create, train on a sample, add chunk by chunk.

Nothing here holds the store's N x D vectors: training reads a random sample of rows
(:meth:`~tl_embed.embedding.store.EmbeddingStore.take`, cost O(sample)), and adding streams
:meth:`~tl_embed.embedding.store.EmbeddingStore.iter_chunks` (64 MB at a time), normalising each chunk
for cosine.  Peak memory is the index being built + the training sample + one chunk.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .choose import POINTS_PER_LIST, check_trainable, training_points

TRAIN_MIN, TRAIN_MAX = 50_000, 150_000  # training sample rows (bounded: 770 MB at 1280-d)
ADD_BATCH = 16_384  # rows per add when adding scattered rows (an update)


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


def build_streaming(store: EmbeddingStore, factory: str, metric: str, skip: np.ndarray):
    """A new index of every store row except positions ``skip`` (sorted), trained on a sample."""
    n = len(store)
    check_trainable(factory, n)
    index = new_index(factory, store.dim, metric)
    with faiss_errors(f"build the {factory} index"):
        if not index.is_trained:
            index.train(training_sample(store, factory, metric, skip))
        for start, ids, chunk in store.iter_chunks():
            lo, hi = np.searchsorted(skip, [start, start + len(ids)])
            keep = np.ones(len(ids), bool)
            keep[skip[lo:hi] - start] = False
            index.add_with_ids(prepare_vectors(chunk[keep], metric), np.ascontiguousarray(ids[keep]))
    return index


def training_sample(store: EmbeddingStore, factory: str, metric: str, skip: np.ndarray) -> np.ndarray:
    """Random rows to train on, outside ``skip`` when there are enough of them.

    Size: TRAIN_MIN, or 64 per IVF list (FAISS warns below 39), at most TRAIN_MAX and the store.
    """
    n = len(store)
    nlist = max([int(m) for m in re.findall(r"IVF(\d+)", factory)] or [0])
    want = min(n, max(TRAIN_MIN, 64 * nlist, training_points(factory)), max(TRAIN_MAX, POINTS_PER_LIST * nlist))
    pool = np.setdiff1d(np.arange(n), skip) if n - len(skip) >= want else np.arange(n)
    rows = np.sort(np.random.default_rng(1).choice(pool, want, replace=False))
    return prepare_vectors(store.take(rows), metric)


def add_positions(index, store: EmbeddingStore, metric: str, positions: np.ndarray) -> None:
    """Add the store rows at ``positions`` (scattered, e.g. an update's new rows), batch by batch."""
    ids = store.ids
    for start in range(0, len(positions), ADD_BATCH):
        part = positions[start:start + ADD_BATCH]
        index.add_with_ids(prepare_vectors(store.take(part), metric), np.ascontiguousarray(ids[part]))


def can_remove(index) -> bool:
    """Whether the index type implements remove_ids (IVF, Flat in an ID map: yes; HNSW, NSG: no)."""
    try:
        index.remove_ids(np.zeros(0, np.int64))
    except RuntimeError:
        return False
    return True


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
