"""The store folder: which process may change it, and how a new one appears whole.

``.lock`` is held (flock) by the one writer; the OS drops it when the writer dies, so a crash never
leaves a store locked.  ``.readers.lock`` is held shared by a reader while it maps the shards of its
snapshot and exclusively by the writer while it unlinks shards, so no reader maps a shard that is
gone.  A new store is built in a hidden temp folder named after its process, made durable, then
renamed into place: a folder named like a store is always a complete store, and the temp folder of a
killed creation is recognised by its dead process and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ...errors import StoreError, StoreReadOnlyError
from ...files import fsync_dir, try_lock, unlock

WRITER_LOCK = ".lock"
READERS_LOCK = ".readers.lock"


def writer_lock(path: Path) -> int:
    """Take the store's writer lock; the OS releases it if the process dies."""
    try:
        fd = try_lock(path / WRITER_LOCK)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreReadOnlyError(f"store {path} is read-only ({e.strerror}); it can be read but not "
                                     "changed") from None
        raise
    if fd is None:
        raise StoreError(f"{path} is being written by another tl-embed process; "
                         "wait for it to finish (only one writer at a time)")
    return fd


@contextlib.contextmanager
def shard_lock(path: Path, exclusive: bool) -> Iterator[None]:
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


def build_in_place(path: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` on a hidden temp folder beside ``path``, make it durable, rename it to ``path``.

    A crash, Ctrl-C or full disk at any point leaves either no store or the complete one: the temp
    folder is removed on the way out, or by a later creation once its process is gone.
    """
    _remove_dead_temp_folders(path)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        build(tmp)
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


def remove_unopened(path: Path) -> None:
    """Remove the store :meth:`EmbeddingStore.create` has just renamed into place and could not open,
    unless another writer got to it in between (then it holds that writer's work)."""
    try:
        fd = try_lock(path / WRITER_LOCK)
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
