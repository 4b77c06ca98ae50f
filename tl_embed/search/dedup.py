"""Near-duplicate groups in a store: vectors within a cosine threshold, joined into connected groups."""

from __future__ import annotations

import os

import numpy as np

from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .index import load_faiss, prepare_vectors


def find_duplicates(store_path: str | os.PathLike, threshold: float = 0.95,
                    batch: int = 4096) -> list[list[tuple[str, float]]]:
    """Groups of near-duplicate images (cosine >= threshold), largest first.

    Exact range search on L2-normalised vectors, batched; groups are connected components.
    Each member carries its highest similarity to another member.
    """
    faiss = load_faiss()
    if not 0 < threshold <= 1:
        raise TlEmbedError("--threshold is a cosine similarity in (0, 1]")
    with EmbeddingStore.open(store_path) as store:
        x = prepare_vectors(store.embeddings, "cosine")
        paths = [str(store.absolute_path(p)) for p in store.paths]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    parent = np.arange(len(x))
    best = np.zeros(len(x), np.float32)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(x), batch):
        lims, sims, nbrs = index.range_search(x[start:start + batch], threshold - 1e-6)
        for qi in range(len(lims) - 1):
            i = start + qi
            for s, j in zip(sims[lims[qi]:lims[qi + 1]], nbrs[lims[qi]:lims[qi + 1]], strict=True):
                if j != i:
                    parent[find(i)] = find(int(j))
                    best[i] = max(best[i], s)
    groups: dict[int, list[int]] = {}
    for i in range(len(x)):
        groups.setdefault(find(i), []).append(i)
    multi = [g for g in groups.values() if len(g) > 1]
    multi.sort(key=lambda g: (-len(g), paths[g[0]]))
    return [[(paths[i], float(best[i])) for i in g] for g in multi]
