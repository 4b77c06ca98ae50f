"""Likely wrong labels by confident learning (Northcutt, Jiang & Chuang, JAIR 70, 2021), in numpy.

Written from the paper (cleanlab, its authors' library, is AGPL and is only ever run beside this in
``benchmarks/audit.py``): out-of-fold probabilities and the given labels estimate how many rows of each
given class truly belong to each other class (the confident joint, Sec. 3.1); that many rows per
(given, true) pair, those most in favour of the other class, are flagged (Prune by Noise Rate, Sec. 3.2),
and flagged rows are ranked by how little probability their own label gets (self-confidence, Sec. 3.2).

``labels`` are class indices 0..K-1 and ``proba`` the (n, K) out-of-fold probabilities
(:func:`~tl_embed.audit.oof.out_of_fold_proba`).
"""

from __future__ import annotations

import numpy as np

from ..errors import TlEmbedError

RANKINGS = ("self_confidence", "normalized_margin")
TOLERANCE = 1e-9  # a probability this close below a class's threshold counts as reaching it


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(K, K) integer counts: row i, column j ~ rows labelled i whose true class is j (Sec. 3.1).

    Class j's threshold t_j is the mean probability of j over the rows labelled j (its average
    self-confidence).  A row is counted in (its label, j) for the most probable j among the classes
    whose probability reaches their threshold; rows that reach none are not counted.  The counts are
    then calibrated so that each row sums to the number of rows with that label, and rounded keeping
    those sums (a given class nothing was counted for is assumed correct: all on the diagonal).
    """
    labels, proba = _check(labels, proba)
    n, k = proba.shape
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([proba[labels == j, j].mean() for j in range(k)])
    above = proba >= thresholds - TOLERANCE
    counted = above.any(axis=1)
    guess = np.where(above, proba, -np.inf).argmax(axis=1)
    raw = np.zeros((k, k))
    np.add.at(raw, (labels[counted], guess[counted]), 1)
    sums = raw.sum(axis=1, keepdims=True)
    calibrated = np.where(sums > 0, raw / np.maximum(sums, 1) * counts[:, None], np.diag(counts))
    return _round_rows(calibrated, counts)


def find_label_issues(labels: np.ndarray, proba: np.ndarray, rank_by: str = "self_confidence",
                      neighbour_proba: np.ndarray | None = None) -> np.ndarray:
    """Indices of the rows whose label is likely wrong, most suspicious first (Prune by Noise Rate, Sec. 3.2).

    For each off-diagonal cell (i, j) of :func:`confident_joint`, the that-many rows labelled i with the
    largest margin ``P[:, j] - P[:, i]`` are flagged.  Two guards keep the flags to rows the model
    disputes: a row whose own label is its most probable class is never flagged, and neither is every
    row of a class (its most self-confident one stays).  ``rank_by`` orders the flags
    (:func:`label_quality`); ``neighbour_proba`` blends in the labels of each row's neighbours first
    (:func:`blend`).
    """
    labels, proba = _check(labels, proba)
    proba = blend(proba, neighbour_proba)
    joint = confident_joint(labels, proba)
    n, k = proba.shape
    flagged = np.zeros(n, dtype=bool)
    for i in range(k):
        rows = np.flatnonzero(labels == i)
        for j in range(k):
            if j != i and joint[i, j] > 0:
                margin = proba[rows, j] - proba[rows, i]
                flagged[rows[np.argsort(-margin, kind="stable")[:joint[i, j]]]] = True
    flagged &= proba.argmax(axis=1) != labels
    self_conf = proba[np.arange(n), labels]
    for i in range(k):
        rows = np.flatnonzero(labels == i)
        if flagged[rows].all():
            flagged[rows[np.argmax(self_conf[rows])]] = False
    issues = np.flatnonzero(flagged)
    score = label_quality(labels, proba, rank_by)
    return issues[np.argsort(-score[issues], kind="stable")]


def label_quality(labels: np.ndarray, proba: np.ndarray, rank_by: str = "self_confidence",
                  neighbour_proba: np.ndarray | None = None) -> np.ndarray:
    """Each row's suspicion in [0, 1], higher = more likely mislabelled (the ranking scores of Sec. 3.2).

    ``self_confidence``: 1 - P[i, given].  ``normalized_margin``: (1 - P[i, given] + max of the
    other classes' P) / 2, which also weighs how strongly one other class is preferred.
    """
    labels, proba = _check(labels, proba)
    proba = blend(proba, neighbour_proba)
    own = proba[np.arange(len(labels)), labels]
    if rank_by == "self_confidence":
        return 1.0 - own
    if rank_by == "normalized_margin":
        others = proba.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        return (1.0 - own + others.max(axis=1)) / 2
    raise TlEmbedError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")


NEIGHBOUR_WEIGHT = 0.5  # share of the neighbours' label distribution in :func:`blend`


def blend(proba: np.ndarray, neighbour_proba: np.ndarray | None) -> np.ndarray:
    """The out-of-fold probabilities mixed with the k-NN view (or unchanged when there is none)."""
    if neighbour_proba is None:
        return proba
    neighbour_proba = np.asarray(neighbour_proba, dtype=np.float64)
    if neighbour_proba.shape != proba.shape:
        raise TlEmbedError(f"neighbour probabilities have shape {neighbour_proba.shape}, not {proba.shape}")
    return (1 - NEIGHBOUR_WEIGHT) * proba + NEIGHBOUR_WEIGHT * neighbour_proba


def neighbour_label_proba(neighbours: np.ndarray, similarities: np.ndarray, labels: np.ndarray,
                          n_classes: int) -> np.ndarray:
    """(n, K): for each row, the similarity-weighted share of its k nearest neighbours carrying each label.

    ``neighbours`` (n, k) are row indices (not the row itself), ``similarities`` their cosines.
    """
    labels = np.asarray(labels)
    weights = np.maximum(np.asarray(similarities, dtype=np.float64), 0) + 1e-12
    out = np.zeros((len(neighbours), n_classes))
    np.add.at(out, (np.arange(len(neighbours))[:, None], labels[neighbours]), weights)
    return out / out.sum(axis=1, keepdims=True)


def _check(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or labels.shape != (len(proba),):
        raise TlEmbedError(f"expected (n, K) probabilities and n labels, got {proba.shape} and {labels.shape}")
    k = proba.shape[1]
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
        raise TlEmbedError(f"labels must be class indices 0..{proba.shape[1] - 1}")
    missing = np.setdiff1d(np.arange(proba.shape[1]), labels)
    if missing.size:
        raise TlEmbedError(f"class(es) {', '.join(map(str, missing))} label no row: thresholds need rows of each class")
    return labels, proba


def _round_rows(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Integer counts nearest ``values`` whose rows still sum to ``totals`` (largest remainders round up)."""
    out = np.floor(values).astype(np.int64)
    for i, row in enumerate(values):
        short = int(totals[i] - out[i].sum())
        if short > 0:
            out[i, np.argsort(-(row - out[i]), kind="stable")[:short]] += 1
    return out
