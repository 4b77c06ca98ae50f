"""How well a head does: accuracy, balanced accuracy, macro F1, per-class scores, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
