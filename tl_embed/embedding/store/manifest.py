"""The store's SQLite manifest: which shards exist, which shard row holds which image, what failed.

The manifest is the store's record of truth: an image is in the store exactly when the transaction
that added it committed, and the store commits only after the shard it points into is durable.  Every
statement that reads or changes the manifest is here, each change one transaction, so a crash leaves
the manifest as of the last commit.  A failing SQLite comes out as the store's own error (a full disk
says so; anything else is a damaged manifest), never as a bare ``sqlite3`` exception.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import StoreDamagedError, StoreError, StoreReadOnlyError
from ...files import disk_is_full
from ...kinds import STORE_MANIFEST
from ..backbones import BackboneSpec
from ..records import Failure, ManifestRow

FORMAT_VERSION = 1
MANIFEST = STORE_MANIFEST

SCHEMA = """
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

# ---------------------------------------------------------------- opening


def create(folder: Path, spec: BackboneSpec, dtype: str, root: str | os.PathLike | None) -> None:
    """Write a new manifest into ``folder`` (a temp folder, not yet renamed into place)."""
    conn = sqlite3.connect(folder / MANIFEST)
    try:
        with conn:
            conn.executescript(SCHEMA)
            meta = {"format_version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict()),
                    "dtype": dtype, "root": str(Path(root).resolve()) if root else "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tl_embed_version": __version__,
                    "uid": uuid.uuid4().hex}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    finally:
        conn.close()


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
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
        raise manifest_error(path.parent, e, "opened") from None


def upgrade_schema(conn: sqlite3.Connection) -> None:
    """Stores made by an earlier tl_embed get the shard index and dead-row counts on their first write."""
    columns = {c for _, c, *_ in conn.execute("PRAGMA table_info(shards)")}
    with conn:
        conn.execute("CREATE INDEX IF NOT EXISTS items_by_shard ON items (shard, row)")
        if "dead" not in columns:
            conn.execute("ALTER TABLE shards ADD COLUMN dead INTEGER NOT NULL DEFAULT 0")


def read_meta(path: Path, conn: sqlite3.Connection) -> dict[str, str]:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError as e:
        raise manifest_error(path, e, "read") from None
    version = meta.get("format_version")
    if version is None:
        raise StoreDamagedError(path, "its manifest has no format record")
    if version != str(FORMAT_VERSION):
        raise StoreError(f"{path} has store format {version}, this tl_embed reads format {FORMAT_VERSION}")
    return meta


def manifest_error(store: Path, e: sqlite3.DatabaseError, verb: str) -> Exception:
    """SQLite's "disk I/O error" on a full disk (it cannot grow its WAL files) is no damage: say the disk
    is full, as every other full-disk case does; anything else is a damaged manifest."""
    if disk_is_full(store):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store))
    return StoreDamagedError(store, f"its manifest cannot be {verb} ({e})")


def _read_only_media(path: Path, e: Exception) -> bool:
    """Whether an SQLite failure comes from a folder we may not write to (read-only mount, permissions)."""
    return "readonly" in str(e) or "unable to open" in str(e) or not os.access(path.parent, os.W_OK)


# -------------------------------------------------------------- reading


def _read(store: Path, conn: sqlite3.Connection, sql: str) -> list[tuple]:
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.DatabaseError as e:
        raise manifest_error(store, e, "read") from None


def snapshot(store: Path, conn: sqlite3.Connection, fresh: bool) -> tuple[list[tuple[int, str, int]], int]:
    """(id, file, rows) of every shard and the number of items, as of one snapshot.

    A reader (``fresh``) first ends its previous snapshot transaction and starts a new one.
    """
    try:
        if fresh:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
        shard_files = conn.execute("SELECT id, file, rows FROM shards").fetchall()
        count = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise manifest_error(store, e, "read") from None
    return shard_files, count


def shard_table(conn: sqlite3.Connection) -> list[tuple[int, str, int]]:
    """(id, file, rows) of every shard."""
    return conn.execute("SELECT id, file, rows FROM shards").fetchall()


def shard_usage(store: Path, conn: sqlite3.Connection) -> list[tuple[int, int, int]]:
    """(id, rows, dead rows) of every shard, by id: what :meth:`consolidate` plans from."""
    return _read(store, conn, "SELECT id, rows, dead FROM shards ORDER BY id")


def shard_sizes(store: Path, conn: sqlite3.Connection) -> list[tuple[int, int]]:
    return _read(store, conn, "SELECT id, rows FROM shards")


def shard_files(conn: sqlite3.Connection) -> set[str]:
    return {f for (f,) in conn.execute("SELECT file FROM shards")}


def shard_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM shards").fetchone()[0]


def last_shard_id(conn: sqlite3.Connection) -> int | None:
    return conn.execute("SELECT MAX(id) FROM shards").fetchone()[0]


def locations(store: Path, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
    """(N x 2 (shard, row) locations, N ids) in manifest order, as arrays (no Python object per row)."""
    flat = np.array(_read(store, conn, "SELECT shard, row, id FROM items ORDER BY shard, row"),
                    dtype=np.int64).reshape(-1, 3)
    return np.ascontiguousarray(flat[:, :2]), np.ascontiguousarray(flat[:, 2])


def rows(store: Path, conn: sqlite3.Connection) -> list[ManifestRow]:
    """Every item in manifest order (the order of :func:`locations`)."""
    return [ManifestRow(*r) for r in _read(
        store, conn,
        "SELECT path, label, split, sha256, size, mtime_ns, width, height FROM items ORDER BY shard, row")]


def iter_paths(conn: sqlite3.Connection, rows: int) -> Iterator[list[str]]:
    """Relative paths in manifest order, ``rows`` at a time, by keyset paging (no OFFSET scan)."""
    last = (-1, -1)
    while True:
        batch = conn.execute("SELECT shard, row, path FROM items WHERE (shard, row) > (?, ?) "
                             "ORDER BY shard, row LIMIT ?", (*last, rows)).fetchall()
        if not batch:
            return
        last = batch[-1][:2]
        yield [p for _, _, p in batch]


def items_in(conn: sqlite3.Connection, sids: list[int]) -> np.ndarray:
    """(id, shard, row) of the live items of shards ``sids``, in shard and row order."""
    placeholders = ",".join("?" * len(sids))
    return np.array(conn.execute(
        f"SELECT id, shard, row FROM items WHERE shard IN ({placeholders}) ORDER BY shard, row", sids
    ).fetchall(), dtype=np.int64).reshape(-1, 3)


def failures(conn: sqlite3.Connection) -> list[Failure]:
    return [Failure(*r) for r in conn.execute("SELECT path, reason, size, mtime_ns FROM failures ORDER BY path")]


def failure_for(conn: sqlite3.Connection, rel: str) -> Failure | None:
    r = conn.execute("SELECT path, reason, size, mtime_ns FROM failures WHERE path = ?", (rel,)).fetchone()
    return Failure(*r) if r else None


# -------------------------------------------------------------- writing


def add(conn: sqlite3.Connection, sid: int, name: str, rows: Sequence[ManifestRow]) -> None:
    """One transaction: the (already durable) shard ``name`` and its rows, replacing rows of the same path."""
    with conn:
        conn.execute("INSERT INTO shards (id, file, rows) VALUES (?, ?, ?)", (sid, name, len(rows)))
        _forget(conn, [r.path for r in rows])
        conn.executemany("DELETE FROM failures WHERE path = ?", [(r.path,) for r in rows])
        conn.executemany(
            "INSERT INTO items (path, label, split, sha256, size, mtime_ns, width, height, "
            "shard, row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.path, r.label, r.split, r.sha256, r.size, r.mtime_ns, r.width, r.height, sid, i)
             for i, r in enumerate(rows)])


def touch(conn: sqlite3.Connection, updates: Iterable[tuple[str, int, int]]) -> None:
    with conn:
        conn.executemany("UPDATE items SET size = ?, mtime_ns = ? WHERE path = ?",
                         [(s, m, p) for p, s, m in updates])


def remove(conn: sqlite3.Connection, paths: list[str]) -> int:
    """One transaction: forget these paths' items and failure records; returns how many items went."""
    with conn:
        removed = _forget(conn, paths)
        conn.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])
    return removed


def record_failures(conn: sqlite3.Connection, failures: list[Failure]) -> None:
    with conn:
        conn.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)",
                         [(f.path, f.reason, f.size, f.mtime_ns) for f in failures])
        # a file that used to embed and is now broken must not keep its stale embedding
        _forget(conn, [f.path for f in failures])


def _forget(conn: sqlite3.Connection, paths: list[str]) -> int:
    """Delete these paths' items inside the caller's transaction, counting each as dead in its shard.

    The dead counts steer :meth:`consolidate` without scanning the manifest; merges re-read the
    items they move, so a count that is off (a store written by an older tl_embed) costs only a
    merge at a different time, never a row.
    """
    pairs = [(p,) for p in paths]
    conn.executemany("UPDATE shards SET dead = dead + 1 WHERE id = (SELECT shard FROM items WHERE path = ?)", pairs)
    before = conn.total_changes
    conn.executemany("DELETE FROM items WHERE path = ?", pairs)
    return conn.total_changes - before


def replace_shards(conn: sqlite3.Connection, old: list[int], new: list[tuple[int, str, int]],
                   repoint: Sequence[tuple[int, int, int]] = ()) -> list[str]:
    """One transaction: add ``new`` shards, repoint items (shard, row, id), forget ``old``.

    Returns the files of the ``old`` shards, for the caller to unlink once this has committed.
    """
    files = [f for sid in old for (f,) in conn.execute("SELECT file FROM shards WHERE id = ?", (sid,))]
    with conn:
        conn.executemany("INSERT INTO shards (id, file, rows) VALUES (?, ?, ?)", new)
        conn.executemany("UPDATE items SET shard = ?, row = ? WHERE id = ?", repoint)
        conn.executemany("DELETE FROM shards WHERE id = ?", [(s,) for s in old])
    return files


def forget_shards(conn: sqlite3.Connection, bad: list[int]) -> int:
    """One transaction: drop shards ``bad`` and every item in them or outside any shard; returns items dropped."""
    with conn:
        before = conn.total_changes
        conn.executemany("DELETE FROM items WHERE shard = ?", [(b,) for b in bad])
        conn.execute("DELETE FROM items WHERE shard NOT IN (SELECT id FROM shards) OR "
                     "row >= (SELECT rows FROM shards WHERE shards.id = items.shard)")
        dropped = conn.total_changes - before
        conn.executemany("DELETE FROM shards WHERE id = ?", [(b,) for b in bad])
    return dropped
