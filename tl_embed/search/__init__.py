"""Similarity search on stored embeddings: FAISS indexes, near-duplicates, contact sheets."""
