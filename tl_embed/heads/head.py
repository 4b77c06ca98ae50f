"""A fitted head: its array steps, its classes, the backbone it belongs to, and its model file.

Prediction is numpy only (:func:`~tl_embed.heads.graph.forward`), so ``predict`` and the service
load a head without importing scikit-learn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embedding.backbones import BackboneSpec
from ..embedding.carried import install
from ..errors import TlEmbedError
from .graph import Step, check_graph, forward
from .model_file import read_backbone, read_model, write_model

HEADS = ("svm", "logreg", "knn", "dense")  # what `train --head` offers; trained in .fit
# svm: the best mean gain over a plain standardised logistic regression on the five shared photo sets,
# and never below it on any of them (benchmarks/heads.py; numbers in benchmarks/README.md)
DEFAULT_HEAD = "svm"


@dataclass
class Head:
    """A fitted head plus everything needed to use and trust it later (the model file)."""

    steps: list[Step]
    classes: list[str]
    spec: BackboneSpec
    head: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    backbone: dict[str, bytes] | None = field(default=None, repr=False)  # an int8 store's model (carried.py)

    def __post_init__(self) -> None:
        check_graph(self.steps, self.spec.dim, len(self.classes))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities, columns in :attr:`classes` order."""
        return forward(self.steps, check_features(X, self.spec.dim))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.predict_proba(X).argmax(1)]

    def top(self, X: np.ndarray, k: int = 1, min_confidence: float = 0.0) -> list[Prediction]:
        """One :class:`Prediction` per row of ``X``: its ``k`` most probable classes (at most all of
        them), and ``unknown`` as the label when the top probability is below ``min_confidence``.

        The one place this decision is made: the service's ``/predict`` calls this, and ``tl-embed
        predict`` calls :func:`top_predictions` (an exported model has probabilities but no Head).
        """
        return top_predictions(self.predict_proba(X), self.classes, k, min_confidence)

    def save(self, path: str | os.PathLike) -> None:
        meta = {"head": self.head, "classes": self.classes, "spec": self.spec.to_dict(), "params": self.params,
                "metrics": self.metrics, "versions": self.versions}
        write_model(Path(path), _jsonable(meta), self.steps, self.backbone)

    @classmethod
    def load(cls, path: str | os.PathLike, trust_pickle: bool = False) -> Head:
        """Load a model file (data only; an old pickle file only with ``trust_pickle``)."""
        path = Path(path)
        meta, steps = read_model(path, trust_pickle)
        try:
            spec = BackboneSpec.from_dict(meta["spec"])
            classes = [str(c) for c in meta["classes"]]
            if not isinstance(steps, list):  # a trusted old pickle: its fitted sklearn pipeline
                from .convert import steps_from_pipeline

                steps = steps_from_pipeline(steps, classes)
            head = cls(steps, classes, spec, str(meta["head"]), dict(meta.get("params") or {}),
                       dict(meta.get("metrics") or {}), dict(meta.get("versions") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise TlEmbedError(f"{path} is not a readable tl_embed model file (missing or bad {e}): "
                               "train it again") from None
        if spec.model_sha256:  # queries must be embedded by the model it carries: installed where runtimes look
            head.backbone = read_backbone(path)
            install(spec, head.backbone, f"model file {path}")
        return head


@dataclass(frozen=True)
class Prediction:
    """A head's answer for one embedding: ``label`` is the top class, or ``unknown`` when its probability
    is below the caller's ``min_confidence``; ``top`` is (class, probability) pairs, most probable first."""

    label: str
    top: list[tuple[str, float]]

    @property
    def confidence(self) -> float:
        """The top class's probability (also when the label is ``unknown``)."""
        return self.top[0][1]


UNKNOWN = "unknown"


def top_predictions(proba: np.ndarray, classes: list[str], k: int = 1,
                    min_confidence: float = 0.0) -> list[Prediction]:
    """:meth:`Head.top` from (N, n_classes) probabilities already computed (an exported model's, too).

    The threshold applies to the exact probability, not to a rounded one shown to the user.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    order = np.argsort(-proba, axis=1)[:, :min(k, len(classes))]
    out = []
    for row, cols in zip(proba, order, strict=True):
        top = [(classes[j], float(row[j])) for j in cols]
        out.append(Prediction(top[0][0] if top[0][1] >= min_confidence else UNKNOWN, top))
    return out


def check_features(X: np.ndarray, dim: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != dim:
        raise TlEmbedError(f"expected embeddings of shape (N, {dim}), got {X.shape}")
    if not np.isfinite(X).all():
        raise TlEmbedError("embeddings contain NaN or infinite values")
    return X


def _jsonable(value: Any) -> Any:
    """Numpy scalars and arrays in params/metrics as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value
