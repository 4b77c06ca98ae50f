"""FAISS index quality and speed at 10k, 100k and 1M vectors (dimension 1280), side by side.

For each N: every index type `tl-embed index --type auto` may choose (Flat, IVF, IVF-PQ) plus HNSW,
next to plain IndexFlatIP, on clustered synthetic data. Prints build time, memory,
QPS over 1 000 queries (k=10, all cores), single-query latency and recall@10 against exact search
for queries not in the index.

    python benchmarks/index_search.py [--sizes 10000 100000 1000000] [--types ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 1280


def clustered(n: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = centers[rng.integers(0, clusters, m)] + rng.normal(0, 0.6, (m, DIM)).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--types", nargs="+", default=["auto", "ivf", "hnsw", "ivfpq"])
    args = ap.parse_args()
    import faiss

    from tl_embed.embedding.backbones import BackboneSpec
    from tl_embed.embedding.store import EmbeddingStore, ManifestRow
    from tl_embed.search.index import Index, prepare_vectors

    for n in args.sizes:
        data = prepare_vectors(clustered(n + 1000), "cosine")
        x, q = data[:n], data[n:]
        print(f"\n== N = {n:,} x {DIM} ({os.cpu_count()} cores), 1 000 held-out queries, k = 10 ==")
        flat = faiss.IndexFlatIP(DIM)
        t = time.perf_counter()
        flat.add(x)
        build = time.perf_counter() - t
        t = time.perf_counter()
        truth = flat.search(q, 10)[1]
        flat_qps = len(q) / (time.perf_counter() - t)
        t1 = [time.perf_counter(), flat.search(q[:1], 10), time.perf_counter()]
        print(f"{'plain IndexFlatIP':<28} build {build:6.1f} s  mem {x.nbytes / 1e9:6.2f} GB  "
              f"QPS {flat_qps:9.0f}  single {1000 * (t1[2] - t1[0]):7.2f} ms  recall@10 1.000")
        with tempfile.TemporaryDirectory() as tmp:
            spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", DIM)
            store = Path(tmp) / "s.tle"
            with EmbeddingStore.create(store, spec) as s:
                for start in range(0, n, 50_000):
                    stop = min(n, start + 50_000)
                    s.add([ManifestRow(f"{i}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(start, stop)],
                          x[start:stop])
                s.compact()
            with EmbeddingStore.open(store) as s:
                row_ids = s.ids.copy()
            for kind in args.types:
                t = time.perf_counter()
                idx = Index.build(store, Path(tmp) / f"{kind}.tli", kind, log=lambda *_: None)
                build = time.perf_counter() - t
                t = time.perf_counter()
                found = idx.faiss_index.search(q, 10)[1]
                qps = len(q) / (time.perf_counter() - t)
                truth_ids = row_ids[truth]
                recall = np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth_ids, strict=True)])
                m = idx.meta
                params = ",".join(f"{k}={v}" for k, v in m["search_params"].items())
                print(f"{kind + ' ' + m['factory'] + ' ' + params:<28} build {build:6.1f} s  "
                      f"mem {m['memory_bytes'] / 1e9:6.2f} GB  QPS {qps:9.0f}  single {m['latency_ms']:7.2f} ms  "
                      f"recall@10 {recall:.3f} (printed {m['recall_at_10']:.3f})  {qps / flat_qps:6.1f}x exact QPS")


if __name__ == "__main__":
    main()
