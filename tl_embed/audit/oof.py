"""Out-of-fold probabilities: every row predicted by a head that never saw it, trained as ``train`` trains.

Confident learning (:mod:`.confident`) needs a model's opinion of each row that its own label did
not shape; a head fitted on all rows would simply repeat the labels back.  The hyper-parameters are
chosen once, by the same stratified search ``train`` runs (the only step that sees every row, and it
learns a regularisation strength, not a row's label), then each fold is fitted with them, so an audit
costs about one ``train``.

Rows are read by position, so a store of any size is never held in memory at once: each fold's head
is fitted on at most :data:`FIT_MAX_ROWS` of the rows it may see (a class-stratified sample), and the
held-out rows are predicted in batches, so the fits cost the same at any store size.  At a million
rows of 100 classes, heads fitted this way still found planted wrong labels at precision 1.000 and
recall 0.956 (``benchmarks/audit_scale.py``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np

from ..errors import TlEmbedError
from ..heads.estimator import features_spec
from ..heads.fit import SEARCH_MAX_SAMPLES, fit_head
from ..heads.head import DEFAULT_HEAD

MIN_PER_CLASS = 3  # each held-out image's head must still see 2 of its class (fit_head's minimum)
FIT_MAX_ROWS = 50_000  # rows each fold's head is fitted on, at most (benchmarks/audit_scale.py)
PREDICT_BATCH = 8192  # held-out rows read and predicted at once (a head's steps make float64 copies)

Rows = Callable[[np.ndarray], np.ndarray]  # positions -> their float32 vectors, in that order


def out_of_fold_proba(X: np.ndarray | Rows, y: np.ndarray, head: str = DEFAULT_HEAD, cv: int = 3, seed: int = 0,
                      progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """(n, K) probabilities of labelled rows ``X`` (labels ``y``), each from a head fitted without it.

    ``X``: the vectors, or a function reading them by position (a store's ``take``).  Columns follow
    the returned sorted class names.  ``cv`` stratified folds (seeded), fewer when the smallest class
    cannot fill them; a class of 3 images always gets 3 folds so that every fold's head still trains
    on 2 of its images.  ``progress`` shows a bar over the fits on stderr.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from tqdm import tqdm

    read = _reader(X)
    y = np.asarray(y).astype(str)
    probe = read(np.zeros(min(1, len(y)), np.int64))
    if probe.ndim != 2 or (isinstance(X, np.ndarray) and len(X) != len(y)):
        raise TlEmbedError(f"expected one label per embedding row, got {len(y)} labels for shape {np.shape(X)}")
    folds = choose_folds(y, cv)
    spec = features_spec(probe.shape[1])
    classes = sorted(np.unique(y).tolist())
    proba = np.zeros((len(y), len(classes)), dtype=np.float32)
    rng = np.random.default_rng(seed)
    with tqdm(total=folds + 1, unit="fit", desc="out-of-fold", disable=not progress, file=sys.stderr,
              leave=False) as bar:
        searched = np.arange(len(y))
        if len(y) > SEARCH_MAX_SAMPLES:  # the rows train's search would draw; only its params are kept
            searched, _ = train_test_split(searched, train_size=SEARCH_MAX_SAMPLES, stratify=y, random_state=seed)
        chosen, _ = fit_head(read(searched), y[searched], spec, head, cv=cv, seed=seed)
        bar.update()
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
        for fit_rows, held in splits:
            fit_rows = _sample(fit_rows, y[fit_rows], FIT_MAX_ROWS, rng)
            fold, _ = fit_head(read(fit_rows), y[fit_rows], spec, head, cv=cv, seed=seed, params=chosen.params)
            for start in range(0, len(held), PREDICT_BATCH):
                rows = held[start:start + PREDICT_BATCH]
                proba[rows] = fold.predict_proba(read(rows))  # every class is in each fold: same columns
            bar.update()
    return proba, classes


def _reader(X: np.ndarray | Rows) -> Rows:
    if callable(X):
        return X
    X = np.asarray(X, dtype=np.float32)
    return lambda rows: X[rows]


def _sample(rows: np.ndarray, y: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most about ``limit`` of ``rows``, each class in proportion and never below 2 (sorted positions)."""
    if len(rows) <= limit:
        return rows
    order = np.argsort(y, kind="stable")
    starts = np.flatnonzero(np.r_[True, y[order][1:] != y[order][:-1]])
    kept = []
    for members in np.split(order, starts[1:]):
        take = min(len(members), max(2, math.floor(len(members) * limit / len(rows))))
        kept.append(rng.choice(members, take, replace=False))
    return rows[np.sort(np.concatenate(kept))]


def choose_folds(y: np.ndarray, cv: int) -> int:
    """How many stratified folds labels ``y`` allow (``cv`` when they can), or one line saying why none."""
    if cv < 2:
        raise TlEmbedError(f"--cv must be at least 2 to hold rows out, not {cv}")
    names, counts = np.unique(np.asarray(y).astype(str), return_counts=True)
    if len(names) < 2:
        found = f"only {names.tolist()[0]!r}" if len(names) else "none"
        raise TlEmbedError(f"need at least 2 labelled classes to check labels, found {found}")
    small = [f"{c!r} ({n})" for c, n in zip(names.tolist(), counts.tolist(), strict=True) if n < MIN_PER_CLASS]
    if small:
        raise TlEmbedError(f"too few images to check the labels of class(es) {', '.join(small)}: each needs "
                           f"at least {MIN_PER_CLASS} (every image is predicted by a head trained on 2 others "
                           "of its class); add images or remove those folders")
    smallest = int(counts.min())
    # with 2 folds a class of 3 would leave one head a single image of it; 3 folds leave every head 2
    return MIN_PER_CLASS if smallest == MIN_PER_CLASS else min(cv, smallest)
