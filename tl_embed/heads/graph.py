"""A fitted head as data: a short chain of array operations from embeddings to class probabilities.

Every head tl_embed trains ends up as a few :class:`Step` s (signed power, L2 normalisation, dense
layers with the feature scaling folded in, a softmax or a sigmoid calibration, or a k-NN vote over
stored vectors).  This one representation is what a model file holds (arrays, never pickles), what
``predict`` runs (numpy only: no scikit-learn import, so a cold start stays fast), and what
``export-model`` turns into Keras layers, so training, prediction and export cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import TlEmbedError

ACTIVATIONS = ("linear", "relu", "softmax")
# op -> (array names, attribute names) every step of that op must carry
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "signed_power": ((), ("alpha",)),  # sign(x) |x|^alpha: tames bursty CNN activations
    "l2_normalize": ((), ()),
    "dense": (("W", "b"), ("activation",)),  # x @ W + b, then the activation
    # one-vs-rest sigmoid calibration of ``members`` linear models' decision values, averaged
    "sigmoid_calibration": (("a", "b"), ("members", "classes")),
    "knn": (("vectors", "labels"), ("k", "weights", "classes")),  # cosine vote of the k nearest
}


@dataclass
class Step:
    """One operation of a head: numeric ``arrays`` (weights float64, stored vectors float32, labels
    int32) and JSON-scalar ``attrs``."""

    op: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, float | int | str] = field(default_factory=dict)

    def out_dim(self, in_dim: int) -> int:
        """The width of this step's output for an input of ``in_dim`` columns (checks shapes)."""
        a = self.arrays
        if self.op in ("signed_power", "l2_normalize"):
            return in_dim
        if self.op == "dense":
            _expect(a["W"].ndim == 2 and a["W"].shape[0] == in_dim and a["b"].shape == (a["W"].shape[1],),
                    f"dense weights {a['W'].shape} / bias {a['b'].shape} do not take {in_dim} inputs")
            _expect(self.attrs["activation"] in ACTIVATIONS, f"unknown activation {self.attrs['activation']!r}")
            return a["W"].shape[1]
        if self.op == "sigmoid_calibration":
            classes, members = int(self.attrs["classes"]), int(self.attrs["members"])
            per = 1 if classes == 2 else classes
            _expect(classes >= 2 and members >= 1 and in_dim == members * per
                    and a["a"].shape == a["b"].shape == (in_dim,),
                    f"calibration of {members} x {per} decision values does not take {in_dim} inputs")
            return classes
        if self.op == "knn":
            n = a["vectors"].shape[0]
            _expect(a["vectors"].ndim == 2 and a["vectors"].shape[1] == in_dim and a["labels"].shape == (n,),
                    f"k-NN vectors {a['vectors'].shape} do not take {in_dim} inputs")
            _expect(1 <= int(self.attrs["k"]) <= n and self.attrs["weights"] in ("uniform", "distance"),
                    "k-NN needs 1 <= k <= stored vectors and weights uniform or distance")
            classes = int(self.attrs["classes"])
            _expect(n == 0 or (a["labels"].min() >= 0 and a["labels"].max() < classes), "k-NN labels out of range")
            return classes
        raise TlEmbedError(f"unknown head operation {self.op!r}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a, op = self.arrays, self.op
        if op == "signed_power":
            return np.sign(x) * np.abs(x) ** float(self.attrs["alpha"])
        if op == "l2_normalize":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if op == "dense":
            return _activate(x @ a["W"] + a["b"], str(self.attrs["activation"]))
        if op == "sigmoid_calibration":
            return _calibrate(x, a["a"], a["b"], int(self.attrs["members"]), int(self.attrs["classes"]))
        return _knn_vote(x, a["vectors"], a["labels"], int(self.attrs["k"]), str(self.attrs["weights"]),
                         int(self.attrs["classes"]))


def check_graph(steps: list[Step], in_dim: int, classes: int) -> None:
    """Refuse a chain whose shapes do not lead from ``in_dim`` embeddings to ``classes`` probabilities."""
    _expect(bool(steps), "the head has no operations")
    width = in_dim
    for step in steps:
        _expect(step.op in OPS, f"unknown head operation {step.op!r}")
        names, attrs = OPS[step.op]
        _expect(set(step.arrays) == set(names) and set(attrs) <= set(step.attrs),
                f"{step.op} needs arrays {', '.join(names) or 'none'} and attributes {', '.join(attrs) or 'none'}")
        width = step.out_dim(width)
    _expect(width == classes, f"the head gives {width} outputs for {classes} classes")
    last = steps[-1]
    _expect(last.op in ("sigmoid_calibration", "knn") or last.attrs.get("activation") == "softmax",
            "the head must end in a softmax, a calibration or a k-NN vote")


def forward(steps: list[Step], x: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities of (N, D) embeddings, computed in float64 like scikit-learn."""
    out = np.asarray(x, dtype=np.float64)
    for step in steps:
        out = step(out)
    return out


def _expect(ok: bool, why: str) -> None:
    if not ok:
        raise TlEmbedError(f"invalid head: {why}")


def _activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return z


def _calibrate(d: np.ndarray, a: np.ndarray, b: np.ndarray, members: int, classes: int) -> np.ndarray:
    """scikit-learn's sigmoid calibration (``CalibratedClassifierCV``), averaged over its members."""
    p = 1.0 / (1.0 + np.exp(a * d + b))
    if classes == 2:  # one decision value per member: the positive (second) class
        pos = p.reshape(len(d), members)
        return np.stack([1 - pos, pos], axis=2).mean(axis=1)
    p = p.reshape(len(d), members, classes)
    total = p.sum(axis=2, keepdims=True)
    p = np.divide(p, total, out=np.full_like(p, 1 / classes), where=total != 0)
    return p.mean(axis=1)


def _knn_vote(x: np.ndarray, vectors: np.ndarray, labels: np.ndarray, k: int, weights: str,
              classes: int) -> np.ndarray:
    """scikit-learn's ``KNeighborsClassifier`` on L2-normalised vectors (euclidean = cosine order)."""
    out = np.zeros((len(x), classes))
    vectors = np.asarray(vectors, dtype=np.float64)  # float32 norms leave ~1e-8 between a vector and itself
    norms = (vectors * vectors).sum(1)
    for start in range(0, len(x), 1024):  # bounded (chunk x stored) distance matrix
        q = x[start:start + 1024]
        d2 = np.maximum((q * q).sum(1, keepdims=True) - 2 * q @ vectors.T + norms, 0)
        near = np.argsort(d2, axis=1, kind="stable")[:, :k]
        dist = np.sqrt(np.take_along_axis(d2, near, axis=1))
        if weights == "uniform":
            w = np.ones_like(dist)
        else:  # 1/d; an exact match takes all the weight, as in scikit-learn
            with np.errstate(divide="ignore"):
                w = 1.0 / dist
            exact = np.isinf(w)
            w[exact.any(axis=1)] = exact[exact.any(axis=1)]
        rows = np.repeat(np.arange(len(q)), k)
        np.add.at(out[start:start + 1024], (rows, labels[near].ravel()), w.ravel())
    return out / out.sum(axis=1, keepdims=True)
