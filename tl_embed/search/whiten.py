"""PCA-whitening learned on the collection itself: L2 -> centre -> PCA-whiten -> L2 (Jégou & Chum, ECCV 2012).

A cosine between raw CNN descriptors over-counts directions that vary together (co-occurring
activations, "bursts"), and lets the few high-variance directions dominate.  Jégou & Chum show that
whitening the descriptors with a PCA learned on the collection, then L2-normalising again, removes both
effects and improves retrieval without any training labels; keeping only the first components
("--whiten-dim") reduces the index at the same time.  Here the PCA is fitted on the store's own
(L2-normalised) vectors, kept in the index, and applied by the same :meth:`Whitening.apply` to every
vector added and every query, so stored and query vectors can never be mapped differently.

Each principal component is scaled by (eigenvalue + shrinkage x mean eigenvalue) ^ -power.  ``power``
0.5 is full whitening (Jégou & Chum); smaller powers whiten partially, and 0 keeps only the centring and
the PCA projection (a rotation, which changes no cosine, or a reduction with ``dim``).
Regularisation: the shrinkage (towards a multiple of the identity, as Ledoit & Wolf shrink a covariance)
keeps the smallest components, which a few hundred or thousand images estimate worst and which carry
mostly noise, from getting the largest weights; it caps their gain at about shrinkage ^ -power relative
to an average component.  Components beyond the sample's rank (N - 1 for N vectors) hold no variance
and are dropped.  On the photo sets of benchmarks/retrieval.py full whitening learned on the collection
itself loses mAP on every set (with fewer images than dimensions the whitened collection is nearly a
simplex: all images about equally far apart), while the centring alone gains on every set.

Nothing here depends on how the vectors were made: any descriptor a store holds goes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POWER = 0.5  # full whitening
SHRINKAGE = 0.1  # eigenvalue + SHRINKAGE x mean eigenvalue
FIT_ROWS = 50_000  # at most this many store rows (a random sample) fit the PCA: 1280 dims need far fewer
ARRAYS = ("whiten_mean", "whiten_projection")  # their names in the index file
# fewer rows than this are projected without BLAS: its threads gain nothing on a few queries, and on a busy
# machine they cost milliseconds per call waiting for each other (8 ms against 0.2 ms for one query on 2 cores)
BLAS_ROWS = 64


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: ``apply(x) = L2((x - mean) @ projection)`` for L2-normalised rows ``x``."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, d) float32: principal axes divided by sqrt(regularised eigenvalue)

    @property
    def dim(self) -> int:
        """The dimension of the whitened vectors (d <= D)."""
        return int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened, L2-normalised rows of the (already L2-normalised) rows ``x``; zero rows stay zero."""
        x = np.asarray(x, np.float32)
        centred = x - self.mean
        y = centred @ self.projection if len(x) >= BLAS_ROWS else np.einsum("ij,jk->ik", centred, self.projection)
        y = np.where(x.any(axis=1, keepdims=True), y, 0).astype(np.float32)
        return np.ascontiguousarray(y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(ARRAYS, (self.mean, self.projection), strict=True))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Whitening:
        mean, projection = (np.ascontiguousarray(arrays[name], np.float32) for name in ARRAYS)
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != len(mean):
            raise ValueError(f"whitening arrays of shapes {mean.shape} and {projection.shape} do not fit")
        return cls(mean, projection)


def fit(x: np.ndarray, dim: int | None = None, power: float = POWER, shrinkage: float = SHRINKAGE) -> Whitening:
    """The whitening of the rows ``x`` (L2-normalised vectors), keeping at most ``dim`` components."""
    x = np.asarray(x, np.float32)
    return from_moments(len(x), x.sum(0, dtype=np.float64), (x.T @ x).astype(np.float64), dim, power, shrinkage)


def from_moments(n: int, total: np.ndarray, gram: np.ndarray, dim: int | None, power: float = POWER,
                 shrinkage: float = SHRINKAGE) -> Whitening:
    """The whitening of ``n`` rows given their sum and X^T X (float64), so a sample can be streamed."""
    mean = total / max(n, 1)
    cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]  # largest first
    keep = max(1, min(dim or len(values), len(values), n - 1))
    floor = shrinkage * values.mean() if values.any() else 1.0
    scale = (values[:keep] + max(floor, 1e-12)) ** -power
    projection = vectors[:, :keep] * scale
    return Whitening(mean.astype(np.float32), np.ascontiguousarray(projection, np.float32))
