"""FAISS similarity search over a store: choose, build, update, search.

An index is a folder ``NAME.tli/`` holding one file, ``index.bin``: a fixed header (magic, format
version, sizes, CRC-32), the JSON meta (the store's uid and path, backbone spec, FAISS factory
string, metric, search parameters, measured quality and the id -> path map), then the serialized
FAISS index.  It is written whole with :func:`~tl_embed.files.atomic_write` (temp file, fsync,
rename), so a reader sees the old index or the new one, never a new index with an old id map, and a
writer killed mid-save leaves the previous index as it was.  Writers hold an flock on
``NAME.tli/.lock`` for the whole read-update-save, so two ``tl-embed index`` runs cannot interleave;
the second is refused.  Indexes from before this format (``index.faiss`` + ``meta.json``) still
open and are rewritten in it by their next update.

Vector ids are the store's stable item ids, so re-running ``index`` adds and removes only what
changed; an index records its store's uid and refuses updates from any other store.  Queries given
as image files are embedded with the recorded backbone, so a query can never come from a different
model than the index.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding.backbones import BackboneSpec, check_compatible
from ..embedding.store import EmbeddingStore
from ..errors import IndexDamagedError, TlEmbedError
from ..files import atomic_write, try_lock

METRICS = ("cosine", "l2")
TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_MAX = 100_000  # up to here exact search answers one query in a few ms
TARGET_RECALL = 0.95
POINTS_PER_LIST = 39  # FAISS wants >= 39 training points per IVF list
DATA_FILE, LOCK_FILE = "index.bin", ".lock"
OLD_FILES = ("index.faiss", "meta.json")  # the format before index.bin: two files renamed separately
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIQQI")  # magic, format version, meta bytes, FAISS bytes, CRC-32 of both
MAGIC = b"TLINDEX\n"
REQUIRED_META = ("spec", "factory", "metric", "paths", "store", "root")


def load_faiss():
    import faiss

    return faiss


def choose_factory(n: int, dim: int, kind: str = "auto", max_memory: float | None = None) -> str:
    """A FAISS index factory string for ``n`` vectors of ``dim`` under a memory budget (bytes).

    ``auto``: exact ``Flat`` up to EXACT_MAX vectors when it fits; beyond, ``IVF{nlist},Flat``
    (nlist ~ 4 sqrt(n)); ``IVF{nlist},PQ{m}`` when the raw vectors exceed ``max_memory``, and an
    error naming the smallest budget that works when not even that fits.
    Anything else is taken as a factory string as is.
    """
    raw = n * dim * 4
    nlist = int(2 ** round(math.log2(max(16, min(65536, 4 * math.sqrt(max(n, 1)))))))
    nlist = max(1, min(nlist, n // POINTS_PER_LIST or 1))
    m = next(m for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0)
    kinds = {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf": f"IVF{nlist},Flat",
             "ivfpq": f"IVF{nlist},PQ{m}"}
    if kind != "auto":
        return kinds.get(kind, kind)
    if max_memory is None or raw <= max_memory:
        return kinds["flat"] if n <= EXACT_MAX else kinds["ivf"]
    sizes = {"Flat": raw}
    if n >= 256:  # PQ trains 256 centroids per sub-quantizer
        sizes[kinds["ivfpq"]] = n * (m + 8) + (nlist + 256) * dim * 4  # codes + ids, centroids
    if sizes.get(kinds["ivfpq"], math.inf) <= max_memory:
        return kinds["ivfpq"]
    smallest = min(sizes, key=sizes.get)
    need = human_size(sizes[smallest])
    raise TlEmbedError(f"--max-memory {human_size(max_memory)} is too small for {n} vectors of dimension "
                       f"{dim}: the smallest index ({smallest}) takes about {need}; use --max-memory {need} or more")


def human_size(nbytes: float) -> str:
    """Bytes as --max-memory takes them (500MB, 2GB), rounded up so the figure is enough."""
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= mult:
            return f"{math.ceil(nbytes / mult * 10) / 10:g}{unit}"
    return f"{math.ceil(nbytes)}B"


def _check_trainable(factory: str, n: int) -> None:
    """Refuse before FAISS training would crash (or cluster a handful of points): say what fits."""
    needs = []
    for m in re.finditer(r"IVF(\d+)", factory):
        nlist = int(m[1])
        if nlist > 1:
            needs.append((nlist * POINTS_PER_LIST, f"{m[0]} needs at least {nlist}*{POINTS_PER_LIST}"))
    for m in re.finditer(r"(?:O?PQ|RQ)(\d+)(?:x(\d+))?", factory):
        bits = int(m[2] or 8)
        needs.append((2 ** bits, f"{m[0]} needs at least 2^{bits} = {2 ** bits}"))
    unmet = [why for need, why in sorted(needs, reverse=True) if n < need]
    if unmet:
        raise TlEmbedError(f"{unmet[0]} training vectors; this store has {n}: "
                           "use --type ivf (auto-sized) or flat")


@dataclass
class SearchHit:
    rank: int
    path: str
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)


@dataclass
class _Source:
    """What an index is built from: one consistent read of the store."""

    path: Path
    uid: str
    spec: BackboneSpec
    root: str
    ids: np.ndarray
    vectors: np.ndarray
    paths: dict[int, str]

    @classmethod
    def read(cls, store_path: str | os.PathLike, metric: str) -> _Source:
        with EmbeddingStore.open(store_path) as store:
            if len(store) == 0:
                raise TlEmbedError(f"store {store_path} is empty: nothing to index")
            ids = store.ids.copy()
            paths = {int(i): str(store.absolute_path(p)) for i, p in zip(ids, store.paths, strict=True)}
            return cls(Path(store_path).resolve(), store.uid, store.spec, str(store.root or ""), ids,
                       prepare_vectors(store.embeddings, metric), paths)


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
        """Build (or bring up to date) the index at ``out`` for the store, measure it, save it whole."""
        if metric not in METRICS:
            raise TlEmbedError(f"--metric must be one of {', '.join(METRICS)}")
        out = Path(out)
        src = _Source.read(store_path, metric)
        factory = choose_factory(len(src.ids), src.vectors.shape[1], kind, max_memory)
        with _writer_lock(out):
            existing = cls._reusable(out, src, factory, metric, log)
            t0 = time.perf_counter()
            if existing is not None and _update(existing, src, log):
                index, meta = existing.faiss_index, existing.meta
            else:
                index = _fresh_index(factory, src.vectors, src.ids, metric)
                meta = {"factory": factory, "metric": metric, "search_params": {}}
            meta.update({"spec": src.spec.to_dict(), "store": str(src.path), "store_uid": src.uid,
                         "root": src.root, "paths": sorted(src.paths.items()),
                         "build_seconds": round(time.perf_counter() - t0, 3)})
            self = cls(out, index, meta)
            with _faiss_errors(f"measure the {meta['factory']} index"):
                self._tune_and_measure(src.vectors, src.ids, target_recall)
            self._save()
        return self

    @classmethod
    def _reusable(cls, out: Path, src: _Source, factory: str, metric: str, log) -> Index | None:
        """The index already at ``out`` if it can be updated in place, else None (and say why).

        An index of another store is refused, never replaced: it may be the only copy of a long build.
        """
        if not _holds_index(out):
            return None
        try:
            old = cls.open(out)
        except IndexDamagedError as e:
            log(f"rebuilding {out}: it is damaged ({e.reason})")
            return None
        check_compatible(old.spec, src.spec, f"index {out}")
        if not _same_store(old.meta, src):
            raise TlEmbedError(f"index {out} belongs to another store ({old.meta['store']}); it was left as "
                               f"is: write the index of {src.path} to a new --out, or delete {out} to rebuild it")
        if old.meta["metric"] != metric or _family(old.meta["factory"]) != _family(factory):
            log(f"rebuilding {out}: {old.meta['factory']}/{old.meta['metric']} -> {factory}/{metric}")
            return None
        return old

    @classmethod
    def open(cls, path: str | os.PathLike) -> Index:
        """Open an index for searching; a damaged one raises :class:`IndexDamagedError`."""
        path = Path(path)
        for _ in range(2):  # an old-format index converted meanwhile: its files go once DATA_FILE exists
            try:
                with open(path / DATA_FILE, "rb") as f:
                    return cls._read(path, f)
            except FileNotFoundError:
                pass
            if not any((path / name).exists() for name in OLD_FILES):
                break
            try:
                return cls._read_old(path)
            except FileNotFoundError:
                continue
        missing = [name for name in OLD_FILES if not (path / name).exists()]
        if len(missing) == 1:
            raise IndexDamagedError(path, f"{missing[0]} is missing")
        if (path / LOCK_FILE).exists():
            raise IndexDamagedError(path, f"{DATA_FILE} is missing")
        raise TlEmbedError(f"{path} is not a tl_embed index; build one with `tl-embed index STORE --out {path}`")

    @classmethod
    def _read(cls, path: Path, f) -> Index:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:len(MAGIC)] != MAGIC:
            raise IndexDamagedError(path, f"{DATA_FILE} is not a tl_embed index file")
        _, version, meta_len, data_len, crc = HEADER.unpack(head)
        if version > FORMAT_VERSION:
            raise TlEmbedError(f"index {path} was written by a newer tl_embed (format {version}); upgrade to read it")
        size = os.fstat(f.fileno()).st_size
        if size != HEADER.size + meta_len + data_len:
            raise IndexDamagedError(path, f"{DATA_FILE} has {size} bytes, its header says "
                                          f"{HEADER.size + meta_len + data_len}")
        meta_bytes = f.read(meta_len)
        reader = _CrcReader(f, zlib.crc32(meta_bytes))
        index = _read_faiss(path, reader)
        if reader.crc != crc:
            raise IndexDamagedError(path, f"{DATA_FILE} fails its checksum")
        return cls._checked(path, index, _parse_meta(path, meta_bytes))

    @classmethod
    def _read_old(cls, path: Path) -> Index:
        meta = _parse_meta(path, (path / OLD_FILES[1]).read_bytes())
        with open(path / OLD_FILES[0], "rb") as f:
            return cls._checked(path, _read_faiss(path, _CrcReader(f, 0)), meta)

    @classmethod
    def _checked(cls, path: Path, index, meta: dict) -> Index:
        """An Index from parts read back, or IndexDamagedError if they do not belong together."""
        try:
            self = cls(path, index, meta)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IndexDamagedError(path, f"invalid meta ({type(e).__name__}: {e})") from None
        if len(self) != len(self.paths) or index.d != self.spec.dim:
            raise IndexDamagedError(path, f"its FAISS index ({len(self)} x {index.d}) does not match its "
                                          f"meta ({len(self.paths)} x {self.spec.dim})")
        return self

    def _save(self) -> None:
        """Write meta and FAISS index as one file, atomically; then drop an old-format pair."""
        blob = load_faiss().serialize_index(self.faiss_index)
        self.meta["memory_bytes"] = int(blob.nbytes)
        meta = json.dumps(self.meta).encode()
        header = HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), blob.nbytes, zlib.crc32(blob, zlib.crc32(meta)))

        def write(f) -> None:
            f.write(header)
            f.write(meta)
            f.write(blob)

        atomic_write(self.path / DATA_FILE, write)
        for name in OLD_FILES:
            (self.path / name).unlink(missing_ok=True)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    # ---------------------------------------------------------------- search
    def _apply_search_params(self) -> None:
        faiss = load_faiss()
        for name, value in self.meta.get("search_params", {}).items():
            faiss.ParameterSpace().set_index_parameter(self.faiss_index, name, value)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Neighbours of already-embedded query vectors (same backbone as the index)."""
        if k < 1:
            raise TlEmbedError(f"-k must be at least 1, not {k}")
        q = prepare_vectors(np.atleast_2d(vectors), self.meta["metric"])
        if q.shape[1] != self.spec.dim:
            raise TlEmbedError(f"query vectors have dimension {q.shape[1]}, the index {self.spec.dim}")
        with _faiss_errors(f"search the {self.meta['factory']} index {self.path}"):
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


def _same_store(meta: dict, src: _Source) -> bool:
    """Whether an index was built from this store: by uid, or by path for indexes older than uids."""
    if "store_uid" in meta:
        return meta["store_uid"] == src.uid
    return meta["store"] == str(src.path)


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _new_index(factory: str, dim: int, metric: str):
    """An empty index for ``factory`` that takes the store's ids (wrapped in an ID map if it cannot)."""
    faiss = load_faiss()
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise TlEmbedError(f"bad FAISS factory string {factory!r}: {_faiss_reason(e)}") from None
    for layer in _layers(index):
        if hasattr(layer, "do_polysemous_training"):  # PQ: minutes of annealing for a search mode we never use
            layer.do_polysemous_training = False
    return index if _takes_ids(index) else faiss.IndexIDMap2(index)


def _layers(index) -> Iterator:
    """The index and those it wraps (behind transforms, ID maps, refinement), outermost first."""
    faiss = load_faiss()
    yield index
    for name in ("index", "base_index", "refine_index"):
        inner = getattr(index, name, None)
        if isinstance(inner, faiss.Index):
            yield from _layers(faiss.downcast_index(inner))


def _takes_ids(index) -> bool:
    """Whether ``add_with_ids`` works as is: IVF indexes (also behind PCA/OPQ transforms) and ID maps."""
    faiss = load_faiss()
    core = next(i for i in _layers(index) if not isinstance(i, faiss.IndexPreTransform))
    return isinstance(core, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def _fresh_index(factory: str, vectors: np.ndarray, ids: np.ndarray, metric: str):
    """A new index holding all vectors; sizes are checked before FAISS would fail training on them."""
    _check_trainable(factory, len(vectors))
    index = _new_index(factory, vectors.shape[1], metric)
    with _faiss_errors(f"build the {factory} index"):
        if not index.is_trained:
            index.train(_training_sample(vectors))
        index.add_with_ids(vectors, ids)
    return index


def _update(existing: Index, src: _Source, log) -> bool:
    """Bring an index up to date in memory (drop the ids the store dropped, add its new ones).

    False when its type cannot do that (HNSW, NSG, refine indexes cannot remove, NSG cannot add): the
    caller rebuilds, and the file on disk is untouched until the rebuilt index replaces it.
    """
    have = np.fromiter(existing.paths, np.int64)
    gone = np.setdiff1d(have, src.ids)
    new = ~np.isin(src.ids, have)
    try:
        if len(gone):
            existing.faiss_index.remove_ids(gone)
        if new.any():
            existing.faiss_index.add_with_ids(src.vectors[new], src.ids[new])
    except RuntimeError as e:
        log(f"rebuilding {existing.path}: {existing.meta['factory']} cannot be updated in place "
            f"({_faiss_reason(e)})")
        return False
    log(f"updated {existing.path}: +{int(new.sum())} added, -{len(gone)} removed (no rebuild)")
    return True


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


@contextlib.contextmanager
def _faiss_errors(what: str) -> Iterator[None]:
    """FAISS's C++ exceptions as one user-facing line naming what failed, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        raise TlEmbedError(f"FAISS failed to {what}: {_faiss_reason(e)}") from None


def _faiss_reason(e: BaseException) -> str:
    """The message of a FAISS exception without its C++ function signature and source location."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", lines[-1])


class _CrcReader:
    """File reads for FAISS's callback reader that also keep a running CRC-32 of what was read."""

    def __init__(self, f, crc: int):
        self.f, self.crc = f, crc

    def __call__(self, n: int) -> bytes:
        data = self.f.read(n)
        self.crc = zlib.crc32(data, self.crc)
        return data


def _read_faiss(path: Path, reader: _CrcReader):
    faiss = load_faiss()
    try:
        return faiss.read_index(faiss.PyCallbackIOReader(reader))
    except (RuntimeError, MemoryError) as e:
        raise IndexDamagedError(path, f"FAISS cannot read its index data: {_faiss_reason(e)}") from None


def _parse_meta(path: Path, data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexDamagedError(path, f"its meta is not valid JSON: {e}") from None
    missing = [k for k in REQUIRED_META if k not in meta] if isinstance(meta, dict) else ["all keys"]
    if missing:
        raise IndexDamagedError(path, f"its meta lacks {', '.join(missing)}")
    return meta


def _holds_index(path: Path) -> bool:
    return any((path / name).exists() for name in (DATA_FILE, *OLD_FILES))


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s writer lock (flock; the OS releases it if the process dies) while writing it.

    A folder this call created is removed again if the build fails, so no empty "index" is left.
    """
    created = not out.exists()
    if not created and not (out.is_dir() and (_holds_index(out) or (out / LOCK_FILE).exists()
                                               or not any(out.iterdir()))):
        raise TlEmbedError(f"{out} exists and is not a tl_embed index; choose another --out")
    try:
        out.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise TlEmbedError(f"folder {out.parent} does not exist; create it first or choose another --out") from None
    fd = try_lock(out / LOCK_FILE)
    if fd is None:
        raise TlEmbedError(f"index {out} is being written by another tl-embed process; wait for it to finish "
                           "(only one writer at a time)")
    done = False
    try:
        for tmp in out.glob(f".{DATA_FILE}.*.tmp"):  # a killed writer's; we hold the lock, none is live
            tmp.unlink(missing_ok=True)
        yield
        done = True
    finally:
        if created and not done:
            (out / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        os.close(fd)
