"""Training heads: hyper-parameters chosen on held-out folds, one refit on all rows, stored as array steps.

The linear heads (``logreg``, ``svm``) are fitted as a scikit-learn ``Pipeline`` (an optional signed
square root + L2 normalisation, a standardisation, the classifier) whose C and transform come from a
CLIP-style sweep (:mod:`.search`); ``knn`` picks k by a small grid search on L2-normalised vectors;
``dense`` is the tutorials' Keras head (:mod:`.dense`).  Every fitted head is turned into
:class:`~tl_embed.heads.graph.Step` s (:mod:`.convert`), which is all a model file keeps.
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
from .head import DEFAULT_HEAD, HEADS, Head, check_features
from .sweep import TRANSFORMS, search_linear, side_by_side

SEARCH_MAX_SAMPLES = 6000  # hyper-parameters are chosen on at most this many rows, then refit on all
# log10 C where each linear head's sweep starts (it walks on past a winning edge); also the
# default C, the middle one, when a class is too small to hold anything out
COARSE = {"logreg": (-3.0, -2.0, -1.0), "svm": (-4.0, -3.0, -2.0)}
KNN_GRID = (1, 3, 5, 10, 20)


def make_classifier(head: str, C: float, class_weight: str | None = None, warm: bool = False):
    """The unfitted linear classifier of ``head`` at ``C`` (uncalibrated: the search needs no probabilities)."""
    from sklearn.linear_model import LogisticRegression

    from .svm import PrimalLinearSVC

    if head == "logreg":
        return LogisticRegression(C=C, max_iter=300, tol=1e-3, class_weight=class_weight, warm_start=warm)
    return PrimalLinearSVC(C=C, class_weight=class_weight, warm_start=warm)


def make_pipeline(head: str, params: dict[str, Any], class_weight: str | None = None,
                  calibration_folds: int = 3):
    """The unfitted pipeline for a linear head or knn with the given hyper-parameters."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    from .transforms import SignedPower

    if head == "knn":
        # on L2-normalised vectors euclidean order == cosine order; brute force is exact and fast
        clf = KNeighborsClassifier(n_neighbors=int(params.get("n_neighbors", 5)), weights="distance",
                                   algorithm="brute")
        return Pipeline([("scale", Normalizer()), ("clf", clf)])
    steps: list[tuple[str, Any]] = []
    if params.get("transform", "none") == "sqrt-l2":
        steps += [("power", SignedPower(0.5)), ("l2", Normalizer())]
    clf = make_classifier(head, float(params["C"]), class_weight)
    if head == "svm":  # one SVM on all rows, its sigmoid calibration learnt from out-of-fold decisions
        clf = CalibratedClassifierCV(clf, method="sigmoid", cv=calibration_folds, ensemble=False)
    return Pipeline(steps + [("scale", StandardScaler()), ("clf", clf)])


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


def fit_head(X: np.ndarray, y: np.ndarray, spec: BackboneSpec, head: str = DEFAULT_HEAD,
             class_weight: str | None = None, cv: int = 3, seed: int = 0,
             params: dict[str, Any] | None = None, transform: str = "auto",
             hidden: int = 0) -> tuple[Head, dict[str, Any]]:
    """Choose hyper-parameters on held-out folds (unless ``params``), then fit on all of X.

    ``transform`` (logreg, svm): ``auto`` chooses between ``none`` and ``sqrt-l2`` by the same
    folds as C.  ``hidden`` (dense): units of the optional hidden layer, 0 for none.
    Returns the head and a dict of timings and the held-out score.
    """
    if head not in HEADS:
        raise TlEmbedError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if transform not in ("auto", *TRANSFORMS):
        raise TlEmbedError(f"unknown transform {transform!r}; choose auto or one of {', '.join(TRANSFORMS)}")
    if transform != "auto" and head not in ("logreg", "svm"):
        raise TlEmbedError("--transform applies to the logreg and svm heads only")
    if hidden and head != "dense":
        raise TlEmbedError("--hidden applies to the dense head only")
    X = check_features(X, spec.dim)
    y = np.asarray(y).astype(str)
    check_training_data(X, y)
    classes = sorted(np.unique(y).tolist())
    t0 = time.perf_counter()
    if head == "dense":
        from .dense import fit_dense

        steps, clean, info = fit_dense(X, y, classes, hidden, class_weight, seed, params)
    else:
        clean, info = (dict(params), {}) if params is not None else _search(X, y, head, class_weight, cv, seed,
                                                                           transform)
        info["search_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        smallest = int(np.unique(y, return_counts=True)[1].min())
        final = make_pipeline(head, clean, class_weight, calibration_folds=min(3, smallest))
        with side_by_side():
            final.fit(X, y)
        info["fit_seconds"] = time.perf_counter() - t1
        steps = steps_from_pipeline(final, classes)
    info["train_seconds"] = time.perf_counter() - t0
    return Head(steps, classes, spec, head, clean, versions=_versions()), info


def _search(X: np.ndarray, y: np.ndarray, head: str, class_weight: str | None, cv: int, seed: int,
            transform: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hyper-parameters chosen by stratified ``cv``-fold scores, and how they were chosen."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    Xs, ys = X, y
    if len(y) > SEARCH_MAX_SAMPLES:
        Xs, _, ys, _ = train_test_split(X, y, train_size=SEARCH_MAX_SAMPLES, stratify=y, random_state=seed)
    folds = int(min(cv, np.unique(ys, return_counts=True)[1].min()))
    transforms = TRANSFORMS if transform == "auto" else (transform,)
    if folds < 2:  # a class too small to hold an image out: nothing to choose with
        return ({"C": 10 ** COARSE[head][1], "transform": transforms[0]} if head != "knn" else {"n_neighbors": 5}), {}
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(Xs, ys))
    info: dict[str, Any] = {"cv_folds": folds, "cv_rows": len(ys)}
    if head == "knn":
        params, info["cv_accuracy"] = _search_knn(Xs, ys, splits)
        return params, info
    res = search_linear(Xs, ys, splits, lambda C: make_classifier(head, C, class_weight, warm=True),
                        COARSE[head], transforms)
    info["cv_accuracy"] = res.score
    info["cv_table"] = {t: {f"{10 ** e:.3g}": s[0] for e, s in sorted(scores.items())}
                        for t, scores in res.table.items()}
    return {"C": float(f"{res.C:.3g}"), "transform": res.transform}, info


def _search_knn(X: np.ndarray, y: np.ndarray, splits) -> tuple[dict[str, Any], float]:
    from sklearn.model_selection import GridSearchCV

    fit_rows = min(len(tr) for tr, _ in splits)
    grid = {"clf__n_neighbors": [k for k in KNN_GRID if k <= fit_rows] or [1]}
    search = GridSearchCV(make_pipeline("knn", {}), grid, cv=splits, scoring="accuracy", refit=False,
                          error_score="raise").fit(X, y)
    return {"n_neighbors": int(search.best_params_["clf__n_neighbors"])}, float(search.best_score_)


def _versions() -> dict[str, str]:
    import sklearn

    return {"tl_embed": __version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
