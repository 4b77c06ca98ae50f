"""The on-disk embedding store: ``.npy`` shards plus a SQLite manifest.

Layout of ``NAME.tle/``::

    manifest.sqlite   meta (backbone spec, dtype, image root), shards, items, failures
    shards/NNNNNNNN.npy  float32/float16 rows, written once, never modified
    .lock             held (flock) by the one writer
    .readers.lock     held shared by readers while they map a snapshot's shards, exclusively by a writer
                      while it unlinks shards

Crash safety comes from ordering: a shard is written to a temp file, fsynced and renamed *before* the
SQLite transaction that references it commits.  A crash therefore loses at most the batch in flight;
an orphan shard left behind is deleted by the next writer.  At the end of a write session
:meth:`EmbeddingStore.consolidate` tidies the shards at a cost that follows what changed: a store up
to 256 MB becomes one shard (so :attr:`EmbeddingStore.embeddings` is one memory-mapped N x D array);
a larger one merges size-tiered and rewrites only shards that are mostly garbage, streaming, so adding
k images to N costs O(k) and memory stays bounded.  Opening reads only the shard table; rows are read
on first use, and :meth:`EmbeddingStore.iter_chunks` reads any store in bounded memory.

A new store is built in a hidden temp folder beside its final place and renamed into place, so a folder
named like a store is always a complete store.  Readers never take the writer's lock: each reads one
SQLite snapshot and maps its shards under a shared lock that the writer takes exclusively only to unlink
old shards, so a reader never maps a shard that is gone (a mapped shard stays readable after an unlink);
where that lock cannot be had (another user's store) a reader retries on a fresh snapshot.  A store on
read-only media opens for reading as it is.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import StoreDamagedError, StoreError, StoreReadOnlyError
from ..files import atomic_write, disk_is_full, fsync_dir, try_lock, unlock
from ..kinds import STORE, STORE_MANIFEST, require_output
from .backbones import BackboneSpec

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
MANIFEST = STORE_MANIFEST
CONSOLIDATE_BYTES = 256 * 2**20  # stores up to this size are kept as one shard (one memory map)
TIER_FANOUT = 8  # larger stores merge 8 shards of a size tier into one
CHUNK_BYTES = 64 * 2**20  # iter_chunks' default chunk
GARBAGE_SHARE = 0.5  # a shard with fewer live rows than this share of its rows is rewritten

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, file TEXT NOT NULL, rows INTEGER NOT NULL,
                                   dead INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    label TEXT, split TEXT, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL,
    shard INTEGER NOT NULL REFERENCES shards(id), row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_shard ON items (shard, row);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class ManifestRow:
    """One embedded image; ``path`` is relative to the store's image root."""

    path: str
    label: str | None
    split: str | None
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    size: int
    mtime_ns: int


class EmbeddingStore:
    """An embedding store opened for reading (``mode="r"``) or as its single writer (``"a"``).

    Read side: ``embeddings`` (N x D), ``paths``, ``labels``, ``splits``, ``rows`` are aligned.
    Write side: :meth:`add` commits one batch atomically; :meth:`remove`; :meth:`compact`.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None):
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self.meta = meta = _read_meta(path, conn)
        try:
            self.spec = BackboneSpec.from_dict(json.loads(meta["spec"]))
            self.dtype = np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreDamagedError(path, "its backbone record is missing or unreadable "
                                    f"({type(e).__name__}: {e})") from None
        self.root = Path(meta["root"]) if meta.get("root") else None
        self._load()

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, spec: BackboneSpec, dtype: str = "float32",
               root: str | os.PathLike | None = None) -> EmbeddingStore:
        """Create a new, empty store and open it for writing.

        The store is made complete in a hidden temp folder and renamed into place: a crash, Ctrl-C or
        full disk during creation leaves no half-made store behind.
        """
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        path = Path(path)
        require_output(path, STORE)
        if (path / MANIFEST).exists():
            raise StoreError(f"{path} already holds a store")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path} exists and is not an empty folder; choose another --out")
        if not path.parent.is_dir():
            raise StoreError(f"folder {path.parent} does not exist; create it first or choose another --out")
        _remove_dead_temp_folders(path)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        try:
            (tmp / "shards").mkdir(parents=True)
            conn = sqlite3.connect(tmp / MANIFEST)
            try:
                with conn:
                    conn.executescript(_SCHEMA)
                    meta = {"format_version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict()),
                            "dtype": dtype, "root": str(Path(root).resolve()) if root else "",
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tl_embed_version": __version__,
                            "uid": uuid.uuid4().hex}
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
            finally:
                conn.close()
            _fsync_tree(tmp)
            try:
                os.rename(tmp, path)  # replaces an empty folder; fails if another process got there first
            except OSError as e:
                raise StoreError(f"cannot create store {path}: {e.strerror} (another process may be "
                                 "creating it; try again)") from None
            fsync_dir(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            return cls.open(path, "a")
        except (OSError, StoreError):  # e.g. no room left for SQLite's WAL: take back the empty store just
            _remove_unopened(path)  # made, so creation stays all or nothing
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EmbeddingStore:
        """Open an existing store; ``mode="a"`` takes the writer lock (one writer at a time)."""
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise StoreError(f"{path} is not a tl_embed store (no {MANIFEST}); create one with "
                             "`tl-embed embed IMAGES --out STORE`")
        lock_fd = _lock(path) if mode == "a" else None
        try:
            conn = _connect(path / MANIFEST, readonly=(mode == "r"))
            store = cls(path, conn, lock_fd)
        except BaseException:
            if lock_fd is not None:
                unlock(lock_fd)
            raise
        if mode == "a":
            store._remove_orphan_files()
            store._upgrade_schema()
        return store

    @classmethod
    def repair(cls, path: str | os.PathLike) -> int:
        """Forget the rows whose shard is missing or unreadable, so the next run embeds them again.

        Returns how many rows were forgotten.  The images themselves are untouched; only vectors that
        are already lost are dropped from the manifest.
        """
        path = Path(path)
        lock_fd = _lock(path)
        try:
            conn = _connect(path / MANIFEST)
            try:
                dim = BackboneSpec.from_dict(json.loads(_read_meta(path, conn)["spec"])).dim
                bad = [sid for sid, f, n in conn.execute("SELECT id, file, rows FROM shards")
                       if not _shard_ok(path / "shards" / f, n, dim)]
                with conn:
                    before = conn.total_changes
                    conn.executemany("DELETE FROM items WHERE shard = ?", [(b,) for b in bad])
                    conn.execute("DELETE FROM items WHERE shard NOT IN (SELECT id FROM shards) OR "
                                 "row >= (SELECT rows FROM shards WHERE shards.id = items.shard)")
                    dropped = conn.total_changes - before
                    conn.executemany("DELETE FROM shards WHERE id = ?", [(b,) for b in bad])
                return dropped
            finally:
                conn.close()
        finally:
            unlock(lock_fd)

    def _upgrade_schema(self) -> None:
        """Stores made by an earlier tl_embed get the shard index and dead-row counts on their first write."""
        columns = {c for _, c, *_ in self._conn.execute("PRAGMA table_info(shards)")}
        with self._conn:
            self._conn.execute("CREATE INDEX IF NOT EXISTS items_by_shard ON items (shard, row)")
            if "dead" not in columns:
                self._conn.execute("ALTER TABLE shards ADD COLUMN dead INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            unlock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def uid(self) -> str:
        """Identity of this store, fixed at creation: indexes record it to refuse another store's data."""
        if "uid" in self.meta:
            return self.meta["uid"]
        return hashlib.sha256(f"{self.meta.get('root')}|{self.meta.get('created')}".encode()).hexdigest()[:32]

    # ------------------------------------------------------------- read side
    def _load(self, attempts: int = 5) -> None:
        """Take a fresh manifest snapshot and map the shards it references.

        Only the shard table is read here; rows are read on first use, so opening a store of millions
        of rows to add a few images costs O(shards), not O(rows).  A reader can lose the race with a
        compacting writer (the snapshot names a shard the writer has just unlinked): it then takes a
        fresh snapshot, which names the new shard.
        """
        for attempt in range(attempts):
            try:
                if self._lock_fd is None:  # a reader: no shard of this snapshot is unlinked while it maps them
                    with _shard_lock(self.path, exclusive=False):
                        self._load_snapshot()
                else:  # the writer: the only one that unlinks
                    self._load_snapshot()
                return
            except FileNotFoundError as e:
                if self._lock_fd is not None or attempt == attempts - 1:
                    raise StoreDamagedError(self.path, f"shard {Path(e.filename or '?').name} is missing",
                                            repairable=True) from None
                time.sleep(0.05 * (attempt + 1))

    def _load_snapshot(self) -> None:
        try:
            if self._lock_fd is None:  # reader: start a fresh snapshot transaction
                self._conn.execute("COMMIT")
                self._conn.execute("BEGIN")
            shard_files = self._conn.execute("SELECT id, file, rows FROM shards").fetchall()
            self._count = self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise _manifest_error(self.path, e, "read") from None
        self._shards = {sid: self._map_shard(f, n) for sid, f, n in shard_files}
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # (locations N x 2, ids)
        self._rows_cache: list[ManifestRow] | None = None
        self._index: dict[str, int] | None = None
        self._embeddings: np.ndarray | None = None
        self._dirty = False

    def _query(self, sql: str) -> list[tuple]:
        try:
            return self._conn.execute(sql).fetchall()
        except sqlite3.DatabaseError as e:
            raise _manifest_error(self.path, e, "read") from None

    def _located(self) -> tuple[np.ndarray, np.ndarray]:
        """(N x 2 (shard, row) locations, N ids) in manifest order, read once per snapshot as arrays."""
        self._view()
        if self._positions is None:
            flat = np.array(self._query("SELECT shard, row, id FROM items ORDER BY shard, row"),
                            dtype=np.int64).reshape(-1, 3)
            locations, ids = np.ascontiguousarray(flat[:, :2]), np.ascontiguousarray(flat[:, 2])
            bad = _rows_outside(locations, {sid: len(a) for sid, a in self._shards.items()})
            if len(bad):
                raise StoreDamagedError(self.path, f"manifest rows point outside their shard ({len(bad)} of them; "
                                        f"first: item id {ids[bad[0]]})", repairable=True)
            self._positions = (locations, ids)
        return self._positions

    def _map_shard(self, name: str, rows: int) -> np.ndarray:
        """Memory-map one shard, checking it is the rows x dim array the manifest says."""
        try:
            arr = np.load(self.path / "shards" / name, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError) as e:
            raise StoreDamagedError(self.path, f"shard {name} is unreadable ({_first_line(e)})",
                                    repairable=True) from None
        if arr.shape != (rows, self.dim) or arr.dtype != self.dtype:
            raise StoreDamagedError(self.path, f"shard {name} holds {arr.shape} {arr.dtype}, the manifest "
                                    f"expects ({rows}, {self.dim}) {self.dtype}", repairable=True)
        return arr

    def _view(self) -> None:
        """Reload after this writer's own commits, so reads always see them."""
        if self._dirty:
            self._load()

    @property
    def rows(self) -> list[ManifestRow]:
        """Manifest rows, aligned with :attr:`embeddings` (read on first use)."""
        self._view()
        if self._rows_cache is None:
            self._located()  # checks the rows against their shards first
            self._rows_cache = [ManifestRow(*r) for r in self._query(
                "SELECT path, label, split, sha256, size, mtime_ns, width, height FROM items ORDER BY shard, row")]
        return self._rows_cache

    def __len__(self) -> int:
        self._view()
        return self._count

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def embeddings(self) -> np.ndarray:
        """N x D array aligned with :attr:`rows`.

        A zero-copy memory map when the store is one shard in manifest order (what ``embed`` leaves
        for stores up to :data:`CONSOLIDATE_BYTES`); otherwise the shards are gathered into one array
        in RAM.  For large stores use :meth:`iter_chunks`, which never holds more than one chunk.
        """
        self._view()
        if self._embeddings is None:
            self._embeddings = self._assemble()
        return self._embeddings

    def _assemble(self) -> np.ndarray:
        locations, _ = self._located()
        if not len(locations):
            return np.zeros((0, self.dim), dtype=self.dtype)
        sids = np.unique(locations[:, 0])
        if len(sids) == 1:
            shard = self._shards[int(sids[0])]
            rows = locations[:, 1]
            if len(rows) == len(shard) and np.array_equal(rows, np.arange(len(shard))):
                return shard  # the compacted case: zero-copy memory map
        out = np.empty((len(locations), self.dim), dtype=self.dtype)
        for start, _, chunk in self.iter_chunks():
            out[start:start + len(chunk)] = chunk
        return out

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start position, ids, vectors) for consecutive runs of at most ``rows`` rows, in manifest order.

        Memory stays at one chunk (default: :data:`CHUNK_BYTES` of vectors) whatever the store's size:
        index builds and heads read large stores this way.
        """
        rows = rows or max(1024, CHUNK_BYTES // (self.dim * self.dtype.itemsize))
        locations, ids = self._located()
        start = 0
        while start < len(locations):
            sid = locations[start, 0]
            end = min(start + rows, int(np.searchsorted(locations[:, 0], sid, side="right")))
            yield start, ids[start:end], np.asarray(self._shards[int(sid)][locations[start:end, 1]])
            start = end

    def take(self, positions: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The vectors at ``positions`` (row numbers, any order) as one array, read shard by shard.

        Only the requested rows are read (cost O(len(positions)), not O(N)): index builds sample
        training rows this way and re-ranking reads a query's shortlist from the memory maps.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=dtype)
        if not len(positions):
            return out
        locations = self._located()[0][positions]
        for sid in np.unique(locations[:, 0]):
            mine = np.flatnonzero(locations[:, 0] == sid)
            out[mine] = self._shards[int(sid)][locations[mine, 1]]
        return out

    def iter_paths(self, rows: int = 65_536) -> Iterator[list[str]]:
        """Relative paths in manifest order, ``rows`` at a time (no ManifestRow per image)."""
        self._located()
        last = (-1, -1)
        while True:
            batch = self._conn.execute("SELECT shard, row, path FROM items WHERE (shard, row) > (?, ?) "
                                       "ORDER BY shard, row LIMIT ?", (*last, rows)).fetchall()
            if not batch:
                return
            last = batch[-1][:2]
            yield [p for _, _, p in batch]

    @property
    def ids(self) -> np.ndarray:
        """Stable int64 id per row (changes only when the image is re-embedded); for FAISS IDMap."""
        return self._located()[1]

    @property
    def paths(self) -> np.ndarray:
        return np.array([r.path for r in self.rows], dtype=object)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.rows], dtype=object)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r.split for r in self.rows], dtype=object)

    def absolute_path(self, rel: str) -> Path:
        return self.root / rel if self.root else Path(rel)

    def position(self, rel: str) -> int | None:
        """Row number of an image (relative path) or None."""
        rows = self.rows
        if self._index is None:
            self._index = {r.path: i for i, r in enumerate(rows)}
        return self._index.get(rel)

    def row_for(self, rel: str) -> ManifestRow | None:
        i = self.position(rel)
        return None if i is None else self.rows[i]

    @property
    def failures(self) -> list[Failure]:
        return [Failure(*r) for r in self._conn.execute(
            "SELECT path, reason, size, mtime_ns FROM failures ORDER BY path")]

    def failure_for(self, rel: str) -> Failure | None:
        r = self._conn.execute("SELECT path, reason, size, mtime_ns FROM failures WHERE path = ?",
                               (rel,)).fetchone()
        return Failure(*r) if r else None

    def summary(self) -> dict:
        """Counts for ``tl-embed info``."""
        labels: dict[str, int] = {}
        splits: dict[str, int] = {}
        for r in self.rows:
            labels[r.label or "(none)"] = labels.get(r.label or "(none)", 0) + 1
            splits[r.split or "(none)"] = splits.get(r.split or "(none)", 0) + 1
        n_shards = self._conn.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        return {"images": len(self), "failed": len(self.failures), "labels": labels,
                "splits": splits, "shards": n_shards, "dtype": str(self.dtype),
                "bytes": sum(f.stat().st_size for f in (self.path / "shards").glob("*.npy"))}

    def export(self, npy_path: str | os.PathLike, csv_path: str | os.PathLike) -> None:
        """Write embeddings to ``.npy`` and the aligned manifest to ``.csv`` (both atomically)."""
        atomic_write(Path(npy_path), lambda f: np.save(f, np.asarray(self.embeddings)))

        def write_csv(f):
            text = open(f.fileno(), "w", newline="", encoding="utf-8", closefd=False)
            w = csv.writer(text)
            w.writerow(["row", "path", "label", "split", "sha256", "width", "height"])
            for i, r in enumerate(self.rows):
                w.writerow([i, r.path, r.label or "", r.split or "", r.sha256, r.width, r.height])
            text.flush()

        atomic_write(Path(csv_path), write_csv)

    # ------------------------------------------------------------ write side
    @property
    def writable(self) -> bool:
        """Whether this handle holds the writer lock (``mode="a"``)."""
        return self._lock_fd is not None

    def _require_writer(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"{self.path} is open read-only")

    def add(self, rows: Sequence[ManifestRow], vectors: np.ndarray) -> None:
        """Durably add one batch: shard first (fsync + rename), then the manifest transaction.

        Rows whose path already exists are replaced (a changed image), in the same transaction.
        """
        self._require_writer()
        vectors = np.asarray(vectors)
        if vectors.shape != (len(rows), self.dim):
            raise StoreError(f"expected {len(rows)} x {self.dim} vectors, got {vectors.shape}")
        if not len(rows):
            return
        if not np.isfinite(vectors).all():
            raise StoreError("refusing to store non-finite embeddings (NaN/inf)")
        sid, name = self._write_shard(vectors.astype(self.dtype, copy=False))
        with self._conn:
            self._conn.execute("INSERT INTO shards (id, file, rows) VALUES (?, ?, ?)",
                               (sid, name, len(rows)))
            self._forget([r.path for r in rows])
            self._conn.executemany("DELETE FROM failures WHERE path = ?", [(r.path,) for r in rows])
            self._conn.executemany(
                "INSERT INTO items (path, label, split, sha256, size, mtime_ns, width, height, "
                "shard, row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.path, r.label, r.split, r.sha256, r.size, r.mtime_ns, r.width, r.height, sid, i)
                 for i, r in enumerate(rows)])
        self._dirty = True

    def touch(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Record a new (size, mtime) for images whose content hash did not change."""
        self._require_writer()
        with self._conn:
            self._conn.executemany("UPDATE items SET size = ?, mtime_ns = ? WHERE path = ?",
                                   [(s, m, p) for p, s, m in updates])
        self._dirty = True

    def remove(self, paths: Iterable[str]) -> int:
        """Forget images (and their failure records); returns how many embeddings went."""
        self._require_writer()
        paths = list(paths)
        with self._conn:
            removed = self._forget(paths)
            self._conn.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])
        self._dirty = True
        return removed

    def record_failures(self, failures: Iterable[Failure]) -> None:
        self._require_writer()
        failures = list(failures)
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)",
                                   [(f.path, f.reason, f.size, f.mtime_ns) for f in failures])
            # a file that used to embed and is now broken must not keep its stale embedding
            self._forget([f.path for f in failures])
        self._dirty = True

    def _forget(self, paths: list[str]) -> int:
        """Delete these paths' items inside the caller's transaction, counting each as dead in its shard.

        The dead counts steer :meth:`consolidate` without scanning the manifest; merges re-read the
        items they move, so a count that is off (a store written by an older tl_embed) costs only a
        merge at a different time, never a row.
        """
        pairs = [(p,) for p in paths]
        self._conn.executemany("UPDATE shards SET dead = dead + 1 WHERE id = (SELECT shard FROM items WHERE path = ?)",
                               pairs)
        before = self._conn.total_changes
        self._conn.executemany("DELETE FROM items WHERE path = ?", pairs)
        return self._conn.total_changes - before

    def consolidate(self) -> None:
        """Keep reads fast after a run, at a cost that grows with what changed, not with the store.

        Stores up to :data:`CONSOLIDATE_BYTES` are compacted into one shard (a zero-copy memory map).
        Larger ones are merged size-tiered: shards whose live rows fall in the same power-of-
        :data:`TIER_FANOUT` tier are merged once :data:`TIER_FANOUT` of them exist, and a shard that is
        mostly garbage (deleted or replaced rows) is rewritten alone.  So adding k images to a store of
        N rows writes O(k) bytes most of the time (each row is rewritten about log(N) times over its
        life), and every merge streams chunk by chunk: memory stays bounded whatever N is.
        """
        self._require_writer()
        while (group := self._next_merge()) is not None:
            self._merge(group)

    def _next_merge(self) -> list[int] | None:
        """The shards :meth:`consolidate` should merge next, or None when the store is in shape."""
        table = self._query("SELECT id, rows, dead FROM shards ORDER BY id")
        shards = [(sid, n) for sid, n, _ in table]
        live = {sid: n - dead for sid, n, dead in table}
        empty = [sid for sid, _ in shards if live[sid] <= 0]
        if empty:  # shards whose rows were all deleted or replaced
            return empty
        if sum(live.values()) * self.dim * self.dtype.itemsize <= CONSOLIDATE_BYTES:
            whole = len(shards) > 1 or any(live[sid] < n for sid, n in shards)
            return [sid for sid, _ in shards] if whole else None
        for sid, n in shards:
            if live[sid] < GARBAGE_SHARE * n:
                return [sid]
        tiers: dict[int, list[int]] = {}
        for sid, _ in shards:
            tiers.setdefault(int(math.log(max(live[sid], 1), TIER_FANOUT)), []).append(sid)
        return next((group for group in tiers.values() if len(group) >= TIER_FANOUT), None)

    def compact(self) -> None:
        """Rewrite all live rows into one shard, in manifest order, streaming (bounded memory)."""
        self._require_writer()
        shards = self._query("SELECT id, rows FROM shards")
        if len(shards) > 1 or (shards and shards[0][1] != len(self)):
            self._merge([sid for sid, _ in shards])

    def _merge(self, sids: list[int], chunk: int = 16_384) -> None:
        """Copy the live rows of ``sids`` into one new shard, repoint them, then drop the old shards.

        The new shard is durable before the transaction that repoints its rows commits; old files are
        unlinked afterwards (a crash in between leaves orphans the next writer deletes), and a reader
        whose snapshot still names them retries on a fresh snapshot.
        """
        self._view()  # map the shards this writer has just added
        placeholders = ",".join("?" * len(sids))
        items = np.array(self._conn.execute(
            f"SELECT id, shard, row FROM items WHERE shard IN ({placeholders}) ORDER BY shard, row", sids
        ).fetchall(), dtype=np.int64).reshape(-1, 3)
        if not len(items):
            self._replace_shards(sids, [])
            return
        sid, name = self._next_shard()
        target = self.path / "shards" / name
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(len(items), self.dim))
            _reserve(tmp)  # a full disk is an OSError here, not a SIGBUS while writing through the map
            for start in range(0, len(items), chunk):
                part = items[start:start + chunk]
                for src in np.unique(part[:, 1]):
                    rows = part[:, 1] == src
                    out[start + np.flatnonzero(rows)] = self._shards[int(src)][part[rows, 2]]
            out.flush()
            del out
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
        self._replace_shards(sids, [(sid, name, len(items))],
                             [(sid, i, int(item)) for i, item in enumerate(items[:, 0])])

    def _replace_shards(self, old: list[int], new: list[tuple[int, str, int]],
                        repoint: list[tuple[int, int, int]] = ()) -> None:
        """One transaction: add ``new`` shards, repoint items (shard, row, id), forget ``old``; then unlink."""
        files = [f for sid in old for (f,) in self._conn.execute("SELECT file FROM shards WHERE id = ?", (sid,))]
        with self._conn:
            self._conn.executemany("INSERT INTO shards (id, file, rows) VALUES (?, ?, ?)", new)
            self._conn.executemany("UPDATE items SET shard = ?, row = ? WHERE id = ?", repoint)
            self._conn.executemany("DELETE FROM shards WHERE id = ?", [(s,) for s in old])
        with _shard_lock(self.path, exclusive=True):  # waits for readers mapping an older snapshot
            for f in files:
                (self.path / "shards" / f).unlink(missing_ok=True)
        self._load()

    def refresh(self) -> None:
        """Re-read the manifest (after writes, or to see another writer's commits)."""
        self._load()

    def _next_shard(self) -> tuple[int, str]:
        row = self._conn.execute("SELECT MAX(id) FROM shards").fetchone()[0]
        on_disk = [int(p.stem) for p in (self.path / "shards").glob("*.npy") if p.stem.isdigit()]
        sid = max([row or 0, *on_disk]) + 1
        return sid, f"{sid:08d}.npy"

    def _write_shard(self, vectors: np.ndarray) -> tuple[int, str]:
        sid, name = self._next_shard()
        atomic_write(self.path / "shards" / name, lambda f: np.save(f, vectors))
        return sid, name

    def _remove_orphan_files(self) -> None:
        """Delete shard files no manifest row references and temp files of a crashed writer."""
        known = {f for (f,) in self._conn.execute("SELECT file FROM shards")}
        with _shard_lock(self.path, exclusive=True):
            for p in (self.path / "shards").iterdir():
                if p.name not in known:
                    p.unlink(missing_ok=True)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A writer's connection (WAL, full sync) or a reader's one-snapshot connection.

    The reader's URI is built by pathlib (percent-encoded), so ``#``, ``?`` or ``%`` in a store's path
    cannot turn ``mode=ro`` into part of the file name.  On read-only media SQLite cannot create the
    WAL's shared-memory file; nobody can write there, so the file is opened as immutable.
    """
    try:
        if readonly:
            uri = path.absolute().as_uri()
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
                conn.execute("BEGIN")  # one snapshot for the whole read
                conn.execute("SELECT 1 FROM meta LIMIT 1")
            except sqlite3.OperationalError as e:
                if not _read_only_media(path, e):
                    raise
                conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
                conn.execute("BEGIN")
            return conn
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn
    except sqlite3.DatabaseError as e:
        if not readonly and _read_only_media(path, e):
            raise StoreReadOnlyError(f"store {path.parent} is read-only ({e}); it can be read but not "
                                     "changed") from None
        raise _manifest_error(path.parent, e, "opened") from None


def _manifest_error(store: Path, e: sqlite3.DatabaseError, verb: str) -> Exception:
    """SQLite's "disk I/O error" on a full disk (it cannot grow its WAL files) is no damage: say the disk
    is full, as every other full-disk case does; anything else is a damaged manifest."""
    if disk_is_full(store):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store))
    return StoreDamagedError(store, f"its manifest cannot be {verb} ({e})")


def _rows_outside(locations: np.ndarray, shard_rows: dict[int, int]) -> np.ndarray:
    """Positions of (shard, row) locations that fall outside the shards' sizes (or name no shard)."""
    if not len(locations):
        return np.zeros(0, dtype=np.int64)
    limit = np.zeros(int(max(locations[:, 0].max(), 0)) + 1, dtype=np.int64)
    for sid, n in shard_rows.items():
        if 0 <= sid < len(limit):
            limit[sid] = n
    sids = np.maximum(locations[:, 0], 0)
    return np.flatnonzero((locations[:, 0] < 0) | (locations[:, 1] < 0) | (locations[:, 1] >= limit[sids]))


def _shard_ok(file: Path, rows: int, dim: int) -> bool:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False).shape == (rows, dim)
    except (OSError, ValueError, EOFError):
        return False


def _read_only_media(path: Path, e: Exception) -> bool:
    """Whether an SQLite failure comes from a folder we may not write to (read-only mount, permissions)."""
    return "readonly" in str(e) or "unable to open" in str(e) or not os.access(path.parent, os.W_OK)


def _read_meta(path: Path, conn: sqlite3.Connection) -> dict[str, str]:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError as e:
        raise _manifest_error(path, e, "read") from None
    version = meta.get("format_version")
    if version is None:
        raise StoreDamagedError(path, "its manifest has no format record")
    if version != str(FORMAT_VERSION):
        raise StoreError(f"{path} has store format {version}, this tl_embed reads format {FORMAT_VERSION}")
    return meta


READERS_LOCK = ".readers.lock"


@contextlib.contextmanager
def _shard_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Shared: a reader between reading the shard table and mapping the shards; exclusive: a writer
    unlinking shards.  Held for milliseconds.  Without a lock file we may open (another user's store,
    read-only media) a reader goes on unlocked and relies on retrying a fresh snapshot."""
    fd = None
    for flags in ((os.O_RDONLY,), (os.O_RDWR | os.O_CREAT, 0o644)):
        try:
            fd = os.open(path / READERS_LOCK, *flags)
            break
        except OSError:
            continue
    if fd is None:
        if exclusive:
            raise StoreError(f"cannot create {path / READERS_LOCK}: check the store folder's permissions")
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _reserve(path: Path) -> None:
    """Allocate a file's blocks now: a memory map writing into a sparse file on a full disk gets SIGBUS."""
    with open(path, "rb+") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except (AttributeError, OSError) as e:  # no posix_fallocate here, or a file system without it
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        block = 1 << 20
        for start in range(0, size, block):  # zeros written are blocks allocated; the map overwrites them
            f.seek(start)
            f.write(bytes(min(block, size - start)))
        f.flush()


def _lock(path: Path) -> int:
    """Take the store's writer lock; the OS releases it if the process dies."""
    try:
        fd = try_lock(path / ".lock")
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreReadOnlyError(f"store {path} is read-only ({e.strerror}); it can be read but not "
                                     "changed") from None
        raise
    if fd is None:
        raise StoreError(f"{path} is being written by another tl-embed process; "
                         "wait for it to finish (only one writer at a time)")
    return fd


def _remove_unopened(path: Path) -> None:
    """Remove the store :meth:`EmbeddingStore.create` has just renamed into place and could not open,
    unless another writer got to it in between (then it holds that writer's work)."""
    try:
        fd = try_lock(path / ".lock")
    except OSError:
        return
    if fd is not None:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            unlock(fd)


def _remove_dead_temp_folders(path: Path) -> None:
    """Temp folders of store creations whose process is gone (killed mid-creation)."""
    for tmp in path.parent.glob(f".{path.name}.creating-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    """Make a freshly built folder durable before it is renamed into place."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [*(d for d in folder.rglob("*") if d.is_dir()), folder]:
        fsync_dir(d)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
