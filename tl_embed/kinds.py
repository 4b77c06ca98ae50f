"""What kind of tl_embed file a path holds, told from its content, so the wrong one is refused by name.

Users pass a store where an index belongs, a head where a store belongs; unchecked, every command answers
with its own confusing line ("index pets.tle is damaged", "Not a directory", "does not exist" of a file
that exists), and a writer could put an index into a store.  Every command checks its arguments here
before any heavy import: inputs must be of the kind the command reads, and an output may only replace a
file of its own kind.  The files that mark each kind live here, and the modules that write them use them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .errors import TlEmbedError

STORE, INDEX, HEAD, EXPORT = "store", "index", "head", "export"
REPORT = "report"  # a page or table a command writes for people (never recognised by content)
STORE_MANIFEST = "manifest.sqlite"  # a store folder's SQLite manifest
INDEX_FILE = "index.bin"  # an index folder's one data file
OLD_INDEX_FILES = ("index.faiss", "meta.json")  # an index of the format before index.bin
HEAD_META = "head.json"  # the first member of a model file (a zip)
EXPORT_MANIFEST = "export.json"  # an export-model folder's manifest

NAMES = {STORE: "an embedding store", INDEX: "a search index", HEAD: "a model file (a trained head)",
         EXPORT: "an exported model folder", REPORT: "a report"}
SUFFIXES = {STORE: ".tle", INDEX: ".tli", HEAD: ".tlh", EXPORT: "", REPORT: ".html"}


def kind_of(path: str | os.PathLike) -> str | None:
    """``store``, ``index``, ``head`` or ``export`` by content; None for anything else or nothing."""
    p = Path(path)
    if p.is_dir():
        if (p / STORE_MANIFEST).is_file():
            return STORE
        if (p / INDEX_FILE).is_file() or any((p / name).is_file() for name in OLD_INDEX_FILES):
            return INDEX
        if (p / EXPORT_MANIFEST).is_file():
            return EXPORT
        return None
    try:
        with zipfile.ZipFile(p) as z:
            return HEAD if HEAD_META in z.namelist() else None
    except (OSError, zipfile.BadZipFile):
        return None


def require(path: str | os.PathLike, *expected: str) -> None:
    """Refuse ``path`` when it is a tl_embed file of another kind than ``expected``, saying what to run.

    Anything else (a missing path, an image, a damaged file) is left to the reader, which knows best.
    """
    found = kind_of(path)
    if found is None or found in expected:
        return
    want = " or ".join(NAMES[k].split(" (")[0] for k in expected)
    raise TlEmbedError(f"{path} is {NAMES[found]}, not {want}: {_hint(Path(path), found, expected[0])}")


def require_output(path: str | os.PathLike, kind: str) -> None:
    """Refuse to write ``kind`` over a tl_embed file of another kind (an index into a store, a head over one)."""
    found = kind_of(path)
    if found is not None and found != kind:
        raise TlEmbedError(f"--out {path} is {NAMES[found]}; writing {NAMES[kind]} there would destroy it: "
                           f"choose another --out (e.g. {_sibling(Path(path), kind)})")


def _hint(path: Path, found: str, want: str) -> str:
    if found == STORE and want == INDEX:
        return f"build one with `tl-embed index {path} --out {_sibling(path, INDEX)}`"
    if found == STORE and want == HEAD:
        return f"train one with `tl-embed train {path} --out {_sibling(path, HEAD)}`"
    if want == STORE:
        return "embed a folder of images into one with `tl-embed embed IMAGES --out NAME.tle`"
    if want == REPORT:
        return f"write an audit report with `tl-embed audit {path if found == STORE else 'STORE'} --format json`"
    if want == INDEX:
        return "build one from a store with `tl-embed index STORE --out NAME.tli`"
    return "train one from a store with `tl-embed train STORE --out NAME.tlh`"


def _sibling(path: Path, kind: str) -> Path:
    """``pets.tle`` -> ``pets.tli``: the name the user most likely meant for ``kind``."""
    stem = path.name[: -len(path.suffix)] if path.suffix in SUFFIXES.values() and path.suffix else path.name
    return path.with_name(stem + SUFFIXES[kind]) if SUFFIXES[kind] else path.with_name(stem + "-export")
