"""Files that change which stored rows a head learns from, or with which label, without touching the images.

``train --exclude FILE`` reads the ``path`` column of a CSV (what ``tl-embed audit --out audit.csv``
writes; a file with one path per line works too), and ``--relabel FILE`` reads ``path,label`` rows.
Paths are the store's (relative to its image root); absolute paths under the root are accepted too.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import TlEmbedError


def read_paths(file: str | os.PathLike, root: str | os.PathLike | None = None) -> set[str]:
    """The paths listed in ``file``: a CSV's ``path`` column, or one path per line."""
    rows = _rows(file)
    if rows and "path" in rows[0]:
        column = rows[0].index("path")
        listed = [r[column] for r in rows[1:] if len(r) > column]
    else:
        listed = [r[0] for r in rows if r]
    return {_relative(p, root) for p in listed if p.strip()}


def read_relabel(file: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, str]:
    """``path -> label`` from a CSV with ``path`` and ``label`` columns."""
    rows = _rows(file)
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise TlEmbedError(f"{file}: a relabel file is a CSV with a header naming 'path' and 'label' columns")
    p, lab = rows[0].index("path"), rows[0].index("label")
    found = {}
    for n, r in enumerate(rows[1:], 2):
        if len(r) <= max(p, lab) or not r[lab].strip():
            raise TlEmbedError(f"{file}, line {n}: expected a path and a non-empty label")
        found[_relative(r[p], root)] = r[lab].strip()
    return found


def _rows(file: str | os.PathLike) -> list[list[str]]:
    try:
        with open(file, newline="", encoding="utf-8") as f:
            return [[cell.strip() for cell in row] for row in csv.reader(f)]
    except OSError as e:
        raise TlEmbedError(f"cannot read {file}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise TlEmbedError(f"{file} is not a UTF-8 CSV file ({e})") from None


def _relative(path: str, root: str | os.PathLike | None) -> str:
    """A store path: as given, or relative to ``root`` when it is an absolute path under it."""
    p = Path(path)
    if root and p.is_absolute():
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return path
    return p.as_posix()
