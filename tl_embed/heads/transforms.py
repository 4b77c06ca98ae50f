"""Feature transforms for heads, as scikit-learn transformers (so they sit in a ``Pipeline``)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class SignedPower(TransformerMixin, BaseEstimator):
    """``sign(x) * |x| ** alpha`` per feature ("power normalisation"; alpha 0.5 is signed sqrt).

    Stateless: fitting learns nothing, so it is safe inside cross-validation.
    """

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    def fit(self, X, y=None) -> SignedPower:
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return np.sign(X) * np.abs(X) ** self.alpha
