"""What the service answers from, loaded once at start: the index, its store's vectors, paths and labels.

The store is opened read-only and closed again after loading: its vectors stay memory-mapped, and no
SQLite connection is shared between request threads.  Image files are reached only through the ids
the store holds, resolved inside its image root, so no request can name an arbitrary file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..embedding.backbones import check_compatible
from ..embedding.images import IMAGE_SUFFIXES, PIL_FORMATS, to_rgb
from ..embedding.store import EmbeddingStore
from ..errors import TlEmbedError
from ..search.index import Index, load_faiss

MAX_K = 100  # neighbours one query may ask for
MAX_QE = MAX_K  # results one query may be expanded with (/search's qe)
FETCH = MAX_K + 1  # one more: a stored image's query drops itself
THUMBNAIL_MAX = 1024
THUMBNAIL_PIXELS = 100_000_000  # a stored file this large is not thumbnailed on request


class NotFound(LookupError):
    """An id, path or label the store does not hold."""


@dataclass(frozen=True)
class Neighbour:
    id: int
    path: str  # relative to the store's image root
    label: str | None
    score: float


class Catalog:
    """The index plus, per indexed id, the stored vector, the image's relative path and its label."""

    def __init__(self, index_path: str | os.PathLike):
        self.index = Index.open(index_path)
        self.metric: str = self.index.meta["metric"]
        store_path = self.index.meta["store"]
        try:
            store = EmbeddingStore.open(store_path, "r")
        except TlEmbedError as e:
            raise TlEmbedError(f"index {index_path} was built from {store_path}, which cannot be opened: {e}") from None
        with store:
            check_compatible(self.index.spec, store.spec, f"index {index_path}")
            indexed = np.isin(store.ids, self.index.ids)
            self.ids = store.ids[indexed].copy()
            rows = [r for r, keep in zip(store.rows, indexed, strict=True) if keep]
            self.vectors = np.asarray(store.embeddings)[indexed]  # one copy of the indexed rows
            self.root = store.root
            self.store_path = Path(store_path)
        self.position = {int(i): n for n, i in enumerate(self.ids)}
        self.paths = [r.path for r in rows]
        self.labels = [r.label for r in rows]
        self.by_path = {p: int(i) for p, i in zip(self.paths, self.ids, strict=True)}
        self.by_path.update({str(self.absolute(p)): int(i) for p, i in zip(self.paths, self.ids, strict=True)})
        rows_of: dict[str, list[int]] = {}
        for n, label in enumerate(self.labels):
            if label is not None:
                rows_of.setdefault(label, []).append(n)
        self.label_rows = {label: np.array(rows, np.int64) for label, rows in sorted(rows_of.items())}
        self.label_counts = {label: len(rows) for label, rows in self.label_rows.items()}
        self.thumbnail = lru_cache(maxsize=512)(self._thumbnail)  # ~15 KB each at the page's 256 px
        self._blas_threshold = load_faiss().cvar.distance_compute_blas_threshold

    def __len__(self) -> int:
        return len(self.ids)

    # -------------------------------------------------------------- lookups
    def id_for(self, ident: int | None = None, path: str | None = None) -> int:
        if ident is not None:
            if int(ident) not in self.position:
                raise NotFound(f"no stored image has id {ident}")
            return int(ident)
        found = self.by_path.get(str(path))
        if found is None:
            raise NotFound(f"no stored image has path {path!r}")
        return found

    def vector(self, ident: int) -> np.ndarray:
        return np.asarray(self.vectors[self.position[ident]], np.float32)

    def describe(self, ident: int) -> dict:
        n = self.position[ident]
        return {"id": ident, "path": self.paths[n], "label": self.labels[n]}

    # --------------------------------------------------------------- search
    def search_batch(self, queries: np.ndarray) -> list[list[tuple[int, float]]]:
        """The FETCH nearest (id, score) of each query vector, from one index call for the whole batch.

        Exact (Flat) search of one query streams every stored vector from memory; a batch shares that
        pass through a matrix product (FAISS's BLAS path), which is what makes concurrent requests cheap.
        FAISS picks that path by a global threshold, so this runs in one thread only (the service's
        search batcher) and sets it for the call.  That thread searches without OpenMP's threads: the
        parallelism is the requests', the cores belong to the runtime's streams, and OpenMP's threads
        spin between the many small searches, stealing those cores (benchmarks/serve_latency.py measures
        the upload throughput under 16 clients against `embed`'s).
        """
        faiss = load_faiss()
        faiss.omp_set_num_threads(1)  # for this thread only (an OpenMP setting is per thread)
        faiss.cvar.distance_compute_blas_threshold = 1 if len(queries) > 1 else self._blas_threshold
        try:
            scores, ids = self.index.search_scored(queries, FETCH)
        finally:
            faiss.cvar.distance_compute_blas_threshold = self._blas_threshold
        return [[(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
                for srow, irow in zip(scores, ids, strict=True)]

    def expanded(self, vector: np.ndarray, qe: int, exclude: int | None) -> list[tuple[int, float]]:
        """The FETCH nearest (id, score) of one query expanded with its top ``qe`` results other than
        ``exclude`` (αQE): two index searches, in the caller's thread rather than the search batcher's."""
        scores, ids = self.index.search_scored(vector[None, :], FETCH, qe, [exclude])
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def labelled(self, vector: np.ndarray, label: str, fetch: int, qe: int = 0,
                 exclude: int | None = None) -> list[tuple[int, float]]:
        """The ``fetch`` nearest images labelled ``label``, compared exactly in the index's space (whitened,
        DBA-augmented vectors where the index has them); with ``qe``, the query is first expanded with its
        top results among all images.

        A label's subset is small enough for exact search, and an index cannot filter cheaply.
        """
        if label not in self.label_rows:
            raise NotFound(f"no stored image is labelled {label!r}")
        rows = self.label_rows[label]
        q = self.index.queries(vector[None, :], qe, [exclude])[0]
        x = self.index.vectors_of(self.ids[rows])
        if self.metric == "cosine":
            scores = x @ q
            order = np.argsort(-scores)[:fetch]
        else:
            scores = ((x - q) ** 2).sum(1)
            order = np.argsort(scores)[:fetch]
        return [(int(self.ids[rows[o]]), float(scores[o])) for o in order]

    def neighbours(self, found: list[tuple[int, float]], k: int) -> list[Neighbour]:
        """The first ``k`` of ``found`` (best first) that this catalog holds, as neighbours."""
        kept = [(i, s) for i, s in found if i in self.position][:k]
        return [Neighbour(i, self.paths[self.position[i]], self.labels[self.position[i]], s) for i, s in kept]

    # --------------------------------------------------------------- images
    def absolute(self, rel: str) -> Path:
        return self.root / rel if self.root else Path(rel)

    def image_file(self, ident: int) -> Path:
        """The stored image's file, refusing any manifest path that would lead outside the image root."""
        rel = self.paths[self.position[self.id_for(ident)]]
        path = Path(os.path.normpath(self.absolute(rel)))
        if self.root is not None and self.root != path and self.root not in path.parents:
            raise NotFound(f"image {ident} lies outside the store's image root")
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise NotFound(f"the file of image {ident} is gone from {path.parent}")
        return path

    def _thumbnail(self, ident: int, size: int) -> bytes:
        """A JPEG at most ``size`` px on its longer side (cached: the page asks for the same ones often)."""
        path = self.image_file(ident)
        try:
            with Image.open(path, formats=PIL_FORMATS) as im:
                if im.width * im.height > THUMBNAIL_PIXELS:
                    raise NotFound(f"image {ident} is too large to thumbnail ({im.width}x{im.height})")
                im.draft("RGB", (size, size))
                thumb = to_rgb(ImageOps.exif_transpose(im))
                thumb.thumbnail((size, size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise NotFound(f"the file of image {ident} cannot be decoded any more") from None
        buf = io.BytesIO()
        thumb.save(buf, "JPEG", quality=82)
        return buf.getvalue()
