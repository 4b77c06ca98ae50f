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

:class:`EmbeddingStore` (here) opens and writes, and keeps that ordering in one place; the parts it
composes are :mod:`.reader` (the snapshot a handle reads), :mod:`.manifest` (every SQL statement),
:mod:`.shards` (shard files, memory maps, merges) and :mod:`.folder` (the locks, and creating a store
folder whole).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...errors import StoreError
from ...files import unlock
from ...kinds import STORE, require_output
from .. import carried
from ..backbones import BackboneSpec
from ..records import Failure, ManifestRow
from . import manifest, shards
from .folder import READERS_LOCK, build_in_place, remove_unopened, shard_lock, writer_lock
from .manifest import FORMAT_VERSION, MANIFEST
from .reader import StoreReader
from .shards import CHUNK_BYTES, GARBAGE_SHARE, TIER_FANOUT

__all__ = ["CHUNK_BYTES", "CONSOLIDATE_BYTES", "DTYPES", "FORMAT_VERSION", "GARBAGE_SHARE", "MANIFEST",
           "READERS_LOCK", "TIER_FANOUT", "EmbeddingStore", "Failure", "ManifestRow"]

DTYPES = ("float32", "float16")
CONSOLIDATE_BYTES = 256 * 2**20  # stores up to this size are kept as one shard (one memory map)


class EmbeddingStore(StoreReader):
    """An embedding store opened for reading (``mode="r"``) or as its single writer (``"a"``).

    Read side (:class:`~.reader.StoreReader`): ``embeddings`` (N x D), ``paths``, ``labels``, ``splits``,
    ``rows`` are aligned.  Write side: :meth:`add` commits one batch atomically; :meth:`remove`;
    :meth:`compact`.
    """

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, spec: BackboneSpec, dtype: str = "float32",
               root: str | os.PathLike | None = None, carry: dict[str, bytes] | None = None) -> EmbeddingStore:
        """Create a new, empty store and open it for writing.

        ``carry``: the files of the model the store is embedded with, when only the store can hold them
        (an int8 model, :mod:`..carried`); written in ``model/`` with the rest, so a store never lacks it.

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

        def build(tmp: Path) -> None:
            (tmp / "shards").mkdir(parents=True)
            manifest.create(tmp, spec, dtype, root)
            if carry is not None:
                carried.write_files(carry, tmp / carried.FOLDER)

        build_in_place(path, build)
        try:
            return cls.open(path, "a")
        except (OSError, StoreError):  # e.g. no room left for SQLite's WAL: take back the empty store just
            remove_unopened(path)  # made, so creation stays all or nothing
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
        lock_fd = writer_lock(path) if mode == "a" else None
        try:
            conn = manifest.connect(path / MANIFEST, readonly=(mode == "r"))
            store = cls(path, conn, lock_fd)
        except BaseException:
            if lock_fd is not None:
                unlock(lock_fd)
            raise
        if mode == "a":
            store._remove_orphan_files()
            manifest.upgrade_schema(store._conn)
        return store

    @classmethod
    def repair(cls, path: str | os.PathLike) -> int:
        """Forget the rows whose shard is missing or unreadable, so the next run embeds them again.

        Returns how many rows were forgotten.  The images themselves are untouched; only vectors that
        are already lost are dropped from the manifest.
        """
        path = Path(path)
        lock_fd = writer_lock(path)
        try:
            conn = manifest.connect(path / MANIFEST)
            try:
                dim = BackboneSpec.from_dict(json.loads(manifest.read_meta(path, conn)["spec"])).dim
                bad = [sid for sid, f, n in manifest.shard_table(conn)
                       if not shards.shard_ok(path / "shards" / f, n, dim)]
                return manifest.forget_shards(conn, bad)
            finally:
                conn.close()
        finally:
            unlock(lock_fd)

    # ------------------------------------------------------------ write side
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
        sid, name = self._next_shard()
        shards.write(self.path / "shards" / name, vectors.astype(self.dtype, copy=False))
        manifest.add(self._conn, sid, name, rows)  # commits only now that the shard is durable
        self._dirty = True

    def touch(self, updates: Iterable[tuple[str, int, int]]) -> None:
        """Record a new (size, mtime) for images whose content hash did not change."""
        self._require_writer()
        manifest.touch(self._conn, updates)
        self._dirty = True

    def remove(self, paths: Iterable[str]) -> int:
        """Forget images (and their failure records); returns how many embeddings went."""
        self._require_writer()
        removed = manifest.remove(self._conn, list(paths))
        self._dirty = True
        return removed

    def record_failures(self, failures: Iterable[Failure]) -> None:
        self._require_writer()
        manifest.record_failures(self._conn, list(failures))
        self._dirty = True

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
        row_bytes = self.dim * self.dtype.itemsize
        while (group := shards.plan_merge(manifest.shard_usage(self.path, self._conn), row_bytes,
                                          CONSOLIDATE_BYTES)) is not None:
            self._merge(group)

    def compact(self) -> None:
        """Rewrite all live rows into one shard, in manifest order, streaming (bounded memory)."""
        self._require_writer()
        sizes = manifest.shard_sizes(self.path, self._conn)
        if len(sizes) > 1 or (sizes and sizes[0][1] != len(self)):
            self._merge([sid for sid, _ in sizes])

    def _merge(self, sids: list[int], chunk: int = 16_384) -> None:
        """Copy the live rows of ``sids`` into one new shard, repoint them, then drop the old shards.

        The new shard is durable before the transaction that repoints its rows commits; old files are
        unlinked afterwards (a crash in between leaves orphans the next writer deletes), and a reader
        whose snapshot still names them retries on a fresh snapshot.
        """
        self._view()  # map the shards this writer has just added
        items = manifest.items_in(self._conn, sids)
        if not len(items):
            self._replace_shards(sids, [])
            return
        sid, name = self._next_shard()
        shards.write_merged(self.path / "shards" / name, items, self._shards, self.dim, self.dtype, chunk)
        self._replace_shards(sids, [(sid, name, len(items))],
                             [(sid, i, int(item)) for i, item in enumerate(items[:, 0])])

    def _replace_shards(self, old: list[int], new: list[tuple[int, str, int]],
                        repoint: Sequence[tuple[int, int, int]] = ()) -> None:
        """One transaction: add ``new`` shards, repoint items (shard, row, id), forget ``old``; then unlink."""
        files = manifest.replace_shards(self._conn, old, new, repoint)
        with shard_lock(self.path, exclusive=True):  # waits for readers mapping an older snapshot
            shards.unlink(self.path / "shards", files)
        self._load()

    def _next_shard(self) -> tuple[int, str]:
        return shards.next_shard(self.path / "shards", manifest.last_shard_id(self._conn))

    def _remove_orphan_files(self) -> None:
        """Delete shard files no manifest row references and temp files of a crashed writer."""
        known = manifest.shard_files(self._conn)
        with shard_lock(self.path, exclusive=True):
            shards.remove_unknown(self.path / "shards", known)
