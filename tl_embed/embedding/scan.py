"""Find the images of a folder: recursive scan, labels and splits from folder names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TlEmbedError
from .images import is_image_file
from .store import MANIFEST

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


def scan(root: str | os.PathLike) -> list[ImageFile]:
    """All image files under ``root`` (recursive, sorted; hidden files and folders skipped).

    Labels follow ``image_dataset_from_directory``: the first sub-folder; a top level named
    train/val/validation/test is the split and the next level is the label.
    """
    root = Path(root)
    if not root.is_dir():
        raise TlEmbedError(f"{root} is not a folder of images")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and
                             not (Path(dirpath, d) / MANIFEST).exists())  # skip stores inside
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not is_image_file(path):
                continue
            rel = path.relative_to(root).as_posix()
            label, split = label_and_split(rel)
            st = path.stat()
            found.append(ImageFile(rel, path, label, split, st.st_size, st.st_mtime_ns))
    return found


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
            paths += [f.path for f in scan(p)]
        elif p.is_file():
            paths.append(p)
        else:
            raise TlEmbedError(f"{p} does not exist")
    return paths
