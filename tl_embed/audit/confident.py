"""Likely wrong labels by confident learning (Northcutt, Jiang & Chuang, JAIR 70, 2021), in numpy.

Written from the paper (cleanlab, its authors' library, is AGPL and is only ever run beside this in
``benchmarks/audit.py``): out-of-fold probabilities and the given labels estimate how many rows of each
given class truly belong to each other class (the confident joint, Sec. 3.1), which says how many rows
to flag (Prune by Noise Rate, Sec. 3.2).  Which rows, and in what order, is decided by a ranking score
(Sec. 3.2); the labels of each row's nearest neighbours can be blended into the probabilities first,
which the benchmark found to flag the planted errors more precisely.

``labels`` are class indices 0..K-1 and ``proba`` the (n, K) out-of-fold probabilities
(:func:`~tl_embed.audit.oof.out_of_fold_proba`).
"""

from __future__ import annotations

import numpy as np

from ..errors import TlEmbedError

RANKINGS = ("self_confidence", "normalized_margin")
METHODS = {"margin": "normalized_margin", "prune_by_noise_rate": "self_confidence"}  # method -> its ranking
TOLERANCE = 1e-9  # a probability this close below a class's threshold counts as reaching it
NEIGHBOUR_WEIGHT = 0.35  # share of the neighbours' labels in :func:`blend` (benchmarks/audit.py, with k = 20)
BLOCK_ROWS = 65_536  # rows of an (n, K) array computed at once


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(K, K) integer counts: row i, column j ~ rows labelled i whose true class is j (Sec. 3.1).

    Class j's threshold t_j is the mean probability of j over the rows labelled j (its average
    self-confidence).  A row is counted in (its label, j) for the most probable j among the classes
    whose probability reaches their threshold; rows that reach none are not counted.  The counts are
    then calibrated so that each row sums to the number of rows with that label, and rounded keeping
    those sums (a given class nothing was counted for is assumed correct: all on the diagonal).
    """
    labels, proba = _check(labels, proba)
    k = proba.shape[1]
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


def find_label_issues(labels: np.ndarray, proba: np.ndarray, neighbour_proba: np.ndarray | None = None,
                      method: str = "margin") -> np.ndarray:
    """Indices of the rows whose label is likely wrong, most suspicious first.

    How many: Prune by Noise Rate (Sec. 3.2): for each off-diagonal cell (i, j) of
    :func:`confident_joint`, the that-many rows labelled i with the largest margin ``P[:, j] - P[:, i]``.
    ``method="prune_by_noise_rate"`` flags exactly those rows, ranked by self-confidence (the paper's
    method); ``"margin"`` flags as many rows, but the ones with the highest normalized-margin suspicion
    over all classes (:func:`label_quality`), ranked by it.  Either way a row whose own label is its most
    probable class is never flagged, and neither is every row of a class (its most self-confident one
    stays).  ``neighbour_proba`` (:func:`neighbour_label_proba`) is blended in first (:func:`blend`).

    ``benchmarks/audit.py`` measured ``margin`` with the k-NN view best: on the five shared photo sets
    with 5-20% planted noise, precision at the planted count 4 points above the paper's method and
    cleanlab's (higher on 28 of 30 set x noise combinations, 0.4 below on one), flags 4.5 points more
    precise.
    """
    labels, proba = _check(labels, proba)
    proba = blend(proba, neighbour_proba)
    if method not in METHODS:
        raise TlEmbedError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    score = label_quality(labels, proba, METHODS[method])
    own, other = _own_and_best_other(labels, proba)
    disputed = other > own  # another class is more probable than the given one
    flagged = _prune_by_noise_rate(labels, proba) & disputed
    if method == "margin":
        rows = np.flatnonzero(disputed)
        chosen = rows[np.argsort(-score[rows], kind="stable")[:flagged.sum()]]
        flagged = np.zeros_like(flagged)
        flagged[chosen] = True
    for rows in _rows_by_class(labels, proba.shape[1]):
        if flagged[rows].all():
            flagged[rows[np.argmax(own[rows])]] = False
    issues = np.flatnonzero(flagged)
    return issues[np.argsort(-score[issues], kind="stable")]


def label_quality(labels: np.ndarray, proba: np.ndarray, rank_by: str = "normalized_margin",
                  neighbour_proba: np.ndarray | None = None) -> np.ndarray:
    """Each row's suspicion in [0, 1], higher = more likely mislabelled (the ranking scores of Sec. 3.2).

    ``self_confidence``: 1 - P[i, given].  ``normalized_margin``: (1 - P[i, given] + the largest other
    class's P) / 2: above 1/2 exactly when another class is more probable than the given one.
    """
    labels, proba = _check(labels, proba)
    own, other = _own_and_best_other(labels, blend(proba, neighbour_proba))
    if rank_by == "self_confidence":
        return 1.0 - own
    if rank_by == "normalized_margin":
        return (1.0 - own + other) / 2
    raise TlEmbedError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")


def _own_and_best_other(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's probability of its given label, and the largest probability of any other class."""
    rows = np.arange(len(labels))
    others = proba.copy()
    others[rows, labels] = -np.inf
    return proba[rows, labels], others.max(axis=1)


def _prune_by_noise_rate(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows Prune by Noise Rate removes (Sec. 3.2), before any guard."""
    joint = confident_joint(labels, proba)
    flagged = np.zeros(len(labels), dtype=bool)
    members = _rows_by_class(labels, proba.shape[1])
    for i, j in zip(*np.nonzero(joint), strict=True):
        if i != j:
            rows = members[i]
            margin = proba[rows, j] - proba[rows, i]
            flagged[rows[np.argsort(-margin, kind="stable")[:joint[i, j]]]] = True
    return flagged


def blend(proba: np.ndarray, neighbour_proba: np.ndarray | None) -> np.ndarray:
    """The out-of-fold probabilities mixed with the k-NN view (unchanged where there is none).

    Computed in place on one new (n, K) array: at a million rows each such array is hundreds of MB.
    """
    if neighbour_proba is None:
        return proba
    neighbour_proba = np.asarray(neighbour_proba)
    if neighbour_proba.shape != proba.shape:
        raise TlEmbedError(f"neighbour probabilities have shape {neighbour_proba.shape}, not {proba.shape}")
    unseen = neighbour_proba.sum(axis=1) <= 0
    out = np.multiply(neighbour_proba, NEIGHBOUR_WEIGHT, dtype=proba.dtype)
    for start in range(0, len(out), BLOCK_ROWS):  # in blocks: no full-size temporary
        out[start:start + BLOCK_ROWS] += (1 - NEIGHBOUR_WEIGHT) * proba[start:start + BLOCK_ROWS]
    out[unseen] = proba[unseen]
    return out


def neighbour_label_proba(neighbours: np.ndarray, similarities: np.ndarray, labels: np.ndarray,
                          n_classes: int) -> np.ndarray:
    """(n, K): for each row, the similarity-weighted share of its k nearest neighbours carrying each label.

    ``neighbours`` (n, k) are indices into ``labels`` (never the row itself; -1 or a non-finite
    similarity for none), ``similarities`` their cosines.  A row with no neighbour gets a row of zeros,
    which :func:`blend` leaves out.
    """
    neighbours = np.asarray(neighbours)
    sims = np.asarray(similarities, dtype=np.float64)
    valid = (neighbours >= 0) & np.isfinite(sims)
    weights = np.where(valid, np.maximum(np.where(valid, sims, 0), 0) + 1e-12, 0).astype(np.float32)
    out = np.zeros((len(neighbours), n_classes), np.float32)
    np.add.at(out, (np.arange(len(neighbours))[:, None], np.asarray(labels)[np.where(valid, neighbours, 0)]),
              weights)
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def _check(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    proba = np.asarray(proba)
    proba = proba if proba.dtype in (np.float32, np.float64) else proba.astype(np.float64)  # float32 stays
    if proba.ndim != 2 or labels.shape != (len(proba),):
        raise TlEmbedError(f"expected (n, K) probabilities and n labels, got {proba.shape} and {labels.shape}")
    k = proba.shape[1]
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
        raise TlEmbedError(f"labels must be class indices 0..{proba.shape[1] - 1}")
    missing = np.setdiff1d(np.arange(proba.shape[1]), labels)
    if missing.size:
        raise TlEmbedError(f"class(es) {', '.join(map(str, missing))} label no row: thresholds need rows of each class")
    return labels, proba


def _rows_by_class(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """The rows of each class 0..k-1, found in one sort (not k passes over a million labels)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.searchsorted(labels[order], np.arange(1, k)))


def _round_rows(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Integer counts nearest ``values`` whose rows still sum to ``totals`` (largest remainders round up)."""
    out = np.floor(values).astype(np.int64)
    for i, row in enumerate(values):
        short = int(totals[i] - out[i].sum())
        if short > 0:
            out[i, np.argsort(-(row - out[i]), kind="stable")[:short]] += 1
    return out
