"""One audit of a store: the passes in order, each reading only the store and what earlier passes found.

1. the k-NN graph (:func:`tl_embed.search.neighbours.nearest_neighbours`): the evidence beside every
   finding, and the outlier scores;
2. near-duplicate pairs (``dedup``'s exact search, or past its exact limit the graph's pairs): kept
   when they cross splits or disagree on the label;
3. out-of-fold probabilities from the default head and confident learning (:mod:`.oof`,
   :mod:`.confident`): likely wrong labels, and the classes the head confuses;
4. outliers: a robust z-score of each image's mean distance to its neighbours, within its class.

Memory stays bounded at any store size: vectors are streamed or read in batches (never the whole
store at once), and ``benchmarks/audit_scale.py`` measures a million rows.  Nothing is changed: the
audit only reads the store, and what a user does about a finding is theirs
(``train --exclude``, a relabel file).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from ..heads.head import DEFAULT_HEAD
from ..search.dedup import EXACT_PAIRS_MAX, duplicate_pairs
from ..search.neighbours import graph_pairs, nearest_neighbours
from .findings import Audit, DatasetShape, Duplicate, LabelIssue, Neighbour, Outlier

EVALUATION_SPLITS = ("test", "val")  # what a head is scored on: a near-copy of these in training leaks
TINY_CLASS = 5  # fewer images than this make a class's scores (and its CV folds) unreliable
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
SHOWN_NEIGHBOURS = 5  # neighbours kept as evidence with each finding
MIN_FOR_SPREAD = 5  # a class needs this many images to measure its own spread; else the store's is used
READ_ROWS = 2048  # rows read from the store between letting go of its pages (the label pass's reads)


def audit_store(store_path: str | os.PathLike, k: int = 20, threshold: float = 0.95, head: str = DEFAULT_HEAD,
                cv: int = 3, seed: int = 0, progress: bool = False) -> Audit:
    """Find likely wrong labels, leaking or conflicting near-duplicates and outliers in a store.

    ``k``: neighbours per image (evidence and outlier scores); ``threshold``: the cosine at which two
    images count as near-duplicates (``dedup --threshold``); ``head``, ``cv``, ``seed``: the head whose
    out-of-fold predictions judge the labels, as ``train`` takes them.
    """
    if k < 1:
        raise TlEmbedError("-k must be at least 1")
    if not 0 < threshold <= 1:
        raise TlEmbedError("--threshold is a cosine similarity in (0, 1]")
    seconds: dict[str, float] = {}
    with EmbeddingStore.open(store_path) as store:
        n = len(store)
        if n < 2:
            raise TlEmbedError(f"store {store_path} holds {n} image{'s' if n != 1 else ''}: nothing to compare")
        paths = [str(p) for p in store.paths]  # plain str: findings go to JSON as they are
        labels = store.labels
        splits = store.splits
        audit = Audit(str(Path(store_path)), str(store.root or ""), store.spec.describe(),
                      _shape(labels, splits, len(store.failures)))
        t = time.perf_counter()
        sims, nbrs = nearest_neighbours(store, min(k, n - 1), progress=progress)
        seconds["neighbours"] = time.perf_counter() - t

        t = time.perf_counter()  # past dedup's exact limit, the graph's exactly scored pairs: no second search
        i, j, s = duplicate_pairs(store, threshold, progress=progress) if n <= EXACT_PAIRS_MAX else \
            graph_pairs(sims, nbrs, threshold)
        seconds["duplicates"] = time.perf_counter() - t

        t = time.perf_counter()
        proba, classes, used = _label_pass(store, labels, head, cv, seed, progress, audit)
        seconds["labels"] = time.perf_counter() - t

    def evidence(row: int) -> tuple[Neighbour, ...]:
        return tuple(Neighbour(paths[m], labels[m], float(v))
                     for m, v in zip(nbrs[row, :SHOWN_NEIGHBOURS], sims[row, :SHOWN_NEIGHBOURS], strict=True)
                     if m >= 0)

    t = time.perf_counter()
    support = _given_label_support(proba, classes, used, labels, n)
    audit.duplicates = _duplicates(i, j, s, paths, labels, splits, support)
    if proba is not None:
        audit.label_issues = _label_issues(proba, classes, used, paths, labels, splits, (sims, nbrs), evidence)
    audit.outliers = _outliers(sims, nbrs, labels, paths, evidence)
    seconds["findings"] = time.perf_counter() - t
    audit.settings = {"k": k, "threshold": threshold, "head": head, "cv": cv, "seed": seed,
                      "seconds": {name: round(v, 3) for name, v in seconds.items()}}
    return audit


def _shape(labels: np.ndarray, splits: np.ndarray, failed: int) -> DatasetShape:
    known = [lab for lab in labels if lab is not None]
    counts = dict(sorted(Counter(known).items(), key=lambda kv: (-kv[1], kv[0])))
    split_counts = dict(sorted(Counter(sp or "none" for sp in splits).items()))
    tiny = sorted(c for c, m in counts.items() if m < TINY_CLASS)
    imbalance = max(counts.values()) / min(counts.values()) if counts else 1.0
    return DatasetShape(len(labels), len(known), counts, split_counts, tiny, float(imbalance), failed=failed)


def _label_pass(store: EmbeddingStore, labels: np.ndarray, head: str, cv: int, seed: int, progress: bool,
                audit: Audit) -> tuple[np.ndarray | None, list[str], np.ndarray]:
    """Out-of-fold probabilities for the rows whose class can be judged, or None with a note saying why not."""
    from .oof import MIN_PER_CLASS, out_of_fold_proba

    shape = audit.shape
    none = (None, [], np.zeros(0, np.int64))
    if not shape.labelled:
        audit.notes.append("the store has no labels (labels are sub-folder names): label checks need labels; "
                           "duplicates and outliers are checked")
        return none
    judgeable = [c for c, m in shape.counts.items() if m >= MIN_PER_CLASS]
    if len(judgeable) < 2:
        audit.notes.append(f"label checks need at least 2 classes of {MIN_PER_CLASS} or more images; the store "
                           f"has {len(shape.counts)} class(es): {', '.join(list(shape.counts)[:5])}")
        return none
    small = [c for c, m in shape.counts.items() if m < MIN_PER_CLASS]
    if small:
        audit.notes.append(f"class(es) {', '.join(small[:10])} have fewer than {MIN_PER_CLASS} images: their "
                           "labels are not checked")
    keep = set(judgeable)
    used = np.flatnonzero(np.array([lab in keep for lab in labels], dtype=bool))

    def read(rows: np.ndarray) -> np.ndarray:
        vectors = np.empty((len(rows), store.dim), np.float32)
        for start in range(0, len(rows), READ_ROWS):  # scattered rows map in ~64 KB around each: a few at a time
            vectors[start:start + READ_ROWS] = store.take(used[rows[start:start + READ_ROWS]])
            store.release_pages()  # the process holds what it reads, not the store's size
        return vectors

    proba, classes = out_of_fold_proba(read, labels[used].astype(str), head=head, cv=cv, seed=seed,
                                       progress=progress)
    predicted = np.asarray(classes)[proba.argmax(1)]
    given = labels[used].astype(str)
    shape.oof_accuracy = float((predicted == given).mean())
    wrong = Counter((g, p) for g, p in zip(given, predicted, strict=True) if g != p)
    shape.confused = [(g, p, m) for (g, p), m in wrong.most_common(10)]
    return proba, classes, used


def _given_label_support(proba: np.ndarray | None, classes: list[str], used: np.ndarray, labels: np.ndarray,
                         n: int) -> np.ndarray:
    """Each row's out-of-fold probability of its own label (NaN where not judged)."""
    support = np.full(n, np.nan)
    if proba is not None:
        column = {c: m for m, c in enumerate(classes)}
        support[used] = proba[np.arange(len(used)), [column[str(lab)] for lab in labels[used]]]
    return support


def _label_issues(proba: np.ndarray, classes: list[str], used: np.ndarray, paths: list[str], labels: np.ndarray,
                  splits: np.ndarray, graph: tuple[np.ndarray, np.ndarray], evidence) -> list[LabelIssue]:
    """Confident learning on the out-of-fold probabilities blended with the labels of each image's neighbours.

    The blend and the margin ranking are what ``benchmarks/audit.py`` measured most precise against planted
    label noise (see :func:`~tl_embed.audit.confident.find_label_issues`).
    """
    from .confident import blend, find_label_issues, label_quality, neighbour_label_proba

    column = {c: m for m, c in enumerate(classes)}
    given = np.array([column[str(lab)] for lab in labels[used]])
    sims, nbrs = graph
    class_of = np.full(len(labels), -1)
    class_of[used] = given
    near = nbrs[used]
    near_class = np.where(near >= 0, class_of[np.maximum(near, 0)], -1)  # neighbours whose label is judged
    blended = blend(proba, neighbour_label_proba(near_class, sims[used], np.arange(len(classes)), len(classes)))
    suspicion = label_quality(given, blended, "normalized_margin")
    found = []
    for r in find_label_issues(given, blended):
        row = int(used[r])
        others = proba[r].copy()
        others[given[r]] = -1
        best = int(others.argmax())
        found.append(LabelIssue(paths[row], str(labels[row]), classes[best], float(proba[r, best]),
                                float(suspicion[r]), evidence(row), splits[row]))
    return found


def _duplicates(i: np.ndarray, j: np.ndarray, s: np.ndarray, paths: list[str], labels: np.ndarray,
                splits: np.ndarray, support: np.ndarray) -> list[Duplicate]:
    """Near-duplicate pairs worth a look: a training copy of an evaluation image, or two labels for one image.

    In a cross-split pair the training copy is named first (leaving it out of training keeps the test
    set whole); in a label conflict, the copy whose label the out-of-fold predictions support less.
    """
    found = []
    for a, b, sim in zip(i.tolist(), j.tolist(), s.tolist(), strict=True):
        sa, sb = splits[a], splits[b]
        if (sa in EVALUATION_SPLITS) != (sb in EVALUATION_SPLITS):
            train, held = (b, a) if sa in EVALUATION_SPLITS else (a, b)
            found.append(Duplicate("cross-split", paths[train], paths[held], float(sim), labels[train],
                                   labels[held], splits[train], splits[held]))
        if labels[a] is not None and labels[b] is not None and labels[a] != labels[b]:
            first, second = (b, a) if np.nan_to_num(support[b], nan=1) < np.nan_to_num(support[a], nan=1) else (a, b)
            found.append(Duplicate("label-conflict", paths[first], paths[second], float(sim), labels[first],
                                   labels[second], splits[first], splits[second]))
    found.sort(key=lambda d: (d.kind, -d.similarity, d.path))
    return found


def _outliers(sims: np.ndarray, nbrs: np.ndarray, labels: np.ndarray, paths: list[str],
              evidence) -> list[Outlier]:
    """Images whose mean distance to their k nearest neighbours is far above their class's usual distance.

    The modified z-score (Iglewicz & Hoaglin 1993) uses the median and the median absolute deviation,
    so the outliers themselves do not widen the spread they are measured against.
    """
    finite = np.where(np.isfinite(sims), sims, np.nan)
    distance = 1 - np.nanmean(finite, axis=1)
    groups: dict[object, list[int]] = {}
    for row, lab in enumerate(labels):
        groups.setdefault(lab, []).append(row)
    z = _modified_z(distance, np.arange(len(distance)))  # the whole store: for small or unlabelled groups
    for lab, rows in groups.items():
        if lab is not None and len(rows) >= MIN_FOR_SPREAD:
            z[rows] = _modified_z(distance, np.asarray(rows))[rows]
    found = []
    for row in np.flatnonzero(z > OUTLIER_Z):
        near = Counter(labels[m] for m in nbrs[row] if m >= 0 and labels[m] is not None).most_common(1)
        nearest = near[0][0] if near and near[0][0] != labels[row] else None
        found.append(Outlier(paths[row], labels[row], float(z[row]), float(distance[row]), nearest, evidence(row)))
    found.sort(key=lambda o: (-o.score, o.path))
    return found


def _modified_z(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """0.6745 (x - median) / MAD over ``rows``, written into a full-length array (0 elsewhere)."""
    z = np.zeros(len(values))
    x = values[rows]
    median = np.median(x)
    mad = np.median(np.abs(x - median))
    if mad > 0:
        z[rows] = 0.6745 * (x - median) / mad
    return z
