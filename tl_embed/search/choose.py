"""Which FAISS index to build: by vector count and a memory budget, among types that keep recall.

The ladder for ``--type auto`` (dimension d, N vectors, bytes per vector in brackets):

1. ``Flat`` (4d) while exact search is fast (N <= FLAT_MAX) and fits the budget;
2. ``IVF{nlist},Flat`` (4d + 8) beyond;
3. ``IVF{nlist},SQfp16`` (2d + 8): half the memory, answers indistinguishable from Flat;
4. ``IVF{nlist},SQ8`` (d + 8) with re-ranking: 8-bit codes pick a shortlist, whose full-precision
   vectors are read from the store's memory-mapped shards to order it exactly, so recall stays that
   of IVF-Flat at a quarter of the RAM;
5. ``IVF{nlist},PQ{m}`` (m + 8) with re-ranking, m = d/4 down to d/32: 4-dimensional sub-vectors
   keep a shortlist good enough for re-ranking to repair (PQ with d/16 sub-vectors and no
   re-ranking scores too roughly: most of the true top 10 of 1280-d vectors are lost).

Without ``--max-memory`` the budget is DEFAULT_MAX_MEMORY, so at a million 1280-d vectors auto
keeps the index near 1.3 GB (SQ8) instead of the 5 GB of raw vectors the store already holds on disk.
HNSW is never chosen by auto (its graph costs memory and minutes of build per 100k vectors on few
cores); ask for it with ``--type hnsw`` for the lowest latency.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import TlEmbedError

# an index stays exact (Flat) up to this many vectors: a query reads all N x d floats, which is still
# about 10 ms per query at this size (benchmarks/index_search.py); beyond it an approximate index pays off
FLAT_MAX = 20_000
DEFAULT_MAX_MEMORY = 2e9
POINTS_PER_LIST = 39  # FAISS wants >= 39 training points per IVF list
TYPES = ("auto", "flat", "ivf", "sqfp16", "sq8", "pq", "opq", "hnsw", "ivfpq")
LOSSY = re.compile(r"SQ[468]|(?<!O)PQ\d|RQ\d|LSQ\d")  # codes that re-ranking repairs


@dataclass(frozen=True)
class Choice:
    """A factory string and whether its shortlist is re-ranked against the store's vectors."""

    factory: str
    rerank: bool


def nlist_for(n: int) -> int:
    """IVF lists: a power of two near 2 sqrt(N), with enough training points per list."""
    nlist = int(2 ** round(math.log2(max(16, min(65536, 2 * math.sqrt(max(n, 1)))))))
    return max(1, min(nlist, n // POINTS_PER_LIST or 1))


def pq_sizes(dim: int) -> list[int]:
    """PQ sub-quantizer counts worth trying, largest (most accurate) first: d/4 down to d/32."""
    return [m for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m and dim % m == 0]


def named(kind: str, n: int, dim: int) -> str:
    """The factory string of a named type, sized for ``n`` vectors."""
    nlist = nlist_for(n)
    m = (pq_sizes(dim) or [1])[0]
    return {"flat": "Flat", "ivf": f"IVF{nlist},Flat", "sqfp16": f"IVF{nlist},SQfp16",
            "sq8": f"IVF{nlist},SQ8", "pq": f"IVF{nlist},PQ{m}", "ivfpq": f"IVF{nlist},PQ{m}",
            "opq": f"OPQ{m},IVF{nlist},PQ{m}", "hnsw": "HNSW32,Flat"}[kind]


def memory_of(factory: str, n: int, dim: int) -> float:
    """Bytes the index takes in RAM (codes, ids, centroids, codebooks), estimated from its string."""
    nlist = int(m[1]) if (m := re.search(r"IVF(\d+)", factory)) else 0
    per = {"Flat": 4 * dim, "SQfp16": 2 * dim, "SQ8": dim}
    code = next((v for k, v in per.items() if factory.endswith(k)), 4 * dim)
    pq = re.search(r"PQ(\d+)$", factory)
    if pq:
        code = int(pq[1])
    return n * (code + 8) + nlist * dim * 4 + (256 * dim * 4 if pq else 0) + 16 * n  # + id table


def choose(n: int, dim: int, kind: str = "auto", max_memory: float | None = None,
           rerank: bool | None = None) -> Choice:
    """The index to build for ``n`` vectors of ``dim``; anything not in TYPES is a factory string.

    ``rerank`` None means: re-rank when the codes are lossy (SQ8/SQ4/PQ/...), never for Flat,
    SQfp16 or HNSW.
    """
    if kind == "auto":
        factory = _auto(n, dim, max_memory)
    else:
        factory = named(kind, n, dim) if kind in TYPES else kind
    return Choice(factory, bool(LOSSY.search(factory)) if rerank is None else rerank)


def _auto(n: int, dim: int, max_memory: float | None) -> str:
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if n <= FLAT_MAX and memory_of("Flat", n, dim) <= budget:
        return "Flat"
    nlist = nlist_for(n)
    ladder = [f"IVF{nlist},Flat", f"IVF{nlist},SQfp16", f"IVF{nlist},SQ8"]
    if n >= 256:  # PQ trains 256 centroids per sub-quantizer
        ladder += [f"IVF{nlist},PQ{m}" for m in pq_sizes(dim)]
    for factory in ladder:
        if memory_of(factory, n, dim) <= budget:
            return factory
    smallest = min(ladder, key=lambda f: memory_of(f, n, dim))
    need = human_size(memory_of(smallest, n, dim))
    raise TlEmbedError(f"--max-memory {human_size(budget)} is too small for {n} vectors of dimension "
                       f"{dim}: the smallest index ({smallest}) takes about {need}; use --max-memory {need} or more")


def human_size(nbytes: float) -> str:
    """Bytes as --max-memory takes them (500MB, 2GB), rounded up so the figure is enough."""
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= mult:
            return f"{math.ceil(nbytes / mult * 10) / 10:g}{unit}"
    return f"{math.ceil(nbytes)}B"


def training_points(factory: str) -> int:
    """How many vectors training needs: 39 per IVF list, 2^bits per PQ code book (0 if none)."""
    needs = [0]
    for m in re.finditer(r"IVF(\d+)", factory):
        if int(m[1]) > 1:
            needs.append(int(m[1]) * POINTS_PER_LIST)
    for m in re.finditer(r"(?:O?PQ|RQ)(\d+)(?:x(\d+))?", factory):
        needs.append(2 ** int(m[2] or 8))
    return max(needs)


def check_trainable(factory: str, n: int) -> None:
    """Refuse before FAISS training would crash (or cluster a handful of points): say what fits."""
    needs = []
    for m in re.finditer(r"IVF(\d+)", factory):
        nlist = int(m[1])
        if nlist > 1:
            needs.append((nlist * POINTS_PER_LIST, f"{m[0]} needs at least {nlist}*{POINTS_PER_LIST}"))
    for m in re.finditer(r"(?:O?PQ|RQ)(\d+)(?:x(\d+))?", factory):
        bits = int(m[2] or 8)
        needs.append((2 ** bits, f"{m[0]} needs at least 2^{bits} = {2 ** bits}"))
    unmet = [why for need, why in sorted(needs, reverse=True) if n < need]
    if unmet:
        raise TlEmbedError(f"{unmet[0]} training vectors; this store has {n}: "
                           "use --type ivf (auto-sized) or flat")


def advice(factory: str, rerank: bool) -> str:
    """What to change when no search setting reaches the target recall."""
    if "HNSW" in factory:
        return "use more links (--type HNSW64,Flat) or --type ivf"
    if LOSSY.search(factory) and not rerank:
        return "drop --no-rerank, or use a less compressed type (--type sq8 or ivf)"
    if LOSSY.search(factory):
        return "use a larger --max-memory (less compressed codes: --type sq8 or sqfp16)"
    return "lower --target-recall, or use --type flat (exact)"
