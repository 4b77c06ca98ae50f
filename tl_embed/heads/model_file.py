"""The ``.tlh`` model file: a zip of ``head.json`` plus one ``.npy`` per array, never a pickle.

Loading reads JSON and plain arrays (``allow_pickle=False``), so a model file someone sent you is
data: nothing in it runs.  Members are stored uncompressed and their sizes are checked against the
file before anything is read, so a crafted file cannot blow up memory either.  Files of the first
format (joblib pickles, ``tl_embed.head/1``) open only with ``trust_pickle=True``.

Because the file holds arrays rather than scikit-learn objects, the scikit-learn version that
trained a head does not affect its predictions; it is recorded for the record.  A file of a newer
format than this tl_embed reads is refused with a line saying to upgrade.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TlEmbedError
from ..files import atomic_write
from ..kinds import HEAD, HEAD_META, kind_of, require_output
from .graph import Step

FORMAT = "tl_embed.head/2"
PICKLE_FORMAT = "tl_embed.head/1"
META = HEAD_META
MAX_META_BYTES = 64 << 20  # metrics + params; far below this in practice
BACKBONE = "backbone/"  # an int8 store's model, carried by the head trained on it (embedding/carried.py)


def write_model(path: Path, meta: dict[str, Any], steps: list[Step], backbone: dict[str, bytes] | None = None) -> None:
    """Write ``meta`` (JSON-ready), ``steps`` and the ``backbone`` files the head carries (if any) atomically as
    one zip file, never over another kind of file."""
    require_output(path, HEAD)
    if path.is_file() and kind_of(path) != HEAD and not _looks_pickled(path):
        raise TlEmbedError(f"--out {path} is a file but not a tl_embed model file; choose another --out "
                           "(only a model file is replaced)")
    described = []
    for i, step in enumerate(steps):
        arrays = {name: f"steps/{i}/{name}.npy" for name in step.arrays}
        described.append({"op": step.op, "attrs": step.attrs, "arrays": arrays})
    doc = json.dumps({"format": FORMAT, **meta, "steps": described}, indent=1).encode()

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(META, doc)
            for i, step in enumerate(steps):
                for name, arr in step.arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                    z.writestr(f"steps/{i}/{name}.npy", buf.getvalue())
            for name, data in (backbone or {}).items():
                z.writestr(BACKBONE + name, data)

    atomic_write(path, write)


def read_model(path: Path, trust_pickle: bool = False) -> tuple[dict[str, Any], list[Step] | Any]:
    """(meta, steps) of a model file; for a trusted old pickle, (meta, fitted sklearn pipeline)."""
    if not path.is_file():
        raise TlEmbedError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        if _looks_pickled(path):
            return _read_pickle(path, trust_pickle)
        raise TlEmbedError(f"{path} is not a readable tl_embed model file ({FORMAT})")
    try:
        with zipfile.ZipFile(path) as z:
            meta = _read_meta(path, z)
            steps = [Step(s["op"], {n: _read_array(path, z, m) for n, m in s["arrays"].items()}, s["attrs"])
                     for s in meta.pop("steps")]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError, OSError) as e:
        raise TlEmbedError(f"{path} is not a readable tl_embed model file ({_why(e)}): train it again") from None
    return meta, steps


def read_backbone(path: Path) -> dict[str, bytes] | None:
    """The backbone files a model file carries, or None (only heads of int8 stores carry one)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if i.filename.startswith(BACKBONE)]
            if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > os.path.getsize(path) for i in members):
                raise TlEmbedError(f"{path} carries a backbone that is compressed or larger than the file")
            return {i.filename[len(BACKBONE):]: z.read(i) for i in members} or None
    except (zipfile.BadZipFile, OSError) as e:
        raise TlEmbedError(f"{path} is not a readable tl_embed model file ({_why(e)}): train it again") from None


def _read_meta(path: Path, z: zipfile.ZipFile) -> dict[str, Any]:
    info = z.getinfo(META)
    if info.file_size > MAX_META_BYTES:
        raise ValueError(f"{META} is {info.file_size} bytes")
    meta = json.loads(z.read(info))
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("tl_embed.head/")
        raise TlEmbedError(f"{path} is a {fmt} model file; this tl_embed reads {FORMAT}: upgrade tl_embed"
                           if newer else f"{path} is not a tl_embed model file ({FORMAT})")
    return meta


def _read_array(path: Path, z: zipfile.ZipFile, member: str) -> np.ndarray:
    info = z.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > os.path.getsize(path):
        raise ValueError(f"{member} is compressed or larger than the file")
    with z.open(info) as f:
        arr = np.lib.format.read_array(f, allow_pickle=False)
    if arr.dtype.kind not in "fi":
        raise ValueError(f"{member} holds {arr.dtype}, not numbers")
    return arr


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) or a zlib stream, which is how joblib wrote ``tl_embed.head/1`` files."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and (head[0] == 0x80 or (head[0] == 0x78 and head[1] in (0x01, 0x5E, 0x9C, 0xDA)))


def _read_pickle(path: Path, trust_pickle: bool) -> tuple[dict[str, Any], Any]:
    """An old joblib model file: unpickled only when the user vouches for it."""
    if not trust_pickle:
        raise TlEmbedError(f"{path} is an old pickle model file ({PICKLE_FORMAT}): loading it would run code "
                           "from the file. Pass --trust-pickle only if you trust where it came from; or train it "
                           "again (model files are now plain arrays, safe to share)")
    import joblib
    import sklearn

    try:
        payload = joblib.load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        raise TlEmbedError(f"{path} is not a readable tl_embed model file: {_why(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != PICKLE_FORMAT:
        raise TlEmbedError(f"{path} is not a tl_embed model file ({FORMAT})")
    saved = payload.get("versions", {}).get("scikit-learn")
    if saved and saved != sklearn.__version__:
        warnings.warn(f"{path} was trained with scikit-learn {saved} and is unpickled with "
                      f"{sklearn.__version__}: its predictions may differ; train it again to be sure",
                      stacklevel=2)
    payload.pop("format")
    return payload, payload.pop("pipeline")


def _why(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
