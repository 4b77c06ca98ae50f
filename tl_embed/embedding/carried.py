"""Models that travel with what they made: the int8 backbone of a store, in the store, its indexes and heads.

A quantized model depends on the images it was calibrated on, so it cannot be rebuilt from the spec on
another machine or after a cache was cleared.  The store carries its OpenVINO IR (``model/model.xml`` +
``model.bin``); an index built from the store and a head trained on it each hold a copy in their one file.
The IR's identity (:func:`files_sha256`) is the spec's ``model_sha256``, so whatever carries it is checked
against the spec it claims to compute.

To embed, a carried model is first *installed* into the converted-model cache under its sha256 (once;
opening a store, index or head does it), and runtimes then find it by the spec alone, like a converted
fp32 model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import TlEmbedError
from .backbones import BackboneSpec, converted_cache_dir

FOLDER = "model"  # inside a store or an index
FILES = ("model.xml", "model.bin")
ARRAY_PREFIX = "backbone_"
NAMES = re.compile(rb'\snames?="[^"]*"')  # node and tensor names in an IR's XML


def files_sha256(files: dict[str, bytes]) -> str:
    """The identity of an IR: its weights and its graph without names.

    OpenVINO names the nodes it creates from a per-process counter, so quantizing the same model on the
    same images twice gives the same weights and graph under other names; the names compute nothing.
    """
    h = hashlib.sha256()
    for name in FILES:
        data = NAMES.sub(b"", files[name]) if name.endswith(".xml") else files[name]
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def model_files(model) -> dict[str, bytes]:
    """An OpenVINO model as the bytes of its IR (weights uncompressed: what runs is what was measured)."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="tl-embed-ir-") as tmp:
        ov.save_model(model, Path(tmp) / "model.xml", compress_to_fp16=False)
        return {name: (Path(tmp) / name).read_bytes() for name in FILES}


def read_files(folder: Path) -> dict[str, bytes] | None:
    """The IR carried in ``folder``, or None when it has none."""
    if not all((folder / name).is_file() for name in FILES):
        return None
    return {name: (folder / name).read_bytes() for name in FILES}


def write_files(files: dict[str, bytes], folder: Path) -> None:
    """Write a carried IR into a folder being built (a new store's temp folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (folder / name).write_bytes(files[name])


def to_arrays(files: dict[str, bytes] | None) -> dict[str, np.ndarray]:
    """The files as named byte arrays, for a container of arrays (an index's)."""
    return {ARRAY_PREFIX + name: np.frombuffer(data, np.uint8) for name, data in (files or {}).items()}


def from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, bytes] | None:
    """The files :func:`to_arrays` stored, or None when there are none."""
    files = {k[len(ARRAY_PREFIX):]: v.tobytes() for k, v in arrays.items() if k.startswith(ARRAY_PREFIX)}
    return files or None


def cache_path(spec: BackboneSpec) -> Path:
    """Where the carried model of ``spec`` is installed: named by its sha256, whatever carried it."""
    return converted_cache_dir() / "openvino" / f"{spec.name}-{spec.precision}-{spec.model_sha256[:24]}" / FILES[0]


def install(spec: BackboneSpec, files: dict[str, bytes] | None, what: str) -> None:
    """Put the model ``what`` carries into the cache, checked against ``spec``; no-op without one or when done.

    ``files`` None (nothing carried) is an error only when the model is not cached already.
    """
    if not spec.model_sha256:
        return
    xml = cache_path(spec)
    if xml.is_file() and xml.with_name(FILES[1]).is_file():
        return
    if files is None:
        raise TlEmbedError(f"{what} was embedded with an {spec.precision} model that it does not carry and that "
                           "is not in this machine's cache; embed from its store (which carries the model)")
    if files_sha256(files) != spec.model_sha256:
        raise TlEmbedError(f"the {spec.precision} model carried by {what} is not the one its embeddings were "
                           "made with (sha256 differs): the file was changed or damaged")
    try:
        xml.parent.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=xml.parent.parent))
    except OSError as e:
        raise TlEmbedError(f"cannot write the model cache {xml.parent.parent} ({e.strerror}); set TL_EMBED_CACHE "
                           "to a writable folder") from None
    try:
        write_files(files, tmp)
        try:
            os.rename(tmp, xml.parent)
        except OSError:
            pass  # another process installed it first: the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
