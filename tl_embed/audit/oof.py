"""Out-of-fold probabilities: every row predicted by a head that never saw it, trained as ``train`` trains.

Confident learning (:mod:`.confident`) needs a model's opinion of each row that its own label did
not shape; a head fitted on all rows would simply repeat the labels back.  The hyper-parameters are
chosen once, by the same stratified search ``train`` runs (the only step that sees every row, and it
learns a regularisation strength, not a row's label), then each fold is fitted with them, so an audit
costs about one ``train``.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import TlEmbedError
from ..heads.estimator import features_spec
from ..heads.fit import fit_head
from ..heads.head import DEFAULT_HEAD

MIN_PER_CLASS = 3  # each held-out image's head must still see 2 of its class (fit_head's minimum)


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, head: str = DEFAULT_HEAD, cv: int = 3, seed: int = 0,
                      progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """(n, K) probabilities of labelled rows ``X`` (labels ``y``), each from a head fitted without it.

    Columns follow the returned sorted class names.  ``cv`` stratified folds (seeded), fewer when the
    smallest class cannot fill them; a class of 3 images always gets 3 folds so that every fold's head
    still trains on 2 of its images.  ``progress`` shows a bar over the fits on stderr.
    """
    from sklearn.model_selection import StratifiedKFold
    from tqdm import tqdm

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).astype(str)
    if X.ndim != 2 or len(X) != len(y):
        raise TlEmbedError(f"expected one label per embedding row, got {len(y)} labels for shape {X.shape}")
    folds = choose_folds(y, cv)
    spec = features_spec(X.shape[1])
    classes = sorted(np.unique(y).tolist())
    proba = np.zeros((len(y), len(classes)), dtype=np.float64)
    with tqdm(total=folds + 1, unit="fit", desc="out-of-fold", disable=not progress, file=sys.stderr,
              leave=False) as bar:
        chosen, _ = fit_head(X, y, spec, head, cv=cv, seed=seed)  # the search train runs; its params only
        bar.update()
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y)
        for fit_rows, held in splits:
            fold, _ = fit_head(X[fit_rows], y[fit_rows], spec, head, cv=cv, seed=seed, params=chosen.params)
            proba[held] = fold.predict_proba(X[held])  # every class is in each fold: same columns
            bar.update()
    return proba, classes


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
