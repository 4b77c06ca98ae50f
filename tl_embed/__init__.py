"""tl_embed: transfer learning without a GPU.

A frozen ImageNet backbone embeds images once into an on-disk store; scikit-learn heads and FAISS
indexes then classify and search those embeddings in seconds.  Heavy modules (TensorFlow, FAISS,
scikit-learn) are imported lazily so ``import tl_embed`` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "EmbeddingStore": "tl_embed.store",
    "TlEmbedError": "tl_embed.errors",
    "KerasImageEmbedder": "tl_embed.sklearn_embedder",
    "Head": "tl_embed.heads",
    "Index": "tl_embed.index",
    "BACKBONES": "tl_embed.backbones",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tl_embed' has no attribute {name!r}")
