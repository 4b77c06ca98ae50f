"""Shard files: ``shards/NNNNNNNN.npy``, rows x dim arrays written once and never modified.

A shard, new or merged, becomes visible under its final name only complete and durable (temp file,
fsync, rename, fsync of the folder), so any shard the manifest names holds all its rows; a shard no
manifest row names yet is an orphan the next writer deletes.  Reads go through memory maps, so a
reader still holding a map keeps its rows after a writer unlinks the file.  Merges stream chunk by
chunk (bounded memory) into a map whose blocks are allocated first, so a full disk is an error before
the copy, never a SIGBUS during it.  The size-tier rules that decide what to merge are here too.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import StoreDamagedError, first_line
from ...files import atomic_write, fsync_dir

TIER_FANOUT = 8  # larger stores merge 8 shards of a size tier into one
CHUNK_BYTES = 64 * 2**20  # iter_chunks' default chunk
GARBAGE_SHARE = 0.5  # a shard with fewer live rows than this share of its rows is rewritten


def next_shard(folder: Path, last_id: int | None) -> tuple[int, str]:
    """A shard id and file name above both the manifest's last id and any file on disk (an orphan's)."""
    on_disk = [int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit()]
    sid = max([last_id or 0, *on_disk]) + 1
    return sid, f"{sid:08d}.npy"


def write(file: Path, vectors: np.ndarray) -> None:
    """Write one shard durably (temp file, fsync, rename, fsync of the folder)."""
    atomic_write(file, lambda f: np.save(f, vectors))


def map_shard(store: Path, name: str, rows: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Memory-map one shard, checking it is the rows x dim array the manifest says.

    A missing file stays a :class:`FileNotFoundError`: a reader may have lost the race with a writer
    that unlinked it, and retries on a fresh snapshot.
    """
    try:
        arr = np.load(store / "shards" / name, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise StoreDamagedError(store, f"shard {name} is unreadable ({first_line(e)})", repairable=True) from None
    if arr.shape != (rows, dim) or arr.dtype != dtype:
        raise StoreDamagedError(store, f"shard {name} holds {arr.shape} {arr.dtype}, the manifest "
                                f"expects ({rows}, {dim}) {dtype}", repairable=True)
    return arr


def shard_ok(file: Path, rows: int, dim: int) -> bool:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False).shape == (rows, dim)
    except (OSError, ValueError, EOFError):
        return False


def rows_outside(locations: np.ndarray, shard_rows: dict[int, int]) -> np.ndarray:
    """Positions of (shard, row) locations that fall outside the shards' sizes (or name no shard)."""
    if not len(locations):
        return np.zeros(0, dtype=np.int64)
    limit = np.zeros(int(max(locations[:, 0].max(), 0)) + 1, dtype=np.int64)
    for sid, n in shard_rows.items():
        if 0 <= sid < len(limit):
            limit[sid] = n
    sids = np.maximum(locations[:, 0], 0)
    return np.flatnonzero((locations[:, 0] < 0) | (locations[:, 1] < 0) | (locations[:, 1] >= limit[sids]))


# --------------------------------------------------------------- reading rows


def chunks(shards: dict[int, np.ndarray], locations: np.ndarray, ids: np.ndarray,
           rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start position, ids, vectors) for runs of at most ``rows`` rows of one shard, in manifest order."""
    start = 0
    while start < len(locations):
        sid = locations[start, 0]
        end = min(start + rows, int(np.searchsorted(locations[:, 0], sid, side="right")))
        yield start, ids[start:end], np.asarray(shards[int(sid)][locations[start:end, 1]])  # a copy
        drop_pages(shards[int(sid)])
        start = end


def drop_pages(shard: np.ndarray) -> None:
    """Unmap the pages of a shard this process has read; they stay in the OS page cache.

    A memory map's pages count in the process's resident size until it lets go of them, so one pass
    over a store larger than memory would otherwise show as that much RSS (and compete with the
    heap).  Reading a page again is a minor fault from the page cache, not a disk read.
    """
    mapped = getattr(shard, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk when the caller names none: :data:`CHUNK_BYTES` of vectors, at least 1024 rows."""
    return max(1024, CHUNK_BYTES // row_bytes)


def assemble(shards: dict[int, np.ndarray], locations: np.ndarray, ids: np.ndarray, dim: int,
             dtype: np.dtype) -> np.ndarray:
    """All rows as one N x D array: the shard's own memory map when one shard holds them in order."""
    if not len(locations):
        return np.zeros((0, dim), dtype=dtype)
    sids = np.unique(locations[:, 0])
    if len(sids) == 1:
        shard = shards[int(sids[0])]
        rows = locations[:, 1]
        if len(rows) == len(shard) and np.array_equal(rows, np.arange(len(shard))):
            return shard  # the compacted case: zero-copy memory map
    out = np.empty((len(locations), dim), dtype=dtype)
    for start, _, chunk in chunks(shards, locations, ids, chunk_rows(dim * dtype.itemsize)):
        out[start:start + len(chunk)] = chunk
    return out


def gather(shards: dict[int, np.ndarray], locations: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` with the rows at ``locations`` (any order), reading shard by shard."""
    for sid in np.unique(locations[:, 0]):
        mine = np.flatnonzero(locations[:, 0] == sid)
        out[mine] = shards[int(sid)][locations[mine, 1]]
    return out


# ------------------------------------------------------------------- merging


def plan_merge(usage: list[tuple[int, int, int]], row_bytes: int, one_shard_bytes: int) -> list[int] | None:
    """The shards to merge next, from (id, rows, dead rows) by id, or None when the store is in shape.

    Shards without live rows go first.  A store of at most ``one_shard_bytes`` live bytes becomes one
    shard holding only live rows.  A larger one rewrites a shard that is mostly garbage alone, else
    merges :data:`TIER_FANOUT` shards whose live rows fall in the same power-of-:data:`TIER_FANOUT` tier.
    """
    shards = [(sid, n) for sid, n, _ in usage]
    live = {sid: n - dead for sid, n, dead in usage}
    empty = [sid for sid, _ in shards if live[sid] <= 0]
    if empty:  # shards whose rows were all deleted or replaced
        return empty
    if sum(live.values()) * row_bytes <= one_shard_bytes:
        whole = len(shards) > 1 or any(live[sid] < n for sid, n in shards)
        return [sid for sid, _ in shards] if whole else None
    for sid, n in shards:
        if live[sid] < GARBAGE_SHARE * n:
            return [sid]
    tiers: dict[int, list[int]] = {}
    for sid, _ in shards:
        tiers.setdefault(int(math.log(max(live[sid], 1), TIER_FANOUT)), []).append(sid)
    return next((group for group in tiers.values() if len(group) >= TIER_FANOUT), None)


def write_merged(target: Path, items: np.ndarray, shards: dict[int, np.ndarray], dim: int, dtype: np.dtype,
                 chunk: int) -> None:
    """Copy the rows of ``items`` ((id, shard, row), in order) into the new shard ``target``, durably.

    Streams ``chunk`` rows at a time through a memory map, so memory stays bounded whatever the size.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(items), dim))
        _reserve(tmp)  # a full disk is an OSError here, not a SIGBUS while writing through the map
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            for src in np.unique(part[:, 1]):
                rows = part[:, 1] == src
                out[start + np.flatnonzero(rows)] = shards[int(src)][part[rows, 2]]
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


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


def unlink(folder: Path, files: list[str]) -> None:
    """Delete shard files; the caller holds the readers lock exclusively and has committed their removal."""
    for f in files:
        (folder / f).unlink(missing_ok=True)


def remove_unknown(folder: Path, known: set[str]) -> None:
    """Delete files the manifest does not name: orphan shards and temp files of a crashed writer.

    The caller holds the writer lock (no other writer is mid-write) and the readers lock exclusively.
    """
    for p in folder.iterdir():
        if p.name not in known:
            p.unlink(missing_ok=True)
