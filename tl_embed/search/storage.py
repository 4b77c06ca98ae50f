"""An index on disk: one file ``NAME.tli/index.bin`` written whole, and its compact id -> path table.

Format 2: a fixed header (magic, format version, the sizes of the three parts, CRC-32 of all of
them), the JSON meta (store uid and path, backbone, factory, metric, search parameters, quality),
the id table, then the serialized FAISS index.  The id table is three arrays, not a JSON list:
``n`` int64 store ids, ``n + 1`` int64 offsets and one UTF-8 blob of paths relative to the store's
image root: 16 bytes plus the path per vector (about 35 MB at a million images, read with one
``read``; format 1's JSON list, about 60 MB, is parsed into a million Python lists on every open).
Format 3 is format 2 with one more part before the FAISS index: named arrays (an uncompressed ``.npz``,
read without pickle) that the index applies to vectors, such as its whitening (see :mod:`.whiten`).  It
is written only by an index that has such arrays, so every other index stays readable by releases that
know format 2 alone.

The file is written with :func:`~tl_embed.files.atomic_write` (temp file, fsync, rename): the FAISS
index is streamed into it (no second in-memory copy of a GB-sized index), then the header with sizes
and checksum is written over the placeholder at its start.  A reader sees the old index or the new
one, never a new index with an old id table.  Writers hold an flock on ``NAME.tli/.lock``.  Format 1
(same header without the table, paths in the meta) and the format before it (``index.faiss`` +
``meta.json``) still open and are rewritten in format 2 by their next update.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import IndexDamagedError, TlEmbedError
from ..files import atomic_write, try_lock, unlock
from ..kinds import INDEX, INDEX_FILE, OLD_INDEX_FILES, require_output

DATA_FILE, LOCK_FILE = INDEX_FILE, ".lock"
OLD_FILES = OLD_INDEX_FILES  # the format before index.bin: two files renamed separately
FORMAT_VERSION = 3
MAGIC = b"TLINDEX\n"
PREFIX = struct.Struct("<8sI")  # magic, format version: the start of every version's header
HEADER_V3 = struct.Struct("<8sIQQQQI")  # magic, version, meta, table, arrays and FAISS bytes, CRC-32 of the four
HEADER = struct.Struct("<8sIQQQI")  # format 2: magic, version, meta, table and FAISS bytes, CRC-32 of the three
HEADER_V1 = struct.Struct("<8sIQQI")  # magic, version, meta bytes, FAISS bytes, CRC-32 of both
HEADERS = {1: HEADER_V1, 2: HEADER, 3: HEADER_V3}
REQUIRED_META = ("spec", "factory", "metric", "store", "root")


class IdTable(Mapping):
    """Store id -> absolute image path, for the vectors an index holds (a read-only Mapping).

    Ids are kept in the store's manifest order; lookups by id go through a sorted view made on
    first use.  Paths are decoded only for the hits a search returns.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, blob: bytes, root: str):
        self.ids, self.offsets, self.blob, self.root = ids, offsets, blob, root
        self._order: np.ndarray | None = None

    @classmethod
    def from_paths(cls, ids: np.ndarray, paths: Iterable[list[str]], root: str) -> IdTable:
        """A table from ids and their relative paths, given in batches (bounded memory)."""
        parts, lengths = [], []
        for batch in paths:
            encoded = [p.encode() for p in batch]
            parts.append(b"".join(encoded))
            lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
        return cls(np.ascontiguousarray(ids, np.int64), offsets, b"".join(parts), root)

    @classmethod
    def from_pairs(cls, pairs: list, root: str) -> IdTable:
        """Format 1's ``[[id, absolute path], ...]`` list, kept absolute (root unknown to it)."""
        ids = np.array([int(i) for i, _ in pairs], np.int64)
        return cls.from_paths(ids, [[str(p) for _, p in pairs]], "")

    def to_bytes(self) -> bytes:
        n = np.array([len(self.ids)], np.int64)
        return n.tobytes() + self.ids.tobytes() + self.offsets.tobytes() + self.blob

    @classmethod
    def from_bytes(cls, data: bytes, root: str) -> IdTable:
        n = int(np.frombuffer(data, np.int64, 1)[0])
        ids = np.frombuffer(data, np.int64, n, 8)
        offsets = np.frombuffer(data, np.int64, n + 1, 8 + 8 * n)
        blob = data[16 + 16 * n:]
        if n < 0 or offsets[-1] != len(blob) or (n and np.any(np.diff(offsets) < 0)):
            raise ValueError("id table sizes disagree")
        return cls(ids, offsets, blob, root)

    def position(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the table, -1 for ids it does not hold."""
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        return lookup(self.ids, self._order, np.asarray(ids, np.int64))

    def relative(self, row: int) -> str:
        return self.blob[self.offsets[row]:self.offsets[row + 1]].decode()

    def absolute(self, rel: str) -> str:
        return str(Path(self.root) / rel) if self.root else rel

    def __getitem__(self, ident: int) -> str:
        row = int(self.position(np.array([ident]))[0])
        if row < 0:
            raise KeyError(ident)
        return self.absolute(self.relative(row))

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, rel: str) -> int | None:
        """The id of a relative path (a substring search of the blob in C: no path -> id dict to build)."""
        needle = rel.encode()
        at = self.blob.find(needle)
        while at >= 0:
            row = int(np.searchsorted(self.offsets, at))
            if row < len(self.ids) and self.offsets[row] == at and self.offsets[row + 1] == at + len(needle):
                return int(self.ids[row])
            at = self.blob.find(needle, at + 1)
        return None


def lookup(keys: np.ndarray, order: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``keys`` (sorted by ``order``) of each wanted key, -1 where absent."""
    if not len(keys):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)
    found = order[at]
    return np.where(keys[found] == wanted, found, -1)


def write(path: Path, faiss_index, table: IdTable, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> int:
    """Write meta, id table, arrays (format 3, if any) and FAISS index as one file, atomically.

    Returns the bytes they take.
    """
    import faiss

    meta_bytes = json.dumps(meta).encode()
    table_bytes = table.to_bytes()
    array_bytes = _array_bytes(arrays) if arrays else b""
    header = HEADER_V3 if arrays else HEADER
    sizes = {}

    def write_parts(f) -> None:
        f.write(b"\0" * header.size)
        f.write(meta_bytes)
        f.write(table_bytes)
        f.write(array_bytes)
        crc = zlib.crc32(array_bytes, zlib.crc32(table_bytes, zlib.crc32(meta_bytes)))
        written = 0

        def sink(chunk: bytes) -> None:
            nonlocal crc, written
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
            written += len(chunk)

        writer = faiss.PyCallbackIOWriter(sink)
        faiss.write_index(faiss_index, writer)
        del writer  # flushes its last buffer into sink
        f.seek(0)
        parts = (len(meta_bytes), len(table_bytes), *([len(array_bytes)] if arrays else []), written)
        f.write(header.pack(MAGIC, 3 if arrays else 2, *parts, crc))
        f.seek(0, os.SEEK_END)
        sizes["index"] = written

    atomic_write(path / DATA_FILE, write_parts)
    for name in OLD_FILES:
        (path / name).unlink(missing_ok=True)
    return sizes["index"] + len(table_bytes) + len(array_bytes)


def _array_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrays(path: Path, data: bytes) -> dict[str, np.ndarray]:
    if not data:
        return {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as e:  # zipfile.BadZipFile is an OSError
        raise IndexDamagedError(path, f"its arrays are unreadable ({type(e).__name__}: {e})") from None


def read(path: Path) -> tuple[object, IdTable, dict, dict[str, np.ndarray]]:
    """(FAISS index, id table, meta, arrays) of the index at ``path``; IndexDamagedError if it is damaged."""
    for _ in range(2):  # an old-format index converted meanwhile: its files go once DATA_FILE exists
        try:
            with open(path / DATA_FILE, "rb") as f:
                return _read(path, f)
        except FileNotFoundError:
            pass
        if not any((path / name).exists() for name in OLD_FILES):
            break
        try:
            return _read_old(path)
        except FileNotFoundError:
            continue
    missing = [name for name in OLD_FILES if not (path / name).exists()]
    if len(missing) == 1:
        raise IndexDamagedError(path, f"{missing[0]} is missing")
    if (path / LOCK_FILE).exists():
        raise IndexDamagedError(path, f"{DATA_FILE} is missing")
    raise TlEmbedError(f"{path} is not a tl_embed index; build one with `tl-embed index STORE --out {path}`")


def _read(path: Path, f) -> tuple[object, IdTable, dict, dict[str, np.ndarray]]:
    start = f.read(PREFIX.size)
    if len(start) < PREFIX.size or start[:len(MAGIC)] != MAGIC:
        raise IndexDamagedError(path, f"{DATA_FILE} is not a tl_embed index file")
    version = PREFIX.unpack(start)[1]
    if version > FORMAT_VERSION:
        raise TlEmbedError(f"index {path} was written by a newer tl_embed (format {version}); upgrade to read it")
    header = HEADERS.get(version)
    if header is None:
        raise IndexDamagedError(path, f"{DATA_FILE} has an unknown format version {version}")
    rest = f.read(header.size - PREFIX.size)
    if len(rest) < header.size - PREFIX.size:
        raise IndexDamagedError(path, f"{DATA_FILE} is not a tl_embed index file")
    _, _, *lengths, crc = header.unpack(start + rest)
    meta_len, data_len = lengths[0], lengths[-1]
    table_len = lengths[1] if len(lengths) >= 3 else 0
    arrays_len = lengths[2] if len(lengths) == 4 else 0
    size = os.fstat(f.fileno()).st_size
    if size != header.size + sum(lengths):
        raise IndexDamagedError(path, f"{DATA_FILE} has {size} bytes, its header says {header.size + sum(lengths)}")
    meta_bytes = f.read(meta_len)
    table_bytes = f.read(table_len)
    array_bytes = f.read(arrays_len)
    reader = _CrcReader(f, zlib.crc32(array_bytes, zlib.crc32(table_bytes, zlib.crc32(meta_bytes))))
    index = _read_faiss(path, reader)
    if reader.crc != crc:
        raise IndexDamagedError(path, f"{DATA_FILE} fails its checksum")
    meta = _parse_meta(path, meta_bytes, needs_paths=version < 2)
    meta["memory_bytes"] = data_len + table_len + arrays_len
    return index, _table(path, meta, table_bytes), meta, _arrays(path, array_bytes)


def _read_old(path: Path) -> tuple[object, IdTable, dict, dict[str, np.ndarray]]:
    meta = _parse_meta(path, (path / OLD_FILES[1]).read_bytes(), needs_paths=True)
    with open(path / OLD_FILES[0], "rb") as f:
        index = _read_faiss(path, _CrcReader(f, 0))
    return index, _table(path, meta, b""), meta, {}


def _table(path: Path, meta: dict, data: bytes) -> IdTable:
    """The id table of format 2, or one made from format 1's JSON list of [id, path]."""
    try:
        if "paths" in meta:
            return IdTable.from_pairs(meta.pop("paths"), meta["root"])
        return IdTable.from_bytes(data, meta["root"])
    except (KeyError, TypeError, ValueError) as e:
        raise IndexDamagedError(path, f"its id table is unreadable ({type(e).__name__}: {e})") from None


class _CrcReader:
    """File reads for FAISS's callback reader that also keep a running CRC-32 of what was read."""

    def __init__(self, f, crc: int):
        self.f, self.crc = f, crc

    def __call__(self, n: int) -> bytes:
        data = self.f.read(n)
        self.crc = zlib.crc32(data, self.crc)
        return data


def _read_faiss(path: Path, reader: _CrcReader):
    import faiss

    from .build import faiss_reason

    try:
        return faiss.read_index(faiss.PyCallbackIOReader(reader))
    except (RuntimeError, MemoryError) as e:
        raise IndexDamagedError(path, f"FAISS cannot read its index data: {faiss_reason(e)}") from None


def _parse_meta(path: Path, data: bytes, needs_paths: bool) -> dict:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexDamagedError(path, f"its meta is not valid JSON: {e}") from None
    required = (*REQUIRED_META, "paths") if needs_paths else REQUIRED_META
    missing = [k for k in required if k not in meta] if isinstance(meta, dict) else ["all keys"]
    if missing:
        raise IndexDamagedError(path, f"its meta lacks {', '.join(missing)}")
    return meta


def holds_index(path: Path) -> bool:
    return any((path / name).exists() for name in (DATA_FILE, *OLD_FILES))


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s writer lock (flock; the OS releases it if the process dies) while writing it.

    A folder this call created is removed again if the build fails, so no empty "index" is left.
    """
    require_output(out, INDEX)  # a store holds a .lock too: never take it for an index
    created = not out.exists()
    if not created and not (out.is_dir() and (holds_index(out) or (out / LOCK_FILE).exists()
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
        unlock(fd)
