"""Choosing a linear head's regularisation and feature transform the way linear-probe papers do.

CLIP's protocol: sweep the regularisation strength on a log scale, refine around the best value by
halving the step, score every candidate on held-out data, then refit once on everything.  Here the
held-out score is a stratified k-fold mean (a single validation split of a 250-image set is a coin
toss), each fold's fits are warm-started from the nearest C already fitted (a sweep costs little
more than a few cold fits), and the feature transform is one more hyper-parameter: every transform
gets the coarse sweep, only the winner is refined.  The folds are fitted side by side, one thread
each with single-threaded BLAS: these fits are too small for a multi-threaded BLAS, whose threads
cost more to wake on every product than the product itself, so a fit gets slower, not faster, with more
BLAS threads (benchmarks/heads.py times the training).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from ..cpus import cpu_count

TRANSFORMS = ("none", "sqrt-l2")  # "sqrt-l2": signed square root, then L2 normalisation
LIMITS = (-6.0, 2.0)  # log10 C: the sweep walks past a winning edge of its start, but not past these
HALVINGS = 2  # refine around the best by 1/2 then 1/4 decade

Score = tuple[float, float]  # (mean accuracy, tie-breaker: minus the mean log-loss, or 0)


def sweep(score: Callable[[float], Score], coarse: tuple[float, ...], limits: tuple[float, float] = LIMITS,
          halvings: int = HALVINGS) -> tuple[float, dict[float, Score]]:
    """The best log10 C for ``score`` (a function of C) and every score computed on the way.

    ``coarse`` (log10 C, a decade apart) is where the sweep starts: while its best point is at an
    edge, the next decade out is tried, so the search follows the optimum instead of paying for a
    wide grid (weakly regularised fits are the slow ones).  Ties go to the smaller C (the stronger
    regularisation generalises more safely).
    """
    seen: dict[float, Score] = {}

    def at(e: float) -> None:
        e = round(e, 6)
        if e not in seen:
            seen[e] = score(10.0 ** e)

    for e in coarse:
        at(e)
    while True:  # a winning edge means the optimum may lie further out: follow it
        best = _best(seen)
        step = 1.0 if best == max(seen) else -1.0 if best == min(seen) else 0.0
        if step == 0.0 or not limits[0] <= best + step <= limits[1]:
            break
        at(best + step)
    best, step = _best(seen), 1.0
    for _ in range(halvings):
        step /= 2
        for e in (best - step, best + step):
            if limits[0] <= e <= limits[1]:
                at(e)
        best = _best(seen)
    return best, seen


def _best(seen: dict[float, Score]) -> float:
    return max(seen, key=lambda e: (seen[e], -e))


@contextmanager
def side_by_side() -> Iterator[None]:
    """Single-threaded BLAS, and scikit-learn's parallel work (a calibration's folds) in one thread per
    core: small fits run faster side by side than one after another on a multi-threaded BLAS."""
    from joblib import parallel_config

    with threadpool_limits(1), parallel_config(backend="threading", n_jobs=cpu_count()):
        yield


def apply_transform(X: np.ndarray, transform: str) -> np.ndarray:
    """The stateless part of a transform (the standardisation after it is fitted per fold), in float32
    like the embeddings: the search's matrix products run at twice the float64 speed."""
    X = np.asarray(X, dtype=np.float32)
    if transform == "sqrt-l2":
        X = np.sign(X) * np.sqrt(np.abs(X))
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


@dataclass
class FoldScorer:
    """Mean held-out score of ``make(C)`` over fixed folds of standardised (transformed) features."""

    X: np.ndarray
    y: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    make: Callable[[float], object]  # an estimator with ``warm_start=True``: it continues from its coef_
    fitted: list[dict[float, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = [_standardise(self.X[tr], self.X[va]) for tr, va in self.folds]
        self.fitted = [{} for _ in self.folds]

    def __call__(self, C: float) -> Score:
        with side_by_side(), ThreadPoolExecutor(min(len(self.folds), cpu_count())) as pool:
            scores = list(pool.map(lambda f: self._fold(f, C), range(len(self.folds))))
        accs, losses = zip(*scores, strict=True)
        return float(np.mean(accs)), -float(np.mean(losses)) if None not in losses else 0.0

    def _fold(self, f: int, C: float) -> tuple[float, float | None]:
        """Fit fold ``f`` at ``C``: its validation accuracy and log-loss (None without probabilities)."""
        (tr, va), (X_tr, X_va), done = self.folds[f], self.data[f], self.fitted[f]
        est = self._start(done, C)
        est.fit(X_tr, self.y[tr])
        done[C] = est
        acc = float((est.predict(X_va) == self.y[va]).mean())
        if not hasattr(est, "predict_proba"):
            return acc, None
        p = est.predict_proba(X_va)[np.arange(len(va)), np.searchsorted(est.classes_, self.y[va])]
        return acc, float(-np.log(np.clip(p, 1e-15, 1)).mean())

    def _start(self, done: dict[float, object], C: float):
        """A fresh estimator, or a copy of the one fitted at the nearest C (its solution is the start)."""
        if not done:
            return self.make(C)
        near = min(done, key=lambda c: abs(np.log10(c) - np.log10(C)))
        est = copy.deepcopy(done[near])
        est.set_params(C=C)
        return est


def _standardise(X_tr: np.ndarray, X_va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = X_tr.mean(0, dtype=np.float64), X_tr.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0  # constant features, as StandardScaler does
    mean, std = mean.astype(X_tr.dtype), std.astype(X_tr.dtype)
    return (X_tr - mean) / std, (X_va - mean) / std


@dataclass
class SearchResult:
    C: float
    transform: str
    score: float  # mean held-out accuracy at the choice
    table: dict[str, dict[float, Score]]  # transform -> log10 C -> score


def search_linear(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                  make: Callable[[float], object], coarse: tuple[float, ...],
                  transforms: tuple[str, ...] = TRANSFORMS) -> SearchResult:
    """Coarse sweep per transform, then refine the best transform's C around its best value."""
    table: dict[str, dict[float, Score]] = {}
    scorers: dict[str, FoldScorer] = {}
    for t in transforms:
        scorers[t] = FoldScorer(apply_transform(X, t), y, folds, make)
        _, table[t] = sweep(scorers[t], coarse, halvings=0)
    choice = max(transforms, key=lambda t: (max(table[t].values()), -transforms.index(t)))
    best, _ = sweep(_Replay(scorers[choice], table[choice]), coarse)
    return SearchResult(10.0 ** best, choice, table[choice][round(best, 6)][0], table)


@dataclass
class _Replay:
    """A scorer that answers from ``seen`` first (and records what it computes there)."""

    scorer: FoldScorer
    seen: dict[float, Score]

    def __call__(self, C: float) -> Score:
        e = round(float(np.log10(C)), 6)
        if e not in self.seen:
            self.seen[e] = self.scorer(C)
        return self.seen[e]
