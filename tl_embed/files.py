"""Files that are never half-written: the one helper every stage that writes a file uses."""

from __future__ import annotations

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
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
