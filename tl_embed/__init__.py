"""tl_embed: transfer learning without a GPU.

A frozen ImageNet backbone embeds images once into an on-disk store; scikit-learn heads and FAISS
indexes then classify and search those embeddings in seconds.  Heavy modules (TensorFlow, FAISS,
scikit-learn) are imported lazily so ``import tl_embed`` stays fast.

Packages follow the flow of data: :mod:`.embedding` (images -> store), :mod:`.heads` and
:mod:`.search` (store -> classifiers, indexes), :mod:`.cli` (the ``tl-embed`` command).
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "EmbeddingStore": "tl_embed.embedding.store",
    "TlEmbedError": "tl_embed.errors",
    "KerasImageEmbedder": "tl_embed.embedding.sklearn_embedder",
    "Head": "tl_embed.heads.head",
    "Index": "tl_embed.search.index",
    "BACKBONES": "tl_embed.embedding.backbones",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tl_embed' has no attribute {name!r}")
