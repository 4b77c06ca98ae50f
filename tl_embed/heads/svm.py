"""A linear SVM solved in the primal with L-BFGS: every class at once, as dense matrix products.

scikit-learn's ``LinearSVC`` (liblinear) copies dense features into its sparse row format and
solves one class at a time without BLAS, so tens of thousands of dense rows take minutes.  The objective
here is the same one-vs-rest squared hinge, ``0.5 |W|^2 + C sum_i sum_k max(0, 1 - y_ik z_ik)^2``
(the intercept unregularised), but its loss and gradient over all classes are two matrix products,
so a fit is a few hundred BLAS calls (benchmarks/heads.py times it on 50 000 x 1280).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight


class PrimalLinearSVC(LinearClassifierMixin, BaseEstimator):
    """One-vs-rest L2-regularised squared-hinge linear SVM (``LinearSVC``'s objective), fitted by L-BFGS.

    ``warm_start`` continues from the current ``coef_``/``intercept_`` (a regularisation sweep
    fits each C from its neighbour's solution).
    """

    def __init__(self, C: float = 1.0, tol: float = 1e-3, max_iter: int = 1000,
                 class_weight: str | dict | None = None, warm_start: bool = False):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.warm_start = warm_start

    def fit(self, X, y, sample_weight=None) -> PrimalLinearSVC:
        from scipy.optimize import minimize

        X = np.asarray(X)
        X = X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)
        self.classes_, idx = np.unique(np.asarray(y), return_inverse=True)
        n, d = X.shape
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        Y = -np.ones((n, k), dtype=X.dtype)
        if k == 1:
            Y[idx == 1, 0] = 1
        else:
            Y[np.arange(n), idx] = 1
        w = compute_sample_weight(self.class_weight, idx) if self.class_weight is not None else np.ones(n)
        if sample_weight is not None:
            w = w * np.asarray(sample_weight, dtype=np.float64)
        scale = 1.0 / (self.C * w.sum())  # the objective / (C sum(w)): the same minimum, values near 1
        cw = (self.C * w * scale).astype(X.dtype)[:, None]
        start = np.zeros(d * k + k)
        if self.warm_start and getattr(self, "coef_", None) is not None and self.coef_.shape == (k, d):
            start = np.concatenate([self.coef_.T.ravel(), self.intercept_])

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = theta[:d * k].reshape(d, k), theta[d * k:]
            margin = np.maximum(0, 1 - Y * (X @ W.astype(X.dtype) + b.astype(X.dtype)))
            G = -2 * cw * margin * Y  # d loss / d z
            loss = 0.5 * scale * float(W.ravel() @ W.ravel()) + float((cw * margin * margin).sum(dtype=np.float64))
            return loss, np.concatenate([(scale * W + X.T @ G).ravel(), G.sum(0, dtype=np.float64)])

        # stop once the gradient is ``tol`` times its size at zero (the same rule for every C and n,
        # warm-started or not)
        gtol = self.tol * float(np.abs(loss_grad(np.zeros_like(start))[1]).max())
        res = minimize(loss_grad, start, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": gtol, "ftol": 1e-12})
        self.coef_ = res.x[:d * k].reshape(d, k).T.copy()
        self.intercept_ = res.x[d * k:].copy()
        self.n_iter_ = np.array([res.nit])
        self.n_features_in_ = d
        return self
