"""An index's index-time vector options, whitening (``--whiten``, ``--whiten-dim``, ``--whiten-power``) and
αDBA (``--dba``): checked once, recorded in the index's meta, compared on update, described.

An update in place keeps the whitening fitted at the last build (new vectors go through it like
queries) until the store has grown to twice the rows it was fitted on; DBA changes every vector's
neighbourhood, so an index with DBA is rebuilt whenever its store changed.  An index written before
these options has neither in its meta and reads back as plain vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TlEmbedError
from .choose import Choice
from .expand import ALPHA
from .whiten import FIT_ROWS, POWER, SHRINKAGE, Whitening


@dataclass(frozen=True)
class VectorOptions:
    whiten: bool = False
    whiten_dim: int | None = None  # asked for; None: every component the store's vectors have
    whiten_power: float = POWER  # 0.5: full whitening, 0: centring and PCA projection only
    dba: int = 0  # neighbours merged into each stored vector; 0: off
    metric: str = field(default="cosine", compare=False)
    dims: tuple[int, int] | None = field(default=None, compare=False)  # a fitted whitening's (in, out)
    fitted_rows: int = field(default=0, compare=False)  # the rows a fitted whitening was fitted on

    @classmethod
    def given(cls, metric: str, whiten: bool, whiten_dim: int | None, whiten_power: float | None,
              dba: int) -> VectorOptions:
        """The options of ``tl-embed index``, checked; ``--whiten-dim`` and ``--whiten-power`` imply ``--whiten``."""
        whiten = whiten or whiten_dim is not None or whiten_power is not None
        if whiten_dim is not None and whiten_dim < 1:
            raise TlEmbedError(f"--whiten-dim must be at least 1, not {whiten_dim}")
        if whiten_power is not None and not 0 <= whiten_power <= 1:
            raise TlEmbedError(f"--whiten-power must be between 0 and 1, not {whiten_power}")
        if dba < 0:
            raise TlEmbedError(f"--dba must be 0 (off) or more, not {dba}")
        if metric != "cosine" and (whiten or dba):
            raise TlEmbedError(f"--whiten and --dba work on cosine similarities, not --metric {metric}: "
                               "leave out --metric (cosine is the default)")
        return cls(whiten, whiten_dim, POWER if whiten_power is None else float(whiten_power), dba, metric)

    @classmethod
    def from_meta(cls, meta: dict) -> VectorOptions:
        w = meta.get("whiten")
        dims = (int(w["dim_in"]), int(w["dim"])) if w else None
        return cls(bool(w), w.get("requested_dim") if w else None, float(w.get("power", POWER)) if w else POWER,
                   int(meta.get("dba", {}).get("n", 0)), meta.get("metric", "cosine"), dims,
                   int(w.get("fitted_rows", 0)) if w else 0)

    def dim(self, n: int, given: int) -> int:
        """The dimension the index will hold for ``n`` vectors of ``given`` (whitening keeps at most the
        sample's rank, N - 1, of its components)."""
        if not self.whiten:
            return given
        return max(1, min(self.whiten_dim or given, given, min(n, FIT_ROWS) - 1))

    def check(self, choice: Choice) -> None:
        """Refuse DBA where re-ranking would score with the store's own, unaugmented vectors."""
        if self.dba and choice.rerank:
            raise TlEmbedError(f"--dba cannot be combined with re-ranking ({choice.factory} re-ranks with the "
                               "store's own vectors, which DBA does not change): add --no-rerank, or choose "
                               "--type flat, ivf, sqfp16 or hnsw")

    def to_meta(self, whitening: Whitening | None, n: int) -> dict:
        meta: dict = {}
        if whitening is not None:
            meta["whiten"] = {"dim_in": int(whitening.mean.shape[0]), "dim": whitening.dim,
                              "requested_dim": self.whiten_dim, "power": self.whiten_power, "shrinkage": SHRINKAGE,
                              "fitted_rows": min(n, FIT_ROWS)}
        if self.dba:
            meta["dba"] = {"n": self.dba, "alpha": ALPHA}
        return meta

    def refit(self, n: int, changed: bool) -> str:
        """Why an index with these options must be rebuilt for its store, now of ``n`` rows ('' if not)."""
        if self.dba and changed:
            return f"its DBA ({self.dba} neighbours) depends on every stored vector, and the store changed"
        if self.whiten and self.fitted_rows < min(n, FIT_ROWS) / 2:
            return f"its whitening was fitted on {self.fitted_rows} vectors, the store now has {n}"
        return ""

    def describe(self) -> str:
        parts = []
        if self.whiten:
            dims = f" {self.dims[0]} -> {self.dims[1]} dims" if self.dims else (
                f" to {self.whiten_dim} dims" if self.whiten_dim else "")
            how = ("PCA-whitened" if self.whiten_power == POWER else "centred and PCA-projected"
                   if self.whiten_power == 0 else f"PCA-whitened (power {self.whiten_power:g})")
            parts.append(how + dims)
        if self.dba:
            parts.append(f"DBA with {self.dba} neighbours")
        return ", ".join(parts)
