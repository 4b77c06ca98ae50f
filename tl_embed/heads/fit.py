"""Training heads: scikit-learn pipelines with CV-chosen hyper-parameters, stored as array steps.

Each head is fitted as a ``Pipeline`` whose first step scales the features the way that head needs
(standardised for linear models, L2-normalised for cosine k-NN); the fitted pipeline is then turned
into :class:`~tl_embed.heads.graph.Step` s (:mod:`.convert`), which is all a model file keeps.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np

from .. import __version__
from ..embedding.backbones import BackboneSpec
from ..errors import TlEmbedError
from .convert import steps_from_pipeline
from .head import HEADS, Head, check_features

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
    check_features(X, X.shape[1] if X.ndim == 2 else -1)


def fit_head(X: np.ndarray, y: np.ndarray, spec: BackboneSpec, head: str = "logreg",
             class_weight: str | None = None, cv: int = 3, seed: int = 0,
             params: dict[str, Any] | None = None) -> tuple[Head, dict[str, Any]]:
    """Choose hyper-parameters by stratified CV (unless ``params``), then fit on all of X.

    Returns the head and a dict of timings and the CV score.
    """
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

    X = check_features(X, spec.dim)
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
    fitted = Head(steps_from_pipeline(final, classes), classes, spec, head, clean, versions=_versions())
    return fitted, info


def _grid(head: str, fit_rows: int) -> dict[str, list]:
    """The head's grid, without k-NN sizes larger than a CV training fold."""
    if head == "knn":
        return {k: [n for n in v if n <= fit_rows] or [1] for k, v in GRIDS[head].items()}
    return GRIDS[head]


def _versions() -> dict[str, str]:
    import sklearn

    return {"tl_embed": __version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
