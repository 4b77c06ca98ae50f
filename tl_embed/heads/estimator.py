"""The heads as a scikit-learn estimator: ``HeadClassifier`` fits, predicts, and joins Pipelines and searches.

It is a thin shell over :class:`~tl_embed.heads.head.Head` (what ``tl-embed train`` fits and saves), so a
head chosen in a ``GridSearchCV`` in Python is the same model the command line would have made, and it
saves to the same model file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ..embedding.backbones import BackboneSpec
from .head import DEFAULT_HEAD, Head


def features_spec(dim: int) -> BackboneSpec:
    """What a head fitted on bare feature arrays records as its backbone: only their dimension is known."""
    return BackboneSpec(name="features", weights="none", weights_sha256="none", input_size=0,
                        preprocessing="none", pooling="none", dim=dim)


class HeadClassifier(ClassifierMixin, BaseEstimator):
    """One of ``tl-embed train``'s heads on embedding arrays, as a scikit-learn classifier.

    ``kind`` is ``train --head`` (svm, logreg, knn, dense); ``cv``, ``transform``, ``class_weight``,
    ``hidden`` and ``seed`` mean what the ``train`` options of those names mean: hyper-parameters (C, the
    transform, k) are still chosen on ``cv`` inner folds of the rows given to :meth:`fit`.  ``spec`` is the
    backbone the features come from (``store.spec``); with it, the fitted :attr:`head_` can be saved and
    used by ``tl-embed predict`` on images.  Without it the head only knows the feature dimension.
    """

    def __init__(self, kind: str = DEFAULT_HEAD, cv: int = 3, transform: str = "auto",
                 class_weight: str | None = None, hidden: int = 0, seed: int = 0,
                 spec: BackboneSpec | None = None):
        self.kind = kind
        self.cv = cv
        self.transform = transform
        self.class_weight = class_weight
        self.hidden = hidden
        self.seed = seed
        self.spec = spec

    def fit(self, X, y) -> HeadClassifier:
        from .fit import fit_head

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        spec = self.spec if self.spec is not None else features_spec(X.shape[1] if X.ndim == 2 else -1)
        self.classes_ = np.unique(y)  # sorted, in y's own type: what scikit-learn's scorers compare with
        self.head_, self.fit_info_ = fit_head(X, y.astype(str), spec, self.kind, self.class_weight, self.cv,
                                              self.seed, transform=self.transform, hidden=self.hidden)
        # the head orders its columns by label text; reorder them to classes_ (2 < 10, "10" < "2")
        order = {name: i for i, name in enumerate(self.head_.classes)}
        self._columns = np.array([order[str(c)] for c in self.classes_])
        self.n_features_in_ = X.shape[1]
        return self

    @classmethod
    def from_head(cls, head: Head | str | os.PathLike) -> HeadClassifier:
        """A fitted estimator around a saved or trained head (labels are the head's, as text)."""
        head = head if isinstance(head, Head) else Head.load(head)
        self = cls(kind=head.head, spec=head.spec, **_train_options(head.params))
        self.head_, self.fit_info_ = head, {}
        self.classes_ = np.asarray(head.classes, dtype=object)
        self._columns = np.arange(len(head.classes))
        self.n_features_in_ = head.spec.dim
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(N, n_classes) probabilities, columns in :attr:`classes_` order."""
        check_is_fitted(self, "head_")
        return self.head_.predict_proba(np.asarray(X, dtype=np.float32))[:, self._columns]

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # raises NotFittedError first
        return self.classes_[proba.argmax(1)]

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted head as a model file (what ``tl-embed train --out`` writes)."""
        check_is_fitted(self, "head_")
        self.head_.save(path)


def _train_options(params: dict[str, Any]) -> dict[str, Any]:
    """The constructor options a saved head's chosen hyper-parameters correspond to."""
    return {"transform": params["transform"]} if "transform" in params else {}
