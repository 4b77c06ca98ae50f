"""The read side of every store handle: one manifest snapshot and the shards it names, mapped.

A handle reads one SQLite snapshot at a time and maps the shards it names under the shared readers
lock, so the snapshot it holds is whole: the writer unlinks a shard only under that lock exclusively,
after the commit that stopped naming it, and a shard already mapped stays readable after an unlink.
Opening reads only the shard table; rows are read on first use, and :meth:`StoreReader.iter_chunks`
and :meth:`StoreReader.take` read any store in bounded memory.  The writer (:class:`EmbeddingStore`
opened with ``mode="a"``) reads through the same code and reloads after its own commits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from ...errors import StoreDamagedError
from ...files import atomic_write, unlock
from ..backbones import BackboneSpec
from ..records import Failure, ManifestRow
from . import manifest, shards
from .folder import shard_lock

_Handle = TypeVar("_Handle", bound="StoreReader")


class StoreReader:
    """A store's rows and vectors, read from one manifest snapshot: what every handle can do.

    ``embeddings`` (N x D), ``paths``, ``labels``, ``splits``, ``rows`` are aligned.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None):
        """Read the meta and the first snapshot; ``lock_fd`` is the writer lock, or None for a reader."""
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self.meta = meta = manifest.read_meta(path, conn)
        try:
            self.spec = BackboneSpec.from_dict(json.loads(meta["spec"]))
            self.dtype = np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreDamagedError(path, "its backbone record is missing or unreadable "
                                    f"({type(e).__name__}: {e})") from None
        self.root = Path(meta["root"]) if meta.get("root") else None
        self._load()

    def close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            unlock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def uid(self) -> str:
        """Identity of this store, fixed at creation: indexes record it to refuse another store's data."""
        if "uid" in self.meta:
            return self.meta["uid"]
        return hashlib.sha256(f"{self.meta.get('root')}|{self.meta.get('created')}".encode()).hexdigest()[:32]

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
                    with shard_lock(self.path, exclusive=False):
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
        shard_files, self._count = manifest.snapshot(self.path, self._conn, fresh=self._lock_fd is None)
        self._shards = {sid: self._map_shard(f, n) for sid, f, n in shard_files}
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # (locations N x 2, ids)
        self._rows_cache: list[ManifestRow] | None = None
        self._index: dict[str, int] | None = None
        self._embeddings: np.ndarray | None = None
        self._dirty = False

    def _map_shard(self, name: str, rows: int) -> np.ndarray:
        return shards.map_shard(self.path, name, rows, self.dim, self.dtype)

    def _located(self) -> tuple[np.ndarray, np.ndarray]:
        """(N x 2 (shard, row) locations, N ids) in manifest order, read once per snapshot as arrays."""
        self._view()
        if self._positions is None:
            locations, ids = manifest.locations(self.path, self._conn)
            bad = shards.rows_outside(locations, {sid: len(a) for sid, a in self._shards.items()})
            if len(bad):
                raise StoreDamagedError(self.path, f"manifest rows point outside their shard ({len(bad)} of them; "
                                        f"first: item id {ids[bad[0]]})", repairable=True)
            self._positions = (locations, ids)
        return self._positions

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
            self._rows_cache = manifest.rows(self.path, self._conn)
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
            self._embeddings = shards.assemble(self._shards, *self._located(), self.dim, self.dtype)
        return self._embeddings

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start position, ids, vectors) for consecutive runs of at most ``rows`` rows, in manifest order.

        Memory stays at one chunk (default: :data:`CHUNK_BYTES` of vectors) whatever the store's size:
        index builds and heads read large stores this way.
        """
        rows = rows or shards.chunk_rows(self.dim * self.dtype.itemsize)
        yield from shards.chunks(self._shards, *self._located(), rows)

    def take(self, positions: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The vectors at ``positions`` (row numbers, any order) as one array, read shard by shard.

        Only the requested rows are read (cost O(len(positions)), not O(N)): index builds sample
        training rows this way and re-ranking reads a query's shortlist from the memory maps.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=dtype)
        if not len(positions):
            return out
        return shards.gather(self._shards, self._located()[0][positions], out)

    def release_pages(self) -> None:
        """Let go of the shard pages this reader has mapped in (see :func:`shards.drop_pages`).

        Long passes that read rows with :meth:`take` call this between batches, so the process's
        resident size stays at what it holds, not at the size of the store.  :meth:`iter_chunks` does
        it after every chunk.
        """
        for shard in self._shards.values():
            shards.drop_pages(shard)

    def iter_paths(self, rows: int = 65_536) -> Iterator[list[str]]:
        """Relative paths in manifest order, ``rows`` at a time (no ManifestRow per image)."""
        self._located()
        yield from manifest.iter_paths(self._conn, rows)

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
        return manifest.failures(self._conn)

    def failure_for(self, rel: str) -> Failure | None:
        return manifest.failure_for(self._conn, rel)

    def summary(self) -> dict:
        """Counts for ``tl-embed info``."""
        labels: dict[str, int] = {}
        splits: dict[str, int] = {}
        for r in self.rows:
            labels[r.label or "(none)"] = labels.get(r.label or "(none)", 0) + 1
            splits[r.split or "(none)"] = splits.get(r.split or "(none)", 0) + 1
        return {"images": len(self), "failed": len(self.failures), "labels": labels,
                "splits": splits, "shards": manifest.shard_count(self._conn), "dtype": str(self.dtype),
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

    @property
    def writable(self) -> bool:
        """Whether this handle holds the writer lock (``mode="a"``)."""
        return self._lock_fd is not None

    def refresh(self) -> None:
        """Re-read the manifest (after writes, or to see another writer's commits)."""
        self._load()
