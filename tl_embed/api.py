"""The library's verbs for Python: what ``train``, ``evaluate``, ``export-model`` and ``index`` do, as functions.

Each runs the same code as the command of the same name and takes the same options by the same names,
so a script and a shell session make the same files.  ``embed_folder`` and ``find_duplicates`` need no
wrapper: they are the embedding and search stages' own functions, exported as they are.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

from .heads.head import DEFAULT_HEAD, Head
from .heads.metrics import Metrics
from .search.index import TARGET_RECALL

Pathish = str | os.PathLike


def train(store: Pathish, out: Pathish | None = None, head: str = DEFAULT_HEAD, class_weight: str | None = None,
          test_size: float = 0.2, seed: int = 0, cv: int = 3, transform: str = "auto", hidden: int = 0,
          exclude: Collection[str] = (), relabel: Mapping[str, str] | None = None) -> Head:
    """Train a head on a store's labelled rows, scored on the rows it did not see (``tl-embed train``).

    The store's ``test`` (else ``val``) split is held out, or a stratified ``test_size`` share.  The
    held-out scores are in ``head.metrics`` (``accuracy``, ``macro_f1``, ``per_class``, ...).  With
    ``out``, the head is also saved there as a model file (``.tlh``).  ``exclude`` (store paths, e.g.
    an audit's findings) leaves rows out of training only; ``relabel`` (path -> label) replaces labels.
    """
    from .heads.training import train_from_store

    fitted = train_from_store(store, head, class_weight, test_size, seed, cv, transform, hidden, exclude,
                              relabel).head
    if out is not None:
        fitted.save(out)
    return fitted


def evaluate(head: Head | Pathish, target: Pathish, split: str | None = None, runtime: str = "auto",
             relabel: Mapping[str, str] | None = None) -> Metrics:
    """Score a head on a labelled store or image folder (``tl-embed evaluate``).

    On the store it was trained on, only the rows it was held out on are scored unless ``split`` names
    other rows.
    """
    from .heads.training import evaluate_head

    return evaluate_head(_head(head), target, split, runtime, relabel)[0]


def export_model(head: Head | Pathish, fmt: str, out: Pathish, precision: str = "auto"):
    """Write a head and its backbone as one model in ``fmt`` into the folder ``out`` (``tl-embed export-model``).

    Formats: keras, savedmodel, tflite, onnx, openvino.  ``precision``: ``auto`` (the head's own: a head
    trained on int8 embeddings exports its quantized backbone, openvino only), ``fp32`` or ``int8``.
    Returns what was written (folder, size, seconds, precision).
    """
    from .heads.export import export_model as write_export

    return write_export(_head(head), fmt, out, precision)


def build_index(store: Pathish, out: Pathish, kind: str = "auto", metric: str = "cosine",
                max_memory: float | None = None, target_recall: float = TARGET_RECALL,
                rerank: bool | None = None, quiet: bool = False, whiten: bool = False,
                whiten_dim: int | None = None, whiten_power: float | None = None, dba: int = 0):
    """Build or update the FAISS index of a store at ``out`` (``tl-embed index``), and return it open.

    ``kind`` is ``index --type`` (auto chooses by size and ``max_memory`` bytes); its recall is measured on
    held-out rows and printed unless ``quiet``.  ``whiten``/``whiten_dim``/``whiten_power`` and ``dba``
    are ``--whiten``, ``--whiten-dim``, ``--whiten-power`` and ``--dba``; search with query expansion
    through ``index.search(..., qe=N)`` and score it with ``tl_embed.search.evaluate_search``.
    """
    from .search.index import Index

    return Index.build(store, out, kind, metric, max_memory, target_recall,
                       log=(lambda *_: None) if quiet else print, rerank=rerank, whiten=whiten,
                       whiten_dim=whiten_dim, whiten_power=whiten_power, dba=dba)


def _head(head: Head | Pathish) -> Head:
    return head if isinstance(head, Head) else Head.load(Path(head))
