"""Store-level workflows around heads: choose the evaluation split, train, evaluate, predict.

Embedding new images goes through :mod:`tl_embed.embedding.query`; work from a store needs no model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding.backbones import check_compatible
from ..embedding.query import embed_for
from ..embedding.store import MANIFEST, EmbeddingStore
from ..errors import TlEmbedError
from .head import DEFAULT_HEAD, Head
from .metrics import Metrics, evaluate_predictions


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def choose_split(labels: np.ndarray, splits: np.ndarray, test_size: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices (train, held-out) of labelled rows and a phrase saying how they were chosen.

    The store's own split wins: ``test`` is held out (train + val train), else ``val``.
    Otherwise a seeded stratified hold-out of ``test_size``.
    """
    from sklearn.model_selection import train_test_split

    labelled = np.flatnonzero(np.array([lab is not None for lab in labels], dtype=bool))
    sp = splits[labelled]
    for held in ("test", "val"):
        if (sp == held).any() and (sp != held).any():
            return labelled[sp != held], labelled[sp == held], f"the store's '{held}' split"
    if not 0 < test_size < 1:
        raise TlEmbedError("--test-size must be between 0 and 1")
    y = labels[labelled].astype(str)
    _, counts = np.unique(y, return_counts=True)
    if len(counts) and counts.min() < 2:
        small = [c for c, n in zip(*np.unique(y, return_counts=True), strict=True) if n < 2]
        raise TlEmbedError(f"class(es) {', '.join(small)} have only 1 image; each class needs at "
                           "least 2 (one to train on, one to test); add images or remove those folders")
    try:
        tr, te = train_test_split(labelled, test_size=test_size, stratify=y, random_state=seed)
    except ValueError as e:
        raise TlEmbedError(f"cannot make a stratified {test_size:.0%} hold-out: {e}") from None
    return np.sort(tr), np.sort(te), f"a stratified {test_size:.0%} hold-out (seed {seed})"


@dataclass
class TrainResult:
    head: Head
    metrics: Metrics
    split: str
    n_train: int
    info: dict


def train_from_store(store_path: str | os.PathLike, head: str = DEFAULT_HEAD,
                     class_weight: str | None = None, test_size: float = 0.2, seed: int = 0,
                     cv: int = 3, transform: str = "auto", hidden: int = 0) -> TrainResult:
    """Train on the store's labelled training rows and evaluate on its held-out rows."""
    from .fit import fit_head  # scikit-learn: only training needs it

    with EmbeddingStore.open(store_path) as store:
        if len(store) == 0:
            raise TlEmbedError(f"store {store_path} is empty")
        labels, splits = store.labels, store.splits
        tr, te, how = choose_split(labels, splits, test_size, seed)
        X_tr, X_te = store.take(tr), store.take(te)  # only the labelled rows, chunk by chunk
        spec = store.spec
    if len(tr) == 0:
        raise TlEmbedError(f"store {store_path} has no labelled images (labels are sub-folder names)")
    fitted, info = fit_head(X_tr, labels[tr].astype(str), spec, head, class_weight, cv, seed,
                            transform=transform, hidden=hidden)
    unseen = sorted(set(labels[te].astype(str)) - set(fitted.classes))
    if unseen:
        raise TlEmbedError(f"held-out images have class(es) absent from training: {', '.join(unseen)}")
    metrics = evaluate_predictions(labels[te].astype(str), fitted.predict(X_te), fitted.classes)
    fitted.metrics = {"held_out": how, **metrics.to_dict(), **info, "n_train": int(len(tr))}
    return TrainResult(fitted, metrics, how, int(len(tr)), info)


def store_features(head: Head, store_path: str | os.PathLike,
                   split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, labels, paths) of a store, refusing one made by another backbone."""
    with EmbeddingStore.open(store_path) as store:
        check_compatible(head.spec, store.spec, "the model")
        keep = np.ones(len(store), dtype=bool) if split is None else (store.splits == split)
        X = store.take(np.flatnonzero(keep))
        return X, store.labels[keep], [str(store.absolute_path(p)) for p in store.paths[keep]]


def evaluate_head(head: Head, target: str | os.PathLike, split: str | None = None,
                  runtime: str = "auto") -> Metrics:
    """Metrics of ``head`` on a labelled store or a labelled image folder."""
    if is_store(target):
        X, labels, _ = store_features(head, target, split)
    else:
        from ..embedding.scan import label_and_split

        emb = embed_for(head.spec, [target], runtime)
        root = Path(target)
        X = emb.vectors
        labels = np.array([label_and_split(p.relative_to(root).as_posix())[0] for p in emb.paths],
                          dtype=object)
    keep = np.array([lab is not None for lab in labels], dtype=bool)
    if not keep.any():
        raise TlEmbedError(f"{target} has no labelled images (labels are sub-folder names)")
    y = labels[keep].astype(str)
    unknown = sorted(set(y) - set(head.classes))
    if unknown:
        raise TlEmbedError(f"{target} has classes the model was not trained on: {', '.join(unknown)}")
    return evaluate_predictions(y, head.predict(X[keep]), head.classes)
