"""Embed ad-hoc images (queries, images to label) with exactly the backbone a store, head or index records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..cpus import cpu_count
from ..errors import TlEmbedError
from .backbones import BackboneSpec, LoadedBackbone, check_compatible, load_backbone
from .decode import decode_in_order
from .images import ImageDecodeError
from .runtime import OpenVINORuntime, Runtime, check_runtime, make_runtime, stream
from .scan import ImageFile, expand_inputs
from .tta import backbone_with_tta, with_tta


@dataclass
class EmbeddedPaths:
    """Embeddings of ad-hoc images (not in a store), aligned with ``paths``."""

    paths: list[Path]
    vectors: np.ndarray
    failed: list[tuple[Path, str]]


def embed_paths(paths: list[Path], run: Runtime, size: int, batch_size: int = 32,
                workers: int | None = None) -> EmbeddedPaths:
    """Decode (in parallel) and embed image files; unreadable ones are returned in ``failed``."""
    files = [ImageFile(str(p), Path(p), None, None, 0, 0) for p in paths]
    ok: list[Path] = []
    failed: list[tuple[Path, str]] = []

    def batches() -> Iterator[tuple[None, np.ndarray]]:
        batch: list[np.ndarray] = []
        for f, result in decode_in_order(files, size, workers or cpu_count(), 2 * batch_size):
            if isinstance(result, ImageDecodeError):
                failed.append((f.path, result.reason))
                continue
            ok.append(f.path)
            batch.append(result.pixels)
            if len(batch) == batch_size:
                yield None, np.stack(batch)
                batch = []
        if batch:
            yield None, np.stack(batch)

    chunks = [vectors for _, vectors in stream(run, batches())]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return EmbeddedPaths(ok, vectors, failed)


def runtime_for(spec: BackboneSpec, runtime: str = "auto") -> Runtime:
    """A runtime computing exactly the embeddings ``spec`` records: its backbone, shown its TTA views.

    The cached OpenVINO IR comes first (no TensorFlow import, no Keras build: a one-image query starts
    in about a second); without one, Keras rebuilds the backbone, which must match ``spec``, and it is
    converted (and cached for the next time).  An int8 model is never rebuilt: it is run from the cache its
    store, index or head installed it in (:mod:`.carried`).
    """
    name = check_runtime(runtime)
    if name != "keras":
        try:
            cached = OpenVINORuntime.from_cache(spec)
        except ImportError:  # no openvino: make_runtime says so below
            cached = None
        if cached is not None:
            return with_tta(cached, spec.tta)
    if spec.model_sha256:
        raise TlEmbedError(f"queries of this {spec.precision} store are embedded by the model it carries, which "
                           f"{'runs only on openvino' if name == 'keras' else 'is not installed here'}")
    model, weights = spec.loadable()
    backbone = backbone_with_tta(load_backbone(model, weights=weights, pooling=spec.pooling, layer=spec.layer,
                                               scales=spec.scales), spec.tta)
    backbone = LoadedBackbone(backbone.model, replace(backbone.spec, precision=spec.precision))
    check_compatible(spec, backbone.spec, "the model/index")
    return with_tta(make_runtime(backbone, name), spec.tta)


def embed_for(spec: BackboneSpec, inputs: list[str | os.PathLike], runtime: str = "auto",
              batch_size: int = 32):
    """Embed image files/folders with exactly the backbone and TTA ``spec`` describes (refusing others)."""
    paths = expand_inputs(inputs)
    if not paths:
        raise TlEmbedError("no images found in " + ", ".join(map(str, inputs)))
    return embed_paths(paths, runtime_for(spec, runtime), spec.input_size, batch_size)
