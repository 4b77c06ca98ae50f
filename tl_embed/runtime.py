"""How a backbone runs: a batch of RGB uint8 images in, a batch of float32 embeddings out.

The Keras runtime is the reference.  It traces the model once into a ``tf.function`` with a fixed
signature, which skips ``model.predict``'s per-call dataset/callback machinery.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .backbones import LoadedBackbone


class Runtime(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D) float32."""


def configure_threads(intra_op: int | None = None, inter_op: int = 1) -> None:
    """Pin TensorFlow's thread pools before the first op runs.

    One inter-op thread (a CNN is a chain of ops) and intra-op threads = cores: decoding threads
    mostly wait on Pillow's GIL-free C code, so they share the cores without oversubscription.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op or os.cpu_count() or 1)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: keep its settings


class KerasRuntime:
    """Reference runtime: the Keras model, traced once as a tf.function."""

    name = "keras"

    def __init__(self, backbone: LoadedBackbone):
        import tensorflow as tf

        model = backbone.model
        size = backbone.spec.input_size
        self._fn = tf.function(
            lambda x: model(tf.cast(x, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(batch), dtype=np.float32)


def make_runtime(backbone: LoadedBackbone, name: str = "keras") -> Runtime:
    if name not in ("keras", "auto"):
        from .errors import TlEmbedError

        raise TlEmbedError(f"unknown runtime {name!r}; available: keras")
    configure_threads()
    return KerasRuntime(backbone)


def available_runtimes() -> list[str]:
    """Runtimes usable in this environment, reference first."""
    return ["keras"]
