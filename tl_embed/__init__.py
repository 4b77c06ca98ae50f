"""tl_embed: transfer learning without a GPU.

A frozen ImageNet backbone embeds images once into an on-disk store; scikit-learn heads and FAISS
indexes then classify and search those embeddings in seconds.  Heavy modules (TensorFlow, FAISS,
scikit-learn) are imported lazily so ``import tl_embed`` stays fast.

Packages follow the flow of data: :mod:`.embedding` (images -> store), :mod:`.heads` and
:mod:`.search` (store -> classifiers, indexes), :mod:`.serve` (the web service), :mod:`.cli` (the
``tl-embed`` command).  The names below are the public API (docs/python-api.md): the verbs, which do
what the commands of the same names do, and the objects they return.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    # verbs
    "embed_folder": "tl_embed.embedding.embed",
    "train": "tl_embed.api",
    "evaluate": "tl_embed.api",
    "export_model": "tl_embed.api",
    "build_index": "tl_embed.api",
    "find_duplicates": "tl_embed.search.dedup",
    "audit_store": "tl_embed.audit.run",
    # what they make and read
    "EmbeddingStore": "tl_embed.embedding.store",
    "EmbedReport": "tl_embed.embedding.sink",
    "Head": "tl_embed.heads.head",
    "HeadClassifier": "tl_embed.heads.estimator",
    "KerasImageEmbedder": "tl_embed.embedding.sklearn_embedder",
    "Index": "tl_embed.search.index",
    "SearchHit": "tl_embed.search.index",
    "Metrics": "tl_embed.heads.metrics",
    "Audit": "tl_embed.audit.findings",
    "BACKBONES": "tl_embed.embedding.backbones",
    "TlEmbedError": "tl_embed.errors",
}

__all__ = ["__version__", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
