"""Which spec a set of backbone options builds, remembered so a new store needs no TensorFlow.

A store records its backbone's whole spec (the weights file's sha256, the dimension, ...), and only a
Keras build could tell it: every new store paid TensorFlow's import and the build (about 8 s on 2 cores,
most of a small folder's run) even when the converted model was already cached.  Each build ``embed``
runs now leaves a recipe beside the converted models: the options, the spec they gave, and the file whose
sha256 that spec records (model, weights or Keras's ImageNet file).  A later store made with the same
options reads the spec back, and gets it only while that file still hashes to it; a changed file, another
Keras cache or another spelling of a path is simply a new recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import astuple, dataclass
from pathlib import Path

from ..files import atomic_write
from .backbones import BackboneSpec, LoadedBackbone, converted_cache_dir, is_custom_model, keras_cache_dir, sha256_file

FOLDER = "recipes"


@dataclass(frozen=True)
class BackboneOptions:
    """The arguments of :func:`~.backbones.load_backbone` that decide the spec."""

    model: str
    weights: str = "imagenet"
    pooling: str = "avg"
    layer: str | None = None
    preprocess: str | None = None
    scales: str = "1"

    def path(self) -> Path:
        """The recipe's file: keyed by the options and where each named file is (its bytes are checked on recall)."""
        files = [str(Path(self.model).expanduser().resolve()) if is_custom_model(self.model) else ""]
        if self.weights.strip().lower() == "imagenet":
            files.append(str(keras_cache_dir().resolve()))  # Keras reads the ImageNet file from there
        elif self.weights.strip().lower() not in ("none", "random", ""):
            files.append(str(Path(self.weights).expanduser().resolve()))
        blob = json.dumps([astuple(self), files]).encode()
        return converted_cache_dir() / FOLDER / f"{hashlib.sha256(blob).hexdigest()[:32]}.json"


def remember(options: BackboneOptions, backbone: LoadedBackbone) -> None:
    """Leave the recipe of a backbone just built from ``options`` (random weights: none, they differ per build)."""
    if backbone.source is None or backbone.spec.weights_sha256 == "random":
        return
    path = options.path()
    record = json.dumps({"spec": backbone.spec.to_dict(), "source": str(Path(backbone.source).absolute())})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(record.encode()))  # readers see the old recipe or the new one
    except OSError:
        return  # a read-only or full cache: the next store builds the model again, as before


def recall(options: BackboneOptions) -> BackboneSpec | None:
    """The spec ``options`` built last time, while the file it records still has the same sha256; else None."""
    try:
        record = json.loads(options.path().read_text())
        spec = BackboneSpec.from_dict(record["spec"])
        same = sha256_file(record["source"]) == spec.weights_sha256
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, unreadable, or the file is gone: build as before
    return spec if same else None
