"""A scikit-learn transformer: image paths in, embeddings out.

``make_pipeline(KerasImageEmbedder("mobilenet_v2"), HeadClassifier()).fit(paths, labels)``
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ..errors import TlEmbedError


class KerasImageEmbedder(TransformerMixin, BaseEstimator):
    """Embed image files with a frozen Keras backbone.  ``fit`` only loads the backbone.

    Parameters mean what the ``tl-embed embed`` options of the same names mean: ``model`` (registry name
    or saved Keras model), ``weights`` ('imagenet', 'none' or a file), ``pooling``, ``tta``,
    ``batch_size``, ``runtime``, ``scales``.  ``transform`` before ``fit`` raises ``NotFittedError``, as every
    scikit-learn transformer does.  Unreadable images raise ``ValueError`` naming them (a transformer
    must keep rows aligned).  :attr:`spec_` is what a store made with the same options records.
    """

    def __init__(self, model: str = "mobilenet_v2", weights: str = "imagenet", pooling: str = "avg",
                 tta: str = "none", batch_size: int = 32, runtime: str = "auto", scales: str = "1"):
        self.model = model
        self.weights = weights
        self.pooling = pooling
        self.tta = tta
        self.batch_size = batch_size
        self.runtime = runtime
        self.scales = scales

    def fit(self, X=None, y=None):
        from .backbones import load_backbone
        from .runtime import make_runtime
        from .tta import backbone_with_tta, check_tta, with_tta

        check_tta(self.tta)
        backbone = backbone_with_tta(load_backbone(self.model, weights=self.weights, pooling=self.pooling,
                                                   scales=self.scales), self.tta)
        self.spec_ = backbone.spec
        self.run_ = with_tta(make_runtime(backbone, self.runtime), self.tta)
        self.n_features_out_ = backbone.spec.dim
        return self

    def transform(self, X) -> np.ndarray:
        from pathlib import Path

        from sklearn.utils.validation import check_is_fitted

        from .query import embed_paths, runtime_for

        check_is_fitted(self, "spec_")
        if not hasattr(self, "run_"):  # unpickled: the same backbone again, from the converted-model cache
            self.run_ = runtime_for(self.spec_, self.runtime)
        paths = [Path(p) for p in np.asarray(X, dtype=object).ravel()]
        emb = embed_paths(paths, self.run_, self.spec_.input_size, self.batch_size)
        if emb.failed:
            raise ValueError("cannot embed: " + "; ".join(f"{p}: {r}" for p, r in emb.failed[:5]))
        return emb.vectors

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)

    def __getstate__(self):
        """Pickle without the compiled model; the first transform after unpickling loads it again."""
        state = self.__dict__.copy()
        state.pop("run_", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


__all__ = ["KerasImageEmbedder", "TlEmbedError"]
