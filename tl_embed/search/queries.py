"""Queries given by path: images the index's store already holds reuse their stored vector, others are embedded.

A stored image is found by its path (relative to the store's image root, or absolute) in the index's id
table, and its vector read from the store, so querying a collection by its own images costs no
inference; every other file is embedded with the index's recorded backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..embedding.backbones import BackboneSpec
from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from .storage import IdTable, lookup


def query_vectors(table: IdTable, meta: dict, spec: BackboneSpec, queries: list[str], runtime: str,
                  exclude_self: bool) -> tuple[list[str], list[int | None], np.ndarray]:
    """(query names, own store id per query or None, vectors) of image paths, for the index with id table
    ``table`` and ``meta`` made with backbone ``spec``; unreadable files are left out.

    ``own`` names a stored image's id only with ``exclude_self`` (so that it is not its own neighbour).
    """
    stored, to_embed = stored_vectors(table, meta, queries)
    labels = list(stored)
    own: list[int | None] = [stored[q][0] if exclude_self else None for q in labels]
    vectors = [stored[q][1] for q in labels]
    failed: list = []
    if to_embed:
        from ..embedding.query import embed_for

        emb = embed_for(spec, to_embed, runtime)
        labels += [str(p) for p in emb.paths]
        own += [None] * len(emb.paths)
        vectors += list(emb.vectors)
        failed = emb.failed
    if not vectors:
        why = "; ".join(f"{p}: {reason}" for p, reason in failed[:3]) or "no image files among them"
        raise TlEmbedError(f"no readable query images ({why}{'; ...' if len(failed) > 3 else ''}); "
                           "give image files (JPEG, PNG, WebP, ...) or folders of them")
    return labels, own, np.stack(vectors)


def stored_vectors(table: IdTable, meta: dict,
                   queries: list[str]) -> tuple[dict[str, tuple[int, np.ndarray]], list[str]]:
    """Split queries into images the store already holds (their id and reused vector) and files to embed."""
    root = Path(meta["root"]) if meta["root"] else None
    found = {}
    for q in queries:
        if Path(q).is_dir():
            continue
        full = Path(q).expanduser().resolve()
        names = [str(full), q]
        if root is not None and full.is_relative_to(root):
            names.insert(0, full.relative_to(root).as_posix())
        ident = next((i for name in names if (i := table.id_of(name)) is not None), None)
        if ident is not None:
            found[q] = ident
    rest = [q for q in queries if q not in found]
    if not found:
        return {}, rest
    with EmbeddingStore.open(meta["store"]) as store:
        ids = store.ids
        pos = lookup(ids, np.argsort(ids, kind="stable"), np.fromiter(found.values(), np.int64))
        vectors = store.take(pos[pos >= 0])
    held = [q for q, p in zip(found, pos, strict=True) if p >= 0]
    return ({q: (found[q], v) for q, v in zip(held, vectors, strict=True)},
            rest + [q for q, p in zip(found, pos, strict=True) if p < 0])
