"""The two records the embedding flow passes along: an embedded image and an image that failed.

They are plain values with no behaviour, kept apart from the store so the flow's first step
(:mod:`.scan`) can report a failure without importing the store that is its last.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestRow:
    """One embedded image; ``path`` is relative to the store's image root."""

    path: str
    label: str | None
    split: str | None
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """An image that could not be embedded, why, and the size and mtime of the file that failed."""

    path: str
    reason: str
    size: int
    mtime_ns: int
