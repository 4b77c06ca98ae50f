"""Test-time augmentation: each image's embedding is the mean of the embeddings of several views of it.

Views are made from the decoded, resized pixels (an image is decoded once) and go through the same
runtime in the same batches, so ``flip`` costs one more inference per image and nothing more. The
pooled features of the views are averaged as they come out of the backbone, before any
normalisation: a store holds raw pooled features either way, and heads and indexes normalise later.

The setting is part of the :class:`~tl_embed.embedding.backbones.BackboneSpec` recorded in stores,
indexes and heads, so queries are embedded with the views their store was made with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np

from ..errors import TlEmbedError
from .backbones import TTAS, LoadedBackbone
from .runtime import Runtime, Tag, stream


def check_tta(tta: str) -> str:
    """The setting, or one line saying which ones exist (a newer tl_embed's store asks for an upgrade)."""
    if tta not in TTAS:
        raise TlEmbedError(f"unknown test-time augmentation {tta!r}; this tl_embed knows {', '.join(TTAS)} "
                           "(a store, index or model made by a newer tl_embed needs an upgrade)")
    return tta


def views(batch: np.ndarray, tta: str) -> np.ndarray:
    """(N, S, S, 3) pixels -> (V * N, S, S, 3): every view of the whole batch, one view after another."""
    if tta == "flip":
        return np.concatenate([batch, batch[:, :, ::-1]])
    return batch


def n_views(tta: str) -> int:
    return {"none": 1, "flip": 2}[check_tta(tta)]


class TTARuntime:
    """A runtime showing the wrapped one every view of each image and returning the mean per image."""

    def __init__(self, run: Runtime, tta: str):
        self.run = run
        self.tta = tta
        self.views = n_views(tta)
        self.name = run.name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return next(self.stream([(None, batch)]))[1]

    def stream(self, batches: Iterable[tuple[Tag, np.ndarray]]) -> Iterator[tuple[Tag, np.ndarray]]:
        """Each batch's views in one batch of the wrapped runtime, so its requests stay in flight as before."""
        expanded = ((tag, views(batch, self.tta)) for tag, batch in batches)
        for tag, vectors in stream(self.run, expanded):
            yield tag, vectors.reshape(self.views, -1, vectors.shape[-1]).mean(axis=0)


def with_tta(run: Runtime, tta: str) -> Runtime:
    """``run`` itself without TTA, else wrapped so it computes the embeddings ``tta`` describes."""
    return run if check_tta(tta) == "none" else TTARuntime(run, tta)


def backbone_with_tta(backbone: LoadedBackbone, tta: str) -> LoadedBackbone:
    """The same network, its spec saying which views its embeddings average."""
    return LoadedBackbone(backbone.model, replace(backbone.spec, tta=check_tta(tta)))
