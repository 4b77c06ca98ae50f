"""Store-level workflows around heads: choose the evaluation split, train, evaluate, predict.

Embedding new images goes through :mod:`tl_embed.embedding.query`; work from a store needs no model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embedding.backbones import check_compatible
from ..embedding.carried import FOLDER, read_files
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
                     cv: int = 3, transform: str = "auto", hidden: int = 0, exclude: Collection[str] = (),
                     relabel: Mapping[str, str] | None = None) -> TrainResult:
    """Train on the store's labelled training rows and evaluate on its held-out rows.

    ``exclude`` (store paths) leaves those rows out of training only: the held-out rows, and so the
    accuracy, stay comparable with a run without it.  ``relabel`` (path -> label) replaces labels in
    training and scoring alike.  Which rows are held out never depends on either.
    """
    from .fit import fit_head  # scikit-learn: only training needs it

    with EmbeddingStore.open(store_path) as store:
        if len(store) == 0:
            raise TlEmbedError(f"store {store_path} is empty")
        labels, splits, paths = store.labels, store.splits, store.paths
        tr, te, how = choose_split(labels, splits, test_size, seed)
        trained_on = {"store_uid": store.uid, "held_out_split": _held_split(how), "test_size": test_size,
                      "seed": seed, "train_rows": _rows_digest(paths[tr])}
        if exclude:
            left_out = np.isin(paths[tr], np.array(sorted(exclude), dtype=object))
            _check_known(exclude, paths, "--exclude")
            tr, trained_on["excluded"] = tr[~left_out], int(left_out.sum())
        if relabel:
            labels, trained_on["relabelled"] = _relabelled(labels, paths, relabel)
        X_tr, X_te = store.take(tr), store.take(te)  # only the labelled rows, chunk by chunk
        spec = store.spec
        backbone = read_files(store.path / FOLDER) if spec.model_sha256 else None  # the head carries it on
    if len(tr) == 0:
        raise TlEmbedError(f"store {store_path} has no labelled images (labels are sub-folder names)")
    fitted, info = fit_head(X_tr, labels[tr].astype(str), spec, head, class_weight, cv, seed,
                            transform=transform, hidden=hidden)
    unseen = sorted(set(labels[te].astype(str)) - set(fitted.classes))
    if unseen:
        raise TlEmbedError(f"held-out images have class(es) absent from training: {', '.join(unseen)}")
    metrics = evaluate_predictions(labels[te].astype(str), fitted.predict(X_te), fitted.classes)
    fitted.metrics = {"held_out": how, **metrics.to_dict(), **info, "n_train": int(len(tr)),
                      "trained_on": trained_on}
    fitted.backbone = backbone
    return TrainResult(fitted, metrics, how, int(len(tr)), info)


def _check_known(listed: Collection[str], paths: np.ndarray, option: str) -> None:
    """A list none of whose paths is in the store is a mistake (another store, absolute paths elsewhere)."""
    if not np.isin(np.array(sorted(listed), dtype=object), paths).any():
        example = next(iter(sorted(listed)))
        raise TlEmbedError(f"{option}: none of its {len(listed)} paths is in the store (e.g. {example!r}); paths "
                           "are relative to the store's image folder, as `tl-embed audit` writes them")


def _relabelled(labels: np.ndarray, paths: np.ndarray, relabel: Mapping[str, str]) -> tuple[np.ndarray, int]:
    """The store's labels with ``relabel``'s applied to its labelled rows, and how many changed."""
    _check_known(relabel, paths, "--relabel")
    out = labels.copy()
    changed = 0
    for row, path in enumerate(paths):
        new = relabel.get(path)
        if new is not None and out[row] is not None and out[row] != new:
            out[row] = new
            changed += 1
    return out, changed


def _held_split(how: str) -> str | None:
    """The store split a head was held out on ('test'/'val'), None for a stratified hold-out."""
    return next((s for s in ("test", "val") if how == f"the store's '{s}' split"), None)


def _rows_digest(paths: np.ndarray) -> str:
    """A fingerprint of which rows trained a head: enough to recognise them later, not to list them."""
    return hashlib.sha256("\n".join(sorted(map(str, paths))).encode()).hexdigest()


def store_features(head: Head, store_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, labels, paths) of a whole store, refusing one made by another backbone."""
    with EmbeddingStore.open(store_path) as store:
        check_compatible(head.spec, store.spec, "the model")
        return store.take(np.arange(len(store))), store.labels, [str(store.absolute_path(p)) for p in store.paths]


def trained_rows(head: Head, store: EmbeddingStore) -> np.ndarray | None:
    """Mask of the store rows ``head`` was trained on; all False for another store; None if unknown.

    A head records its store's uid and how it held rows out; the rows are found again the same way and
    checked against the recorded fingerprint, so a store changed since training is never guessed at.
    """
    trained = head.metrics.get("trained_on")
    if not isinstance(trained, dict):
        return None
    if trained.get("store_uid") != store.uid:
        return np.zeros(len(store), dtype=bool)
    labels, splits = store.labels, store.splits
    try:
        if trained.get("held_out_split"):
            tr = np.flatnonzero([lab is not None and s != trained["held_out_split"]
                                 for lab, s in zip(labels, splits, strict=True)])
        else:
            tr, _, _ = choose_split(labels, splits, float(trained["test_size"]), int(trained["seed"]))
    except (TlEmbedError, KeyError, TypeError, ValueError):
        return None
    if _rows_digest(store.paths[tr]) != trained.get("train_rows"):
        return None
    mask = np.zeros(len(store), dtype=bool)
    mask[tr] = True
    return mask


def _store_rows(head: Head, store_path: str | os.PathLike, split: str | None,
                relabel: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, labels, which rows) to score: by default the rows the head never saw, never its training rows."""
    with EmbeddingStore.open(store_path) as store:
        check_compatible(head.spec, store.spec, "the model")
        labels, splits = store.labels, store.splits
        if relabel:
            labels, _ = _relabelled(labels, store.paths, relabel)
        labelled = np.array([lab is not None for lab in labels], dtype=bool)
        seen = trained_rows(head, store)
        if split is not None:
            counts = {s: int((splits == s).sum()) for s in sorted({s for s in splits if s})}
            if split not in counts:
                have = ", ".join(f"{s} ({n} images)" for s, n in counts.items())
                raise TlEmbedError(f"store {store_path} has no split {split!r}; "
                                   + (f"its splits are {have}" if have else "it has no splits: leave out --split"))
            keep = labelled & (splits == split)
            what = f"the store's '{split}' split ({int(keep.sum())} labelled images)"
            if seen is not None and (seen & keep).any():
                what += (f"; {int((seen & keep).sum())} of them trained the head, so this is NOT a held-out "
                         "accuracy")
        elif seen is None:
            if isinstance(head.metrics.get("trained_on"), dict):
                raise TlEmbedError(f"store {store_path} has changed since the head was trained on it, so which of "
                                   "its rows the head saw is unknown: choose rows with --split NAME")
            keep = labelled
            what = (f"all {int(keep.sum())} labelled images (this model file does not record which rows trained "
                    "it; if they came from this store, the accuracy includes them)")
        elif seen.any():
            keep = labelled & ~seen
            what = f"the {int(keep.sum())} labelled images held out from training, {head.metrics.get('held_out')}"
        else:
            keep = labelled
            what = f"all {int(keep.sum())} labelled images (the head was trained on another store)"
        return store.take(np.flatnonzero(keep)), labels[keep], what


def evaluate_head(head: Head, target: str | os.PathLike, split: str | None = None,
                  runtime: str = "auto", relabel: Mapping[str, str] | None = None) -> tuple[Metrics, str]:
    """Metrics of ``head`` on a labelled store or a labelled image folder, and which rows were scored.

    On the store a head was trained on, the default is the rows it was held out on; rows it was trained
    on are scored only when asked for by ``split``, and then said so.
    """
    if is_store(target):
        X, labels, what = _store_rows(head, target, split, relabel)
    else:
        if split is not None or relabel:
            raise TlEmbedError(f"{'--split' if split is not None else '--relabel'} applies to a store; "
                               "an image folder is scored whole, with its folder labels")
        from ..embedding.scan import label_and_split

        emb = embed_for(head.spec, [target], runtime)
        root = Path(target)
        X = emb.vectors
        labels = np.array([label_and_split(p.relative_to(root).as_posix())[0] for p in emb.paths],
                          dtype=object)
        what = f"the labelled images in {target}"
    keep = np.array([lab is not None for lab in labels], dtype=bool)
    if not keep.any():
        raise TlEmbedError(f"{target} has no labelled images (labels are sub-folder names)")
    y = labels[keep].astype(str)
    unknown = sorted(set(y) - set(head.classes))
    if unknown:
        raise TlEmbedError(f"{target} has classes the model was not trained on: {', '.join(unknown)}")
    return evaluate_predictions(y, head.predict(X[keep]), head.classes), what
