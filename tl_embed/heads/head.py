"""Classifier heads on embeddings: scikit-learn pipelines, CV-chosen hyper-parameters, model files.

Each head is a ``Pipeline`` whose first step scales the features the way that head needs
(standardised for linear models, L2-normalised for cosine k-NN), so training and prediction can
never disagree.  Model files are joblib pickles: load only files you trust.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..embedding.backbones import BackboneSpec
from ..errors import TlEmbedError
from ..files import atomic_write

HEADS = ("logreg", "svm", "knn")
MODEL_FORMAT = "tl_embed.head/1"
SEARCH_MAX_SAMPLES = 6000  # hyper-parameters are chosen on at most this many rows, then refit on all

GRIDS: dict[str, dict[str, list]] = {
    "logreg": {"clf__C": [0.01, 0.03, 0.1, 0.3, 1.0]},
    "svm": {"clf__C": [0.001, 0.003, 0.01, 0.03, 0.1]},  # searched uncalibrated (see fit_head)
    "knn": {"clf__n_neighbors": [1, 3, 5, 10, 20]},
}


def make_pipeline(head: str, class_weight: str | None = None, seed: int = 0, calibrated: bool = True):
    """The unfitted sklearn pipeline for ``head`` (hyper-parameters at their grid's middle).

    ``calibrated=False`` gives the svm head without its probability calibration: a third of the
    fits, and the same accuracy ranking, which is all a hyper-parameter search needs.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    if head == "logreg":
        clf = LogisticRegression(C=0.1, max_iter=300, tol=1e-3, class_weight=class_weight)
        return Pipeline([("scale", StandardScaler()), ("clf", clf)])
    if head == "svm":
        svc = LinearSVC(C=0.01, class_weight=class_weight, dual="auto", random_state=seed)
        clf = CalibratedClassifierCV(svc, method="sigmoid", cv=3) if calibrated else svc
        return Pipeline([("scale", StandardScaler()), ("clf", clf)])
    if head == "knn":
        # on L2-normalised vectors euclidean order == cosine order; brute force is exact and fast
        clf = KNeighborsClassifier(n_neighbors=5, weights="distance", algorithm="brute")
        return Pipeline([("scale", Normalizer()), ("clf", clf)])
    raise TlEmbedError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


@dataclass
class Metrics:
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true class, columns: predicted, in ``classes`` order
    classes: list[str]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def evaluate_predictions(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Metrics:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                     "support": int(s[i])} for i, c in enumerate(classes)}
    return Metrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        classes=list(classes), n=len(y_true))


@dataclass
class Head:
    """A fitted head plus everything needed to use and trust it later (the model file)."""

    pipeline: Any
    classes: list[str]
    spec: BackboneSpec
    head: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities, columns in :attr:`classes` order."""
        X = _check_features(X, self.spec.dim)
        proba = self.pipeline.predict_proba(X)
        order = [list(self.pipeline.classes_).index(c) for c in self.classes]
        return proba[:, order]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.predict_proba(X).argmax(1)]

    def save(self, path: str | os.PathLike) -> None:
        import joblib


        payload = {"format": MODEL_FORMAT, **self.__dict__, "spec": self.spec.to_dict()}
        atomic_write(Path(path), lambda f: joblib.dump(payload, f, compress=3))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Head:
        """Load a model file.  It is a pickle: only load files you trust."""
        import joblib

        path = Path(path)
        if not path.is_file():
            raise TlEmbedError(f"model file {path} does not exist")
        try:
            payload = joblib.load(path)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
            raise TlEmbedError(f"{path} is not a readable tl_embed model file: {e}") from None
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise TlEmbedError(f"{path} is not a tl_embed model file ({MODEL_FORMAT})")
        payload.pop("format")
        payload["spec"] = BackboneSpec.from_dict(payload["spec"])
        return cls(**payload)


def _check_features(X: np.ndarray, dim: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != dim:
        raise TlEmbedError(f"expected embeddings of shape (N, {dim}), got {X.shape}")
    if not np.isfinite(X).all():
        raise TlEmbedError("embeddings contain NaN or infinite values")
    return X


def check_training_data(X: np.ndarray, y: np.ndarray, min_per_class: int = 2) -> None:
    """Fail with one clear line on data no head can learn from."""
    if len(y) == 0:
        raise TlEmbedError("no labelled images to train on (labels come from sub-folder names)")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise TlEmbedError(f"need at least 2 classes to train a classifier, found only {classes[0]!r}")
    small = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if n < min_per_class]
    if small:
        raise TlEmbedError(f"too few images in class(es) {', '.join(small)}: each class needs at "
                           f"least {min_per_class} for training and evaluation; add images or "
                           "remove those folders")
    _check_features(X, X.shape[1] if X.ndim == 2 else -1)


def fit_head(X: np.ndarray, y: np.ndarray, spec: BackboneSpec, head: str = "logreg",
             class_weight: str | None = None, cv: int = 3, seed: int = 0,
             params: dict[str, Any] | None = None) -> tuple[Head, dict[str, Any]]:
    """Choose hyper-parameters by stratified CV (unless ``params``), then fit on all of X.

    Returns the head and a dict of timings and the CV score.
    """
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

    X = _check_features(X, spec.dim)
    y = np.asarray(y).astype(str)
    check_training_data(X, y)
    pipe = make_pipeline(head, class_weight, seed)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if params is None:
        Xs, ys = X, y
        if len(y) > SEARCH_MAX_SAMPLES:
            Xs, _, ys, _ = train_test_split(X, y, train_size=SEARCH_MAX_SAMPLES, stratify=y,
                                            random_state=seed)
        folds = int(min(cv, np.unique(ys, return_counts=True)[1].min()))
        if folds >= 2:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
            grid = _grid(head, len(ys) * (folds - 1) // folds)
            search = GridSearchCV(make_pipeline(head, class_weight, seed, calibrated=False), grid,
                                  cv=splitter, scoring="accuracy", refit=False, error_score="raise")
            search.fit(Xs, ys)
            params = search.best_params_
            info["cv_accuracy"] = float(search.best_score_)
            info["cv_folds"] = folds
            info["cv_rows"] = len(ys)
        else:
            params = {}
    info["search_seconds"] = time.perf_counter() - t0
    clean = {k.split("__")[-1]: v for k, v in params.items()}
    final = clone(pipe)
    if head == "svm":
        final.set_params(clf__cv=int(min(3, np.unique(y, return_counts=True)[1].min())),
                         **{f"clf__estimator__{k}": v for k, v in clean.items()})
    else:
        final.set_params(**params)
    t1 = time.perf_counter()
    final.fit(X, y)
    info["fit_seconds"] = time.perf_counter() - t1
    info["train_seconds"] = time.perf_counter() - t0
    classes = sorted(np.unique(y).tolist())
    return Head(final, classes, spec, head, clean, versions=_versions()), info


def _grid(head: str, fit_rows: int) -> dict[str, list]:
    """The head's grid, without k-NN sizes larger than a CV training fold."""
    if head == "knn":
        return {k: [n for n in v if n <= fit_rows] or [1] for k, v in GRIDS[head].items()}
    return GRIDS[head]


def _versions() -> dict[str, str]:
    import sklearn

    return {"tl_embed": __version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
