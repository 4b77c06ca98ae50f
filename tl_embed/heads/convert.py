"""Fitted scikit-learn pipelines -> :class:`~tl_embed.heads.graph.Step` chains (the only place that knows both).

Feature scaling is folded into the next linear layer: a ``StandardScaler`` followed by a logistic
regression is exactly one dense softmax layer, ``W / scale`` and ``b - (mean / scale) @ W``.
"""

from __future__ import annotations

import numpy as np

from ..errors import TlEmbedError
from .graph import Step
from .transforms import SignedPower


def steps_from_pipeline(pipeline, classes: list[str]) -> list[Step]:
    """The steps computing ``pipeline.predict_proba`` with columns in ``classes`` order."""
    *transforms, (_, clf) = pipeline.steps
    if [str(c) for c in clf.classes_] != list(classes):
        raise TlEmbedError("the classifier's classes are not in the head's order")
    steps: list[Step] = []
    shift, scale = None, None  # a pending standardisation, folded into the next linear layer
    for _, t in transforms:
        name = type(t).__name__
        if name == "StandardScaler":
            shift = t.mean_ if t.with_mean else None
            scale = t.scale_ if t.with_std else None
        elif name == "Normalizer" and t.norm == "l2":
            steps.append(Step("l2_normalize"))
        elif isinstance(t, SignedPower):
            steps.append(Step("signed_power", attrs={"alpha": float(t.alpha)}))
        else:
            raise TlEmbedError(f"cannot store a head with a {name} step")
    return steps + _classifier_steps(clf, len(classes), shift, scale)


def _classifier_steps(clf, n_classes: int, shift, scale) -> list[Step]:
    name = type(clf).__name__
    if name == "LogisticRegression":
        W, b = _linear(clf.coef_, clf.intercept_, shift, scale)
        if W.shape[1] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
            W, b = np.hstack([-W / 2, W / 2]), np.array([-b[0] / 2, b[0] / 2])
        return [_dense(W, b, "softmax")]
    if name == "CalibratedClassifierCV":
        members = clf.calibrated_classifiers_
        parts = [_linear(m.estimator.coef_, m.estimator.intercept_, shift, scale) for m in members]
        a = np.concatenate([[cal.a_ for cal in m.calibrators] for m in members], axis=None)
        b = np.concatenate([[cal.b_ for cal in m.calibrators] for m in members], axis=None)
        if any(m.method != "sigmoid" for m in members):
            raise TlEmbedError("only sigmoid calibration can be stored")
        return [_dense(np.hstack([W for W, _ in parts]), np.concatenate([b for _, b in parts]), "linear"),
                Step("sigmoid_calibration", {"a": a.astype(np.float64), "b": b.astype(np.float64)},
                     {"members": len(members), "classes": n_classes})]
    if name == "KNeighborsClassifier":
        if shift is not None or scale is not None:
            raise TlEmbedError("a k-NN head works on L2-normalised vectors, not standardised ones")
        if clf.weights not in ("uniform", "distance") or clf.effective_metric_ != "euclidean":
            raise TlEmbedError("only euclidean k-NN with uniform or distance weights can be stored")
        return [Step("knn", {"vectors": np.asarray(clf._fit_X, dtype=np.float32),
                             "labels": np.asarray(clf._y, dtype=np.int32)},
                     {"k": int(clf.n_neighbors), "weights": clf.weights, "classes": n_classes})]
    raise TlEmbedError(f"cannot store a {name} head")


def _linear(coef: np.ndarray, intercept: np.ndarray, shift, scale) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of ``x -> ((x - shift) / scale) @ coef.T + intercept`` as ``x @ W + b``."""
    return fold_standardisation(np.asarray(coef, dtype=np.float64).T, intercept, shift, scale)


def fold_standardisation(W: np.ndarray, b: np.ndarray, shift, scale) -> tuple[np.ndarray, np.ndarray]:
    """(W', b') with ``x @ W' + b' == ((x - shift) / scale) @ W + b`` (either may be None)."""
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).ravel().copy()
    if scale is not None:
        W = W / np.asarray(scale, dtype=np.float64)[:, None]
    if shift is not None:
        b = b - np.asarray(shift, dtype=np.float64) @ W
    return W, b


def _dense(W: np.ndarray, b: np.ndarray, activation: str) -> Step:
    return Step("dense", {"W": np.asarray(W, np.float64), "b": np.asarray(b, np.float64)},
                {"activation": activation})
