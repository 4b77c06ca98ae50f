"""A scikit-learn transformer: image paths in, embeddings out.

``make_pipeline(KerasImageEmbedder("mobilenet_v2"), LogisticRegression()).fit(paths, labels)``
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ..errors import TlEmbedError


class KerasImageEmbedder(TransformerMixin, BaseEstimator):
    """Embed image files with a frozen Keras backbone.  ``fit`` only loads the backbone.

    Parameters follow ``tl-embed embed``: ``model`` (registry name or saved Keras model),
    ``weights`` ('imagenet', 'none' or a file), ``pooling``, ``batch_size``, ``runtime``.
    Unreadable images raise ``ValueError`` naming them (a transformer must keep rows aligned).
    """

    def __init__(self, model: str = "mobilenet_v2", weights: str = "imagenet", pooling: str = "avg",
                 batch_size: int = 32, runtime: str = "auto"):
        self.model = model
        self.weights = weights
        self.pooling = pooling
        self.batch_size = batch_size
        self.runtime = runtime

    def fit(self, X=None, y=None):
        from .backbones import load_backbone
        from .runtime import make_runtime

        backbone = load_backbone(self.model, weights=self.weights, pooling=self.pooling)
        self.spec_ = backbone.spec
        self.run_ = make_runtime(backbone, self.runtime)
        self.n_features_out_ = backbone.spec.dim
        return self

    def transform(self, X) -> np.ndarray:
        from pathlib import Path

        from .query import embed_paths

        if not hasattr(self, "run_"):
            self.fit()
        paths = [Path(p) for p in np.asarray(X, dtype=object).ravel()]
        emb = embed_paths(paths, self.run_, self.spec_.input_size, self.batch_size)
        if emb.failed:
            raise ValueError("cannot embed: " + "; ".join(f"{p}: {r}" for p, r in emb.failed[:5]))
        return emb.vectors

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)

    def __getstate__(self):
        """Pickle without the compiled model; it is rebuilt on the first transform."""
        state = self.__dict__.copy()
        state.pop("run_", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


__all__ = ["KerasImageEmbedder", "TlEmbedError"]
