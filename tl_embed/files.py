"""Files that are never half-written: the helpers every stage that writes a file uses."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def atomic_write(target: Path, write) -> None:
    """Write via a temp file in the same folder, fsync it, rename over ``target``, fsync the folder."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        if e.errno is None:  # numpy's writers say only "N requested and M written": a short write
            raise OSError(errno.ENOSPC if disk_is_full(target.parent) else errno.EIO,
                          f"short write ({e})", str(target)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def disk_is_full(folder: Path, spare: int = 256 * 1024) -> bool:
    """Whether the file system holding ``folder`` has (nearly) no room left: what a failure without an
    errno (a short write, SQLite's "disk I/O error") most likely meant."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < spare


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` as the user's umask leaves it: what ``mkdir`` would have made (``mkdtemp`` makes 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (the folder's entry, not just the data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(lock_file: Path) -> int | None:
    """Open ``lock_file`` and take an exclusive flock without waiting: the fd, or None when another
    process holds it.  The OS releases the lock when the holder dies, so a killed writer never blocks.
    Release it with :func:`unlock`."""
    import fcntl

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _held.add(fd)
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken by :func:`try_lock`."""
    _held.discard(fd)
    os.close(fd)


_held: set[int] = set()  # lock fds this process holds


def _drop_locks_in_child() -> None:
    """A forked child must not keep this process's locks alive.

    An flock belongs to the open file, which ``fork`` shares: a child that outlives the writer's
    ``close`` (multiprocessing, OpenVINO's telemetry sender forked during a model conversion and left
    waiting on the network) would hold the lock, and the next writer would be refused.
    """
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):  # POSIX; where there is no fork there is nothing to inherit
    os.register_at_fork(after_in_child=_drop_locks_in_child)
