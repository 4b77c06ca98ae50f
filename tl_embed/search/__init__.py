"""Similarity search on stored embeddings: FAISS indexes, their retrieval scores, near-duplicates, contact sheets."""

from ..lazy import lazy_exports

_PUBLIC = {
    "Index": "tl_embed.search.index",
    "SearchHit": "tl_embed.search.index",
    "choose_factory": "tl_embed.search.index",
    "evaluate_search": "tl_embed.search.evaluate",
    "find_duplicates": "tl_embed.search.dedup",
    "prepare_vectors": "tl_embed.search.build",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
