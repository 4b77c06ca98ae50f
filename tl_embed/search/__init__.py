"""Similarity search on stored embeddings: FAISS indexes, near-duplicates, contact sheets."""

from ..lazy import lazy_exports

_PUBLIC = {
    "Index": "tl_embed.search.index",
    "SearchHit": "tl_embed.search.index",
    "choose_factory": "tl_embed.search.index",
    "find_duplicates": "tl_embed.search.dedup",
    "prepare_vectors": "tl_embed.search.build",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
