"""Classifier heads on stored embeddings: fit, evaluate, report, model files."""

from ..lazy import lazy_exports

_PUBLIC = {
    "Head": "tl_embed.heads.head",
    "HEADS": "tl_embed.heads.head",
    "DEFAULT_HEAD": "tl_embed.heads.head",
    "HeadClassifier": "tl_embed.heads.estimator",
    "Metrics": "tl_embed.heads.metrics",
    "fit_head": "tl_embed.heads.fit",
    "train_from_store": "tl_embed.heads.training",
    "evaluate_head": "tl_embed.heads.training",
    "export_model": "tl_embed.heads.export",
    "load_export": "tl_embed.heads.exported",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
