"""FAISS similarity search over a store: choose, build, update, search.

The parts: :mod:`.choose` picks the index type for the vector count and memory budget,
:mod:`.build` creates and fills it from the store in bounded memory, :mod:`.tuning` measures it
with held-out queries, :mod:`.storage` keeps it on disk as one file with a compact id -> path table.

Vector ids are the store's stable item ids, so re-running ``index`` adds and removes only what
changed; an index records its store's uid and refuses updates from any other store.  Lossy codes
(SQ8, PQ) re-rank their shortlist with the store's full-precision vectors, read by id from its
memory-mapped shards, so the index needs the store at query time.  Queries given as image files are
embedded with the recorded backbone, so a query can never come from a different model than the index.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding.backbones import BackboneSpec, check_compatible
from ..embedding.store import EmbeddingStore
from ..errors import IndexDamagedError, TlEmbedError
from ..wording import count
from . import storage, tuning
from .build import add_positions, build_streaming, can_remove, faiss_errors, load_faiss, prepare_vectors
from .choose import FLAT_MAX, TYPES, advice, choose, human_size  # noqa: F401 - part of this module's API
from .rerank import Reranker
from .storage import DATA_FILE, HEADER, MAGIC, IdTable, lookup

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

    def __init__(self, path: Path, index, meta: dict, table: IdTable, reranker: Reranker | None = None):
        self.path = path
        self.faiss_index = index
        self.meta = meta
        self.table = table
        self.spec = BackboneSpec.from_dict(meta["spec"])
        self._reranker = reranker
        self.set_params(meta.get("search_params", {}))

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
              target_recall: float = TARGET_RECALL, log=print, rerank: bool | None = None) -> Index:
        """Build (or bring up to date) the index at ``out`` for the store, measure it, save it whole.

        Reads the store in one snapshot, streaming (see :mod:`.build`); the quality printed is
        measured with held-out rows (see :mod:`.tuning`).
        """
        if metric not in METRICS:
            raise TlEmbedError(f"--metric must be one of {', '.join(METRICS)}")
        out = Path(out)
        store_path = Path(store_path).resolve()
        with EmbeddingStore.open(store_path) as store:
            if len(store) == 0:
                raise TlEmbedError(f"store {store_path} is empty: nothing to index")
            choice = choose(len(store), store.dim, kind, max_memory, rerank)
            with storage.writer_lock(out):
                existing = cls._reusable(out, store, store_path, choice.factory, metric, log)
                t0 = time.perf_counter()
                table = IdTable.from_paths(store.ids, store.iter_paths(), str(store.root or ""))
                meta = {"spec": store.spec.to_dict(), "store": str(store_path), "store_uid": store.uid,
                        "root": str(store.root or "")}
                self = existing._update(store, table, meta, target_recall, log) if existing is not None else None
                if self is None:
                    self = cls._fresh(out, store, table, meta, choice, metric, target_recall)
                self.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
                self.meta.pop("memory_bytes", None)  # known once written: read back from the sizes in the header
                self.meta["memory_bytes"] = storage.write(out, self.faiss_index, self.table, self.meta)
        return self

    @classmethod
    def _fresh(cls, out: Path, store: EmbeddingStore, table: IdTable, meta: dict, choice, metric: str,
               target: float) -> Index:
        """A new index: every row but the probes, measured with the probes, then the probes added."""
        probes = tuning.probe_positions(len(store))
        index = build_streaming(store, choice.factory, metric, probes)
        meta.update({"factory": choice.factory, "metric": metric, "rerank": choice.rerank, "search_params": {}})
        self = cls(out, index, meta, table, Reranker(store) if choice.rerank else None)
        self._measure(store, probes, target)
        with faiss_errors(f"build the {choice.factory} index"):
            add_positions(index, store, metric, probes)
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
        metric = self.meta["metric"]
        with faiss_errors(f"update the {self.meta['factory']} index {self.path}"):
            if len(gone):
                self.faiss_index.remove_ids(gone)
            add_positions(self.faiss_index, store, metric, new)
        self.meta.update(meta)
        self.meta.pop("paths", None)
        self.table = table
        if self.rerank:
            self._reranker = Reranker(store)
        log(f"updated {self.path}: +{len(new)} added, -{len(gone)} removed (no rebuild)")
        if removable:
            probes = tuning.probe_positions(len(store))
            with faiss_errors(f"measure the {self.meta['factory']} index"):
                self.faiss_index.remove_ids(ids[probes])
                self._measure(store, probes, target)
                add_positions(self.faiss_index, store, metric, probes)
        return self

    def _measure(self, store: EmbeddingStore, probes: np.ndarray, target: float) -> None:
        """Tune and record quality with the probe rows as queries (the index must not hold them now)."""
        if not len(probes):
            self.meta.update({"recall_at_10": 1.0, "recall_queries": 0, "latency_ms": 0.0, "qps": 0.0,
                              "target_recall": target, "target_reached": True, "recall_measure": "held-out"})
            return
        metric = self.meta["metric"]
        queries = prepare_vectors(store.take(probes), metric)
        k = min(tuning.K, len(store) - len(probes))
        truth = tuning.exact_truth(store, queries, metric, k, probes)
        with faiss_errors(f"measure the {self.meta['factory']} index"):
            quality = tuning.tune(self, queries, truth, target)
        self.meta.update(quality.to_meta(target))
        self.meta["measured_vectors"] = int(self.faiss_index.ntotal)

    @classmethod
    def _reusable(cls, out: Path, store: EmbeddingStore, store_path: Path, factory: str, metric: str,
                  log) -> Index | None:
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
            raise TlEmbedError(f"index {out} belongs to another store ({old.meta['store']}); it was left as "
                               f"is: write the index of {store_path} to a new --out, or delete {out} to rebuild it")
        if old.meta["metric"] != metric or _family(old.meta["factory"]) != _family(factory):
            log(f"rebuilding {out}: {old.meta['factory']}/{old.meta['metric']} -> {factory}/{metric}")
            return None
        return old

    @classmethod
    def open(cls, path: str | os.PathLike) -> Index:
        """Open an index for searching; a damaged one raises :class:`IndexDamagedError`."""
        path = Path(path)
        index, table, meta = storage.read(path)
        try:
            self = cls(path, index, meta, table)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IndexDamagedError(path, f"invalid meta ({type(e).__name__}: {e})") from None
        if len(self) != len(table) or index.d != self.spec.dim:
            raise IndexDamagedError(path, f"its FAISS index ({len(self)} x {index.d}) does not match its "
                                          f"id table ({len(table)} x {self.spec.dim})")
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
        return self._reranker.rerank(q, candidates, k, self.meta["metric"])

    def search_scored(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, store ids) of the k nearest of already-embedded query vectors, best first, id -1 padded.

        The arrays alone, for callers that answer many queries (the service) and need no paths.
        """
        if k < 1:
            raise TlEmbedError(f"-k must be at least 1, not {k}")
        q = prepare_vectors(np.atleast_2d(vectors), self.meta["metric"])
        if q.shape[1] != self.spec.dim:
            raise TlEmbedError(f"query vectors have dimension {q.shape[1]}, the index {self.spec.dim}")
        with faiss_errors(f"search the {self.meta['factory']} index {self.path}"):
            return self._search(q, k)

    def search_vectors(self, vectors: np.ndarray, k: int = 10,
                       exclude: Sequence[int | None] | None = None) -> list[list[SearchHit]]:
        """Neighbours of already-embedded query vectors (same backbone as the index).

        ``exclude``: per query, the store id of its own image (None for none), left out of its hits by
        :func:`without_self`; one more neighbour is fetched, so k others are still returned.
        """
        vectors = np.atleast_2d(vectors)
        own = [None] * len(vectors) if exclude is None else list(exclude)
        scores, ids = self.search_scored(vectors, k + 1 if any(i is not None for i in own) else k)
        rows = self.table.position(ids.ravel()).reshape(ids.shape)
        hits = []
        for srow, irow, prow, skip in zip(scores, ids, rows, own, strict=True):
            row_of = {int(i): int(row) for i, row in zip(irow, prow, strict=True) if i >= 0 and row >= 0}
            found = [(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if int(i) in row_of]
            hits.append([SearchHit(r, self.table.absolute(self.table.relative(row_of[i])), s, i)
                         for r, (i, s) in enumerate(without_self(found, skip, k), 1)])
        return hits

    def search(self, queries, k: int = 10, runtime: str = "auto",
               exclude_self: bool = False) -> list[tuple[str, list[SearchHit]]]:
        """Neighbours of image files/folders, of images already in the store, or of vectors.

        Returns (query, hits) pairs; files that cannot be decoded are left out.  With ``exclude_self``
        a query that is a stored image is not listed as its own neighbour (k others are).
        """
        if isinstance(queries, np.ndarray):
            return list(zip([f"vector {i}" for i in range(len(queries))],
                            self.search_vectors(queries, k), strict=True))
        stored, to_embed = self._stored_vectors([str(q) for q in queries])
        labels = list(stored)
        own = [stored[q][0] if exclude_self else None for q in labels]
        vectors = [stored[q][1] for q in labels]
        failed: list = []
        if to_embed:
            from ..embedding.query import embed_for

            emb = embed_for(self.spec, to_embed, runtime)
            labels += [str(p) for p in emb.paths]
            own += [None] * len(emb.paths)
            vectors += list(emb.vectors)
            failed = emb.failed
        if not vectors:
            why = "; ".join(f"{p}: {reason}" for p, reason in failed[:3]) or "no image files among them"
            raise TlEmbedError(f"no readable query images ({why}{'; ...' if len(failed) > 3 else ''}); "
                               "give image files (JPEG, PNG, WebP, ...) or folders of them")
        return list(zip(labels, self.search_vectors(np.stack(vectors), k, own), strict=True))

    def _stored_vectors(self, queries: list[str]) -> tuple[dict[str, tuple[int, np.ndarray]], list[str]]:
        """Split queries into images the store already holds (their id and reused vector) and files to embed."""
        root = Path(self.meta["root"]) if self.meta["root"] else None
        found = {}
        for q in queries:
            if Path(q).is_dir():
                continue
            full = Path(q).expanduser().resolve()
            names = [str(full), q]
            if root is not None and full.is_relative_to(root):
                names.insert(0, full.relative_to(root).as_posix())
            ident = next((i for name in names if (i := self.table.id_of(name)) is not None), None)
            if ident is not None:
                found[q] = ident
        rest = [q for q in queries if q not in found]
        if not found:
            return {}, rest
        with EmbeddingStore.open(self.meta["store"]) as store:
            ids = store.ids
            pos = lookup(ids, np.argsort(ids, kind="stable"), np.fromiter(found.values(), np.int64))
            vectors = store.take(pos[pos >= 0])
        held = [q for q, p in zip(found, pos, strict=True) if p >= 0]
        return ({q: (found[q], v) for q, v in zip(held, vectors, strict=True)},
                rest + [q for q, p in zip(found, pos, strict=True) if p < 0])

    # --------------------------------------------------------------- report
    def describe(self) -> str:
        m = self.meta
        params = ", ".join(f"{k}={v}" for k, v in m.get("search_params", {}).items())
        qps = f", {m['qps']:.0f} queries/s batched" if m.get("qps") else ""
        how = "held-out" if m.get("recall_measure") == "held-out" else "leave-one-out"
        return (f"{self.path}: {m['factory']}{' + re-rank' if self.rerank else ''} ({m['metric']}"
                f"{', ' + params if params else ''}) over {len(self)} vectors from {self.spec.describe()}; "
                f"recall@10 {m['recall_at_10']:.3f} vs exact on {count(m['recall_queries'], how + ' query')}, "
                f"{m['memory_bytes'] / 1e6:.1f} MB, {m['latency_ms']:.2f} ms per single query{qps}; "
                f"built in {m['build_seconds']:.1f} s" + _notes(m, len(self)))


def without_self(found: list[tuple[int, float]], own: int | None, k: int | None = None) -> list[tuple[int, float]]:
    """The first ``k`` (default all) of ``found``, (store id, score) pairs best first, without ``own``.

    A stored image queried as itself is its own nearest neighbour, which tells nothing: ``tl-embed
    search`` and the service leave it out this way, and fetch one more than they show.
    """
    return [(i, s) for i, s in found if i != own][:k]


def _notes(meta: dict, n: int) -> str:
    """Warnings: the target was missed (and what to change), or the measure predates an update."""
    out = ""
    target = meta.get("target_recall")
    if target is not None and meta["recall_at_10"] < target:
        out += (f". WARNING: recall@10 stays below the target {target:.2f} even at the widest search; "
                + advice(meta["factory"], bool(meta.get("rerank"))))
    measured = meta.get("measured_vectors")
    if measured is not None and measured < 0.9 * n:
        out += f". Recall was measured at the last full build, on {measured} vectors: rebuild to measure it again"
    return out


def _family(factory: str) -> str:
    """Factory string without its sizes: an IVF1024 index is updated in place, not rebuilt as IVF2048."""
    return re.sub(r"\d+", "", factory)
