"""Find the images of a folder: recursive scan, labels and splits from folder names.

A real folder holds more than images: broken or looping links, pipes, names that are not UTF-8,
folder links back to a parent, sub-folders we may not read. Each ends up in :class:`Scan` (a failure
with a reason, or an unreadable folder whose stored embeddings must be kept), never in an exception.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TlEmbedError
from ..kinds import STORE_MANIFEST as MANIFEST
from .images import is_image_file, not_regular_reason, os_error_reason
from .records import Failure

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


@dataclass(frozen=True)
class ImageFile:
    """A file found by :func:`scan`; ``rel`` uses forward slashes, relative to the root."""

    rel: str
    path: Path
    label: str | None
    split: str | None
    size: int
    mtime_ns: int


@dataclass
class Scan:
    """What :func:`scan` found: files to embed, image entries that cannot be, folders it could not list."""

    files: list[ImageFile] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # broken/looping links, pipes, non-UTF-8 names
    unreadable: dict[str, str] = field(default_factory=dict)  # folder (printable rel) -> why

    def under_unreadable(self, rel: str) -> bool:
        """Whether ``rel`` lies in a folder we could not read: its absence proves nothing."""
        return any(rel.startswith(folder + "/") for folder in self.unreadable)


def scan(root: str | os.PathLike) -> Scan:
    """All image files under ``root`` (recursive, sorted; hidden files and folders skipped).

    Folder links are followed, but every real folder is scanned once (the first way found, real
    paths before links), so a link to a parent or a second link to a folder adds nothing.
    Labels follow ``image_dataset_from_directory``: the first sub-folder; a top level named
    train/val/validation/test is the split and the next level is the label.
    """
    root = Path(root)
    if not root.is_dir():
        raise TlEmbedError(f"{root} is not a folder of images")
    found = Scan()
    visited = _ancestors(root) | {_key(root.stat())}
    links: deque[tuple[str, str]] = deque()
    _walk(str(root), "", found, visited, links)
    if "" in found.unreadable:
        raise TlEmbedError(f"cannot read {root}: {found.unreadable['']}")
    while links:  # after every real folder, so a real path always wins over a link to it
        path, rel = links.popleft()
        try:
            key = _key(os.stat(path))
        except OSError as e:  # changed since we listed it
            found.unreadable[printable(rel)] = os_error_reason(e)
            continue
        if key not in visited:
            visited.add(key)
            _walk(path, rel, found, visited, links)
    found.files.sort(key=lambda f: f.rel)
    found.failures.sort(key=lambda f: f.path)
    return found


def _walk(top: str, top_rel: str, found: Scan, visited: set[tuple[int, int]],
          links: deque[tuple[str, str]]) -> None:
    """Depth-first over real folders from ``top``; folder links are queued in ``links`` instead."""
    stack = [(top, top_rel)]
    while stack:
        folder, rel = stack.pop()
        subfolders = []
        for entry in _list(folder, rel, found):
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            if (sub := _visit(entry, entry_rel, found)) is None:
                continue
            if entry.is_symlink():
                links.append((entry.path, entry_rel))
            elif (key := _key(sub)) not in visited:
                visited.add(key)
                subfolders.append((entry.path, entry_rel))
        stack.extend(reversed(subfolders))


def _list(folder: str, rel: str, found: Scan) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        found.unreadable[printable(rel)] = os_error_reason(e)
        return []


def _visit(entry: os.DirEntry, rel: str, found: Scan) -> os.stat_result | None:
    """Record an image (or why it cannot be one); returns the stat of a sub-folder to descend into."""
    image = is_image_file(Path(entry.name))
    try:
        st = entry.stat()  # follows links
    except OSError as e:
        if image:
            found.failures.append(_failure(entry, rel, _link_reason(entry, e)))
        elif not entry.is_file(follow_symlinks=False):  # a link or folder: what the store holds under it stays
            found.unreadable[printable(rel)] = _link_reason(entry, e)
        return None
    if stat.S_ISDIR(st.st_mode):
        return None if os.path.exists(os.path.join(entry.path, MANIFEST)) else st  # skip stores inside
    if not image:
        return None
    if not is_utf8(rel):
        what = "file" if not is_utf8(entry.name) else "folder"
        found.failures.append(_failure(entry, rel, f"{what} name is not valid UTF-8; rename it"))
    elif not stat.S_ISREG(st.st_mode):
        found.failures.append(_failure(entry, rel, not_regular_reason(st.st_mode)))
    else:
        label, split = label_and_split(rel)
        found.files.append(ImageFile(rel, Path(entry.path), label, split, st.st_size, st.st_mtime_ns))
    return None


def _link_reason(entry: os.DirEntry, e: OSError) -> str:
    if e.errno == errno.ENOENT and entry.is_symlink():
        try:
            return f"broken link: its target {printable(os.readlink(entry.path))} does not exist"
        except OSError:
            pass
    return os_error_reason(e)


def _failure(entry: os.DirEntry, rel: str, reason: str) -> Failure:
    """A failure keyed by the entry's own (link) size and mtime, so an unchanged one is not retried."""
    try:
        st = entry.stat(follow_symlinks=False)
        size, mtime_ns = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime_ns = 0, 0
    return Failure(printable(rel), reason, size, mtime_ns)


def is_utf8(name: str) -> bool:
    """False for names with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """``name`` as valid UTF-8, undecodable bytes shown as ``\\xNN`` (safe for SQLite and terminals)."""
    return name if is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _ancestors(root: Path) -> set[tuple[int, int]]:
    """The folders above ``root``: a link to one of them would lead back into the root."""
    keys = set()
    for parent in root.resolve().parents:
        try:
            keys.add(_key(parent.stat()))
        except OSError:
            pass
    return keys


def label_and_split(rel: str) -> tuple[str | None, str | None]:
    parts = rel.split("/")[:-1]
    split = None
    if parts and parts[0].lower() in SPLIT_NAMES:
        split = SPLIT_NAMES[parts[0].lower()]
        parts = parts[1:]
    return (parts[0] if parts else None), split


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Image files and folders (searched recursively) -> sorted image files."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            paths += [f.path for f in scan(p).files]
        elif p.is_file():
            paths.append(p)
        else:
            raise TlEmbedError(f"{p} does not exist")
    return paths
