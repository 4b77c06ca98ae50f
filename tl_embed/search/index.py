"""FAISS similarity search over a store: choose, build, update, search.

An index folder (``NAME.tli/``) holds ``index.faiss`` and ``meta.json`` (the store's backbone spec,
the FAISS factory string, metric, search parameters, measured quality and the id -> path map).
Vector ids are the store's stable item ids, so re-running ``index`` adds and removes only what
changed.  Queries given as image files are embedded with the recorded backbone, so a query can never
come from a different model than the index.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding.backbones import BackboneSpec, check_compatible
from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from ..files import atomic_write

METRICS = ("cosine", "l2")
TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_MAX = 100_000  # up to here exact search answers one query in a few ms
TARGET_RECALL = 0.95
INDEX_FILE, META_FILE = "index.faiss", "meta.json"


def load_faiss():
    import faiss

    return faiss


def choose_factory(n: int, dim: int, kind: str = "auto", max_memory: float | None = None) -> str:
    """A FAISS index factory string for ``n`` vectors of ``dim`` under a memory budget (bytes).

    ``auto``: exact ``Flat`` up to EXACT_MAX vectors when it fits; beyond, ``IVF{nlist},Flat``
    (nlist ~ 4 sqrt(n)); ``IVF{nlist},PQ{m}`` when the raw vectors exceed ``max_memory``.
    Anything else is taken as a factory string as is.
    """
    raw = n * dim * 4
    fits = max_memory is None or raw <= max_memory
    nlist = int(2 ** round(math.log2(max(16, min(65536, 4 * math.sqrt(max(n, 1)))))))
    nlist = max(1, min(nlist, n // 39 or 1))  # FAISS wants >= 39 training points per list
    m = next(m for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0)
    kinds = {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf": f"IVF{nlist},Flat",
             "ivfpq": f"IVF{nlist},PQ{m}"}
    if kind == "auto":
        if not fits:
            return kinds["ivfpq"]
        return kinds["flat"] if n <= EXACT_MAX else kinds["ivf"]
    return kinds.get(kind, kind)


@dataclass
class SearchHit:
    rank: int
    path: str
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)


class Index:
    """A FAISS index over an embedding store; build with :meth:`build`, reopen with :meth:`open`."""

    def __init__(self, path: Path, index, meta: dict):
        self.path = path
        self.faiss_index = index
        self.meta = meta
        self.spec = BackboneSpec.from_dict(meta["spec"])
        self.paths = {int(i): p for i, p in meta["paths"]}
        self._apply_search_params()

    # ------------------------------------------------------------ build/open
    @classmethod
    def build(cls, store_path: str | os.PathLike, out: str | os.PathLike, kind: str = "auto",
              metric: str = "cosine", max_memory: float | None = None,
              target_recall: float = TARGET_RECALL, log=print) -> Index:
        """Build (or bring up to date) the index at ``out`` for the store, then measure it."""
        if metric not in METRICS:
            raise TlEmbedError(f"--metric must be one of {', '.join(METRICS)}")
        out = Path(out)
        with EmbeddingStore.open(store_path) as store:
            if len(store) == 0:
                raise TlEmbedError(f"store {store_path} is empty: nothing to index")
            ids, vectors = store.ids.copy(), prepare_vectors(store.embeddings, metric)
            root = store.root
            paths = {int(i): str(store.absolute_path(p)) for i, p in zip(ids, store.paths, strict=True)}
            spec = store.spec
        factory = choose_factory(len(ids), vectors.shape[1], kind, max_memory)
        existing = cls._reusable(out, spec, factory, metric, log)
        t0 = time.perf_counter()
        if existing is not None:
            index, meta = existing.faiss_index, existing.meta
            have = np.array(sorted(existing.paths), dtype=np.int64)
            gone = np.setdiff1d(have, ids)
            new = ~np.isin(ids, have)
            if len(gone):
                index.remove_ids(gone)
            if new.any():
                index.add_with_ids(vectors[new], ids[new])
            log(f"updated {out}: +{int(new.sum())} added, -{len(gone)} removed (no rebuild)")
        else:
            index = _new_index(factory, vectors.shape[1], metric)
            if not index.is_trained:
                index.train(_training_sample(vectors))
            index.add_with_ids(vectors, ids)
            meta = {"factory": factory, "metric": metric, "search_params": {}}
        meta.update({"spec": spec.to_dict(), "store": str(Path(store_path).resolve()),
                     "root": str(root or ""), "paths": sorted(paths.items()),
                     "build_seconds": round(time.perf_counter() - t0, 3)})
        self = cls(out, index, meta)
        self._tune_and_measure(vectors, ids, target_recall)
        self.save()
        return self

    @classmethod
    def _reusable(cls, out: Path, spec: BackboneSpec, factory: str, metric: str, log) -> Index | None:
        """The index already at ``out`` if it can be updated in place, else None (and say why)."""
        if not (out / META_FILE).is_file():
            return None
        old = cls.open(out)
        check_compatible(old.spec, spec, f"index {out}")
        if old.meta["metric"] != metric or _family(old.meta["factory"]) != _family(factory):
            log(f"rebuilding {out}: {old.meta['factory']}/{old.meta['metric']} -> {factory}/{metric}")
            return None
        if "HNSW" in factory:
            log(f"rebuilding {out}: HNSW indexes cannot remove vectors")
            return None
        return old

    @classmethod
    def open(cls, path: str | os.PathLike) -> Index:
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise TlEmbedError(f"{path} is not a tl_embed index; build one with `tl-embed index STORE --out {path}`")
        meta = json.loads((path / META_FILE).read_text())
        return cls(path, load_faiss().read_index(str(path / INDEX_FILE)), meta)

    def save(self) -> None:
        faiss = load_faiss()
        self.path.mkdir(parents=True, exist_ok=True)
        blob = faiss.serialize_index(self.faiss_index)
        atomic_write(self.path / INDEX_FILE, lambda f: f.write(blob.tobytes()))
        self.meta["memory_bytes"] = int(blob.nbytes)
        atomic_write(self.path / META_FILE, lambda f: f.write(json.dumps(self.meta).encode()))

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    # ---------------------------------------------------------------- search
    def _apply_search_params(self) -> None:
        faiss = load_faiss()
        for name, value in self.meta.get("search_params", {}).items():
            faiss.ParameterSpace().set_index_parameter(self.faiss_index, name, value)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Neighbours of already-embedded query vectors (same backbone as the index)."""
        q = prepare_vectors(np.atleast_2d(vectors), self.meta["metric"])
        if q.shape[1] != self.spec.dim:
            raise TlEmbedError(f"query vectors have dimension {q.shape[1]}, the index {self.spec.dim}")
        scores, ids = self.faiss_index.search(q, min(k, len(self)))
        return [[SearchHit(r + 1, self.paths[int(i)], float(s))
                 for r, (s, i) in enumerate(zip(srow, irow, strict=True)) if i >= 0]
                for srow, irow in zip(scores, ids, strict=True)]

    def search(self, queries, k: int = 10, runtime: str = "auto") -> list[tuple[str, list[SearchHit]]]:
        """Neighbours of image files/folders, of images already in the store, or of vectors.

        Returns (query, hits) pairs; files that cannot be decoded are left out.
        """
        if isinstance(queries, np.ndarray):
            return list(zip([f"vector {i}" for i in range(len(queries))],
                            self.search_vectors(queries, k), strict=True))
        stored, to_embed = self._stored_vectors([str(q) for q in queries])
        labels = list(stored)
        vectors = [stored[q] for q in labels]
        if to_embed:
            from ..embedding.query import embed_for

            emb = embed_for(self.spec, to_embed, runtime)
            labels += [str(p) for p in emb.paths]
            vectors += list(emb.vectors)
        if not vectors:
            raise TlEmbedError("no readable query images")
        return list(zip(labels, self.search_vectors(np.stack(vectors), k), strict=True))

    def _stored_vectors(self, queries: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Split queries into images the store already holds (vectors reused) and files to embed."""
        by_path = {p: i for i, p in self.paths.items()}
        hits = {q: by_path.get(str(Path(q).expanduser().resolve())) or by_path.get(
            str(Path(self.meta["root"]) / q)) for q in queries if not Path(q).is_dir()}
        found = {q: i for q, i in hits.items() if i is not None}
        rest = [q for q in queries if q not in found]
        if not found:
            return {}, rest
        with EmbeddingStore.open(self.meta["store"]) as store:
            pos = {int(i): n for n, i in enumerate(store.ids)}
            return {q: np.asarray(store.embeddings[pos[i]], np.float32) for q, i in found.items()
                    if i in pos}, rest + [q for q, i in found.items() if i not in pos]

    # --------------------------------------------------------------- quality
    def _tune_and_measure(self, vectors: np.ndarray, ids: np.ndarray, target: float,
                          n_queries: int = 200) -> None:
        """Pick the cheapest nprobe/efSearch reaching ``target`` recall@10, then record quality.

        Recall is leave-one-out: each sampled vector queries the index and its own id is dropped
        from both the exact and the approximate answer, so it behaves like an unseen query.
        """
        faiss = load_faiss()
        rng = np.random.default_rng(0)
        rows = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
        q = vectors[rows]
        k = min(10, len(vectors) - 1)
        if k < 1:
            self.meta.update({"recall_at_10": 1.0, "recall_queries": 0, "latency_ms": 0.0})
            return
        qids = ids[rows]
        truth = _drop_self(ids[_exact_neighbours(vectors, q, k + 1, self.meta["metric"])], qids, k)
        factory = self.meta["factory"]
        name = "nprobe" if "IVF" in factory else "efSearch" if "HNSW" in factory else None
        recall = _recall(_drop_self(self.faiss_index.search(q, k + 1)[1], qids, k), truth)
        if name:
            limit = getattr(faiss.extract_index_ivf(self.faiss_index), "nlist", 1) if name == "nprobe" else 1024
            value = 1
            while True:
                faiss.ParameterSpace().set_index_parameter(self.faiss_index, name, value)
                recall = _recall(_drop_self(self.faiss_index.search(q, k + 1)[1], qids, k), truth)
                if recall >= target or value >= limit:
                    break
                value = min(value * 2, limit)
            self.meta["search_params"] = {name: value}
        single = q[:1]
        times = []
        for _ in range(20):
            t = time.perf_counter()
            self.faiss_index.search(single, k)
            times.append(time.perf_counter() - t)
        self.meta.update({"recall_at_10": round(float(recall), 4), "recall_queries": len(q),
                          "target_recall": target, "latency_ms": round(1000 * float(np.median(times)), 3)})

    def describe(self) -> str:
        m = self.meta
        params = ", ".join(f"{k}={v}" for k, v in m.get("search_params", {}).items())
        return (f"{self.path}: {m['factory']} ({m['metric']}{', ' + params if params else ''}) over "
                f"{len(self)} vectors from {self.spec.describe()}; recall@10 {m['recall_at_10']:.3f} "
                f"vs exact on {m['recall_queries']} queries, {m['memory_bytes'] / 1e6:.1f} MB, "
                f"{m['latency_ms']:.2f} ms per single query; built in {m['build_seconds']:.1f} s"
                + _shortfall(m))


def _shortfall(meta: dict) -> str:
    """A warning when even the widest search misses the target (PQ compression lost too much)."""
    target = meta.get("target_recall")
    if target is None or meta["recall_at_10"] >= target:
        return ""
    return (f". WARNING: recall@10 stays below the target {target:.2f} even at the widest search; "
            "use --type ivf (uncompressed) or a larger --max-memory")


def _family(factory: str) -> str:
    """Factory string without its sizes: an IVF1024 index is updated in place, not rebuilt as IVF2048."""
    return re.sub(r"\d+", "", factory)


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _new_index(factory: str, dim: int, metric: str):
    faiss = load_faiss()
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise TlEmbedError(f"bad FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    if not factory.startswith(("IVF", "OPQ", "PCA", "IDMap")):
        index = faiss.IndexIDMap2(index)
    return index


def _training_sample(vectors: np.ndarray, max_points: int = 100_000) -> np.ndarray:
    if len(vectors) <= max_points:
        return vectors
    idx = np.random.default_rng(0).choice(len(vectors), max_points, replace=False)
    return vectors[np.sort(idx)]


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    faiss = load_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


def _drop_self(found: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids without the query's own id, cut to k (padded with -1)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for n, (row, qid) in enumerate(zip(found, query_ids, strict=True)):
        kept = row[row != qid][:k]
        out[n, :len(kept)] = kept
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@k: the share of the exact top-k ids that the index also returned."""
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size
