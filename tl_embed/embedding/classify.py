"""What the pretrained seeds were made for: ImageNet classification with the full model."""

from __future__ import annotations

import os

import numpy as np

from ..errors import TlEmbedError
from .backbones import keras_downloads, load_backbone
from .query import embed_paths
from .runtime import make_runtime
from .scan import expand_inputs


def classify(inputs: list[str | os.PathLike], model: str = "mobilenet_v2",
             top_k: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """Top-k ImageNet labels (``decode_predictions`` names) with probabilities for each image."""
    paths = expand_inputs(inputs)
    if not paths:
        raise TlEmbedError("no images given")
    backbone = load_backbone(model, weights="imagenet", include_top=True)
    from keras.applications.imagenet_utils import decode_predictions  # keras is imported (quietly) by now

    emb = embed_paths(paths, make_runtime(backbone), backbone.spec.input_size)
    for path, reason in emb.failed:
        print(f"tl-embed: skipped {path}: {reason}")
    probs = np.asarray(emb.vectors)
    if probs.shape[-1] != 1000:
        raise TlEmbedError(f"{model} does not output the 1000 ImageNet classes")
    with keras_downloads("decode_predictions"):
        decoded = decode_predictions(probs, top=top_k)
    return [(str(p), [(name, float(score)) for _, name, score in preds])
            for p, preds in zip(emb.paths, decoded, strict=True)]
