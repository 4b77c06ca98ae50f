"""FAISS similarity search over a store: choose, build, update, search.

The parts: :mod:`.choose` picks the index type for the vector count and memory budget,
:mod:`.build` creates and fills it from the store in bounded memory, :mod:`.tuning` measures it
with held-out queries, :mod:`.storage` keeps it on disk as one file with a compact id -> path table.

Vector ids are the store's stable item ids, so re-running ``index`` adds and removes only what
changed; an index records its store's uid and refuses updates from any other store.  Lossy codes
(SQ8, PQ) re-rank their shortlist with the store's full-precision vectors, read by id from its
memory-mapped shards, so the index needs the store at query time.  Queries given as image files are
embedded with the recorded backbone, so a query can never come from a different model than the index.

Better retrieval from the same vectors: an index may whiten (:mod:`.whiten`, fitted on its store and kept
in the index) and augment its database vectors (αDBA), and a search may expand its queries (αQE,
:mod:`.expand`).  Every vector, stored or query, reaches FAISS through the index's one :class:`.Space`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding import carried
from ..embedding.backbones import BackboneSpec, check_compatible
from ..embedding.store import EmbeddingStore
from ..errors import IndexDamagedError, TlEmbedError
from . import storage, tuning
from .build import (
    Space,
    add_positions,
    build_streaming,
    can_remove,
    faiss_errors,
    fit_whitening,
    indexed_vectors,
    load_faiss,
    prepare_vectors,
)
from .choose import FLAT_MAX, TYPES, advice, choose, human_size  # noqa: F401 - part of this module's API
from .expand import augment, expand_queries
from .queries import query_vectors
from .report import describe
from .rerank import Reranker
from .storage import DATA_FILE, HEADER, MAGIC, IdTable
from .vector_options import VectorOptions
from .whiten import Whitening

METRICS = ("cosine", "l2")
TARGET_RECALL = 0.95

__all__ = ["DATA_FILE", "HEADER", "MAGIC", "Index", "SearchHit", "choose_factory", "load_faiss",
           "prepare_vectors", "without_self"]


def choose_factory(n: int, dim: int, kind: str = "auto", max_memory: float | None = None) -> str:
    """The FAISS factory string ``--type kind`` builds for ``n`` vectors of ``dim`` (see :mod:`.choose`)."""
    return choose(n, dim, kind, max_memory).factory


@dataclass
class SearchHit:
    rank: int
    path: str
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)
    id: int = -1  # the store's id of the image


class Index:
    """A FAISS index over an embedding store; build with :meth:`build`, reopen with :meth:`open`."""

    def __init__(self, path: Path, index, meta: dict, table: IdTable, reranker: Reranker | None = None,
                 whitening: Whitening | None = None):
        self.path = path
        self.faiss_index = index
        self.meta = meta
        self.table = table
        self.spec = BackboneSpec.from_dict(meta["spec"])
        self.space = Space(meta["metric"], whitening)
        self._reranker = reranker
        self._lock = threading.Lock()  # reading vectors back may first add a direct map to an IVF index
        self.set_params(meta.get("search_params", {}))

    @property
    def dim(self) -> int:
        """The dimension of the vectors the index holds (the backbone's, or the whitened one)."""
        return self.space.dim(self.spec.dim)

    @property
    def options(self) -> VectorOptions:
        """How the index maps its store's vectors: whitening, DBA (none for an index older than them)."""
        return VectorOptions.from_meta(self.meta)

    @property
    def paths(self) -> IdTable:
        """Store id -> absolute image path of every indexed vector (a Mapping)."""
        return self.table

    @property
    def ids(self) -> np.ndarray:
        """Store ids of the indexed vectors."""
        return self.table.ids

    @property
    def rerank(self) -> bool:
        return bool(self.meta.get("rerank"))

    # ------------------------------------------------------------ build/open
    @classmethod
    def build(cls, store_path: str | os.PathLike, out: str | os.PathLike, kind: str = "auto",
              metric: str = "cosine", max_memory: float | None = None,
              target_recall: float = TARGET_RECALL, log=print, rerank: bool | None = None,
              whiten: bool = False, whiten_dim: int | None = None, whiten_power: float | None = None,
              dba: int = 0) -> Index:
        """Build (or bring up to date) the index at ``out`` for the store, measure it, save it whole.

        Reads the store in one snapshot, streaming (see :mod:`.build`); the quality printed is
        measured with held-out rows (see :mod:`.tuning`).  ``whiten`` (or a ``whiten_dim``, a
        ``whiten_power``) fits a PCA-whitening on the store (:mod:`.whiten`); ``dba`` > 0 augments every
        stored vector with that many neighbours (:mod:`.expand`); when they are refitted on an update:
        :mod:`.vector_options`.
        """
        if metric not in METRICS:
            raise TlEmbedError(f"--metric must be one of {', '.join(METRICS)}")
        opts = VectorOptions.given(metric, whiten, whiten_dim, whiten_power, dba)
        out = Path(out)
        store_path = Path(store_path).resolve()
        with EmbeddingStore.open(store_path) as store:
            if len(store) == 0:
                raise TlEmbedError(f"store {store_path} is empty: nothing to index")
            choice = choose(len(store), opts.dim(len(store), store.dim), kind, max_memory, rerank)
            opts.check(choice)
            with storage.writer_lock(out):
                existing = cls._reusable(out, store, store_path, choice.factory, metric, opts, log)
                t0 = time.perf_counter()
                table = IdTable.from_paths(store.ids, store.iter_paths(), str(store.root or ""))
                meta = {"spec": store.spec.to_dict(), "store": str(store_path), "store_uid": store.uid,
                        "root": str(store.root or "")}
                self = existing._update(store, table, meta, target_recall, log) if existing is not None else None
                if self is None:
                    self = cls._fresh(out, store, table, meta, choice, opts, target_recall)
                self.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
                self.meta.pop("memory_bytes", None)  # known once written: read back from the sizes in the header
                arrays = {**(self.space.whitening.to_arrays() if self.space.whitening else {}),
                          **carried.to_arrays(carried.read_files(store_path / carried.FOLDER))}
                self.meta["memory_bytes"] = storage.write(out, self.faiss_index, self.table, self.meta, arrays or None)
        return self

    @classmethod
    def _fresh(cls, out: Path, store: EmbeddingStore, table: IdTable, meta: dict, choice, opts: VectorOptions,
               target: float) -> Index:
        """A new index: every row but the probes, measured with the probes, then the probes added.

        With DBA, the finished index (every row) finds each row's neighbours, and a copy of it holding
        the augmented rows replaces it.
        """
        whitening = fit_whitening(store, opts.whiten_dim, opts.whiten_power) if opts.whiten else None
        space = Space(opts.metric, whitening)
        probes = tuning.probe_positions(len(store))
        index = build_streaming(store, choice.factory, space, probes)
        meta.update({"factory": choice.factory, "metric": opts.metric, "rerank": choice.rerank, "search_params": {},
                     **opts.to_meta(whitening, len(store))})
        self = cls(out, index, meta, table, Reranker(store) if choice.rerank else None, whitening)
        self._measure(store, probes, target)
        with faiss_errors(f"build the {choice.factory} index"):
            add_positions(index, store, space, probes)
            if opts.dba:
                self.faiss_index = augment(index, store, space, opts.dba, self._search, self.vectors_of)
        return self

    def _update(self, store: EmbeddingStore, table: IdTable, meta: dict, target: float, log) -> Index | None:
        """Bring the index up to date in place (remove the ids the store dropped, add its new ones).

        None when its type cannot remove (HNSW, NSG): the caller rebuilds, and the file on disk is
        untouched until the rebuilt index replaces it.  Types that can remove are measured again with
        held-out probes (removed, measured, added back); an HNSW that only grew keeps the recall
        measured at its last build.
        """
        ids = store.ids
        gone = np.setdiff1d(self.ids, ids)
        new = np.flatnonzero(~np.isin(ids, self.ids))
        removable = can_remove(self.faiss_index)
        if len(gone) and not removable:
            log(f"rebuilding {self.path}: {self.meta['factory']} cannot be updated in place "
                "(remove_ids not implemented for this type of index)")
            return None
        if why := self.options.refit(len(ids), bool(len(gone) or len(new))):
            log(f"rebuilding {self.path}: {why}")
            return None
        with faiss_errors(f"update the {self.meta['factory']} index {self.path}"):
            if len(gone):
                self.faiss_index.remove_ids(gone)
            add_positions(self.faiss_index, store, self.space, new)
        self.meta.update(meta)
        self.meta.pop("paths", None)
        self.table = table
        if self.rerank:
            self._reranker = Reranker(store)
        log(f"updated {self.path}: +{len(new)} added, -{len(gone)} removed (no rebuild)")
        if removable and not self.options.dba:  # DBA: the probes' augmented vectors are not re-made here
            probes = tuning.probe_positions(len(store))
            with faiss_errors(f"measure the {self.meta['factory']} index"):
                self.faiss_index.remove_ids(ids[probes])
                self._measure(store, probes, target)
                add_positions(self.faiss_index, store, self.space, probes)
        return self

    def _measure(self, store: EmbeddingStore, probes: np.ndarray, target: float) -> None:
        """Tune and record quality with the probe rows as queries (the index must not hold them now)."""
        if not len(probes):
            self.meta.update({"recall_at_10": 1.0, "recall_queries": 0, "latency_ms": 0.0, "qps": 0.0,
                              "target_recall": target, "target_reached": True, "recall_measure": "held-out"})
            return
        queries = self.space(store.take(probes))
        k = min(tuning.K, len(store) - len(probes))
        truth = tuning.exact_truth(store, queries, self.space, k, probes)
        with faiss_errors(f"measure the {self.meta['factory']} index"):
            quality = tuning.tune(self, queries, truth, target)
        self.meta.update(quality.to_meta(target))
        self.meta["measured_vectors"] = int(self.faiss_index.ntotal)

    @classmethod
    def _reusable(cls, out: Path, store: EmbeddingStore, store_path: Path, factory: str, metric: str,
                  opts: VectorOptions, log) -> Index | None:
        """The index already at ``out`` if it can be updated in place, else None (and say why).

        An index of another store is refused, never replaced: it may be the only copy of a long build.
        """
        if not storage.holds_index(out):
            return None
        try:
            old = cls.open(out)
        except IndexDamagedError as e:
            log(f"rebuilding {out}: it is damaged ({e.reason})")
            return None
        check_compatible(old.spec, store.spec, f"index {out}")
        same = old.meta["store_uid"] == store.uid if "store_uid" in old.meta else old.meta["store"] == str(store_path)
        if not same:
            where = "re-created at that path since" if old.meta["store"] == str(store_path) else old.meta["store"]
            raise TlEmbedError(f"index {out} belongs to another store ({where}); it was left as is: write the "
                               f"index of {store_path} to a new --out, or delete {out} to rebuild it")
        if old.meta["metric"] != metric or _family(old.meta["factory"]) != _family(factory):
            log(f"rebuilding {out}: {old.meta['factory']}/{old.meta['metric']} -> {factory}/{metric}")
            return None
        if old.options != opts:
            log(f"rebuilding {out}: {old.options.describe() or 'plain vectors'} -> "
                f"{opts.describe() or 'plain vectors'}")
            return None
        return old

    @classmethod
    def open(cls, path: str | os.PathLike) -> Index:
        """Open an index for searching; a damaged one raises :class:`IndexDamagedError`."""
        path = Path(path)
        index, table, meta, arrays = storage.read(path)
        try:
            whitening = Whitening.from_arrays(arrays) if VectorOptions.from_meta(meta).whiten else None
            self = cls(path, index, meta, table, whitening=whitening)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IndexDamagedError(path, f"invalid meta ({type(e).__name__}: {e})") from None
        carried.install(self.spec, carried.from_arrays(arrays), f"index {path}")  # queries run what it carries
        if len(self) != len(table) or index.d != self.dim or (whitening and whitening.mean.shape != (self.spec.dim,)):
            raise IndexDamagedError(path, f"its FAISS index ({len(self)} x {index.d}) does not match its "
                                          f"id table ({len(table)} x {self.dim})")
        return self

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    # ---------------------------------------------------------------- search
    def knob(self) -> tuple[str | None, list[int]]:
        """The search parameter that trades speed for recall, and the values worth trying (cheap first)."""
        faiss = load_faiss()
        factory = self.meta["factory"]
        if "IVF" in factory:
            nlist = faiss.extract_index_ivf(self.faiss_index).nlist
            return "nprobe", sorted({min(2 ** i, nlist) for i in range(nlist.bit_length() + 1)})
        if "HNSW" in factory:
            return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
        return None, []

    def set_params(self, params: dict) -> None:
        faiss = load_faiss()
        self.meta["search_params"] = dict(params)
        for name, value in params.items():
            if name != "rerank_factor":
                faiss.ParameterSpace().set_index_parameter(self.faiss_index, name, value)

    def search_ids(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Store ids of the k nearest (prepared) queries' neighbours, -1 padded."""
        return self._search(queries, k)[1]

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if not self.rerank:
            return self.faiss_index.search(q, k)
        if self._reranker is None:
            self._reranker = Reranker.open(self.meta, self.path)
        short = min(len(self), k * int(self.meta["search_params"].get("rerank_factor", 4)))
        _, candidates = self.faiss_index.search(q, short)
        return self._reranker.rerank(q, candidates, k, self.space)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The vectors the index scores store ids with (any shape of ids; zeros for -1), in its space.

        A re-ranked index scores with the store's own vectors (read by id, then mapped); any other holds
        them itself (augmented, with DBA), and FAISS reads them back.
        """
        if self.rerank:
            if self._reranker is None:
                self._reranker = Reranker.open(self.meta, self.path)
            return self._reranker.vectors(ids, self.space)[0]
        with self._lock:
            return indexed_vectors(self.faiss_index, ids, self.dim)

    def queries(self, vectors: np.ndarray, qe: int = 0, exclude: Sequence[int | None] | None = None) -> np.ndarray:
        """Already-embedded query vectors as the index compares them: mapped into its space and, with
        ``qe`` > 0, expanded with their top ``qe`` results (αQE) other than their own image ``exclude``."""
        q = np.atleast_2d(vectors)
        if q.shape[1] != self.spec.dim:
            raise TlEmbedError(f"query vectors have dimension {q.shape[1]}, the index {self.spec.dim}")
        if qe < 0:
            raise TlEmbedError(f"--qe must be 0 (off) or more, not {qe}")
        q = self.space(q)
        if qe:
            own = [None] * len(q) if exclude is None else list(exclude)
            q = expand_queries(q, min(qe, len(self)), self._search, self.vectors_of, own)
        return q

    def search_scored(self, vectors: np.ndarray, k: int = 10, qe: int = 0,
                      exclude: Sequence[int | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, store ids) of the k nearest of already-embedded query vectors, best first, id -1 padded.

        The arrays alone, for callers that answer many queries (the service) and need no paths.  ``qe``
        and ``exclude``: see :meth:`queries` (a query's own image is not removed from the answer here).
        """
        if k < 1:
            raise TlEmbedError(f"-k must be at least 1, not {k}")
        with faiss_errors(f"search the {self.meta['factory']} index {self.path}"):
            return self._search(self.queries(vectors, qe, exclude), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, exclude: Sequence[int | None] | None = None,
                       qe: int = 0) -> list[list[SearchHit]]:
        """Neighbours of already-embedded query vectors (same backbone as the index).

        ``exclude``: per query, the store id of its own image (None for none), left out of its hits by
        :func:`without_self` (and of its query expansion); one more neighbour is fetched, so k others are
        still returned.  ``qe``: expand each query with its top ``qe`` results (αQE, see :mod:`.expand`).
        """
        vectors = np.atleast_2d(vectors)
        own = [None] * len(vectors) if exclude is None else list(exclude)
        scores, ids = self.search_scored(vectors, k + 1 if any(i is not None for i in own) else k, qe, own)
        rows = self.table.position(ids.ravel()).reshape(ids.shape)
        hits = []
        for srow, irow, prow, skip in zip(scores, ids, rows, own, strict=True):
            row_of = {int(i): int(row) for i, row in zip(irow, prow, strict=True) if i >= 0 and row >= 0}
            found = [(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if int(i) in row_of]
            hits.append([SearchHit(r, self.table.absolute(self.table.relative(row_of[i])), s, i)
                         for r, (i, s) in enumerate(without_self(found, skip, k), 1)])
        return hits

    def search(self, queries, k: int = 10, runtime: str = "auto", exclude_self: bool = False,
               qe: int = 0) -> list[tuple[str, list[SearchHit]]]:
        """Neighbours of image files/folders, of images already in the store, or of vectors.

        Returns (query, hits) pairs; files that cannot be decoded are left out.  With ``exclude_self``
        a query that is a stored image is not listed as its own neighbour (k others are).  ``qe``: query
        expansion with that many top results (0: off).
        """
        if isinstance(queries, np.ndarray):
            return list(zip([f"vector {i}" for i in range(len(queries))],
                            self.search_vectors(queries, k, qe=qe), strict=True))
        labels, own, vectors = query_vectors(self.table, self.meta, self.spec, [str(q) for q in queries], runtime,
                                             exclude_self)
        return list(zip(labels, self.search_vectors(vectors, k, own, qe), strict=True))

    # --------------------------------------------------------------- report
    def describe(self) -> str:
        """One paragraph: type, metric, size, vector options, measured recall, memory, latency, warnings."""
        return describe(self.path, self.meta, len(self), self.spec.describe(), self.options.describe())


def without_self(found: list[tuple[int, float]], own: int | None, k: int | None = None) -> list[tuple[int, float]]:
    """The first ``k`` (default all) of ``found``, (store id, score) pairs best first, without ``own``.

    A stored image queried as itself is its own nearest neighbour, which tells nothing: ``tl-embed
    search`` and the service leave it out this way, and fetch one more than they show.
    """
    return [(i, s) for i, s in found if i != own][:k]


def _family(factory: str) -> str:
    """Factory string without its sizes: an IVF1024 index is updated in place, not rebuilt as IVF2048."""
    return re.sub(r"\d+", "", factory)
