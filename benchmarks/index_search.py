"""FAISS index quality, speed and memory at 10k / 100k / 1M 1280-d vectors, next to exact IndexFlatIP.

    python benchmarks/index_search.py --sizes 10000 100000 [--types auto hnsw ...]
    python benchmarks/index_search.py --sizes 1000000 --types auto auto:500MB ivf   # 5.1 GB store in /tmp

Data (synthetic, CNN-like): 1 280-d non-negative vectors like ReLU-pooled backbone features.  Each
vector is relu(W (c_class + 0.6 c_sub + 0.9 z) + 0.35 e - 0.25) with a 64-d latent: 1 000 classes,
4 sub-modes per class, an item latent z and per-dimension noise e, W a fixed random 64 x 1280 mixing
with per-feature scales; about 57% of entries are zero.  The store is written as a real store
(shards + manifest, like benchmarks/embed_scale.py), so builds stream and re-ranking reads the
memory-mapped shards.  1 000 held-out queries are drawn from the same distribution but not stored.

Each type is built by `Index.build` in a fresh child process, which prints its build time, peak RSS
(VmHWM, and the peak of anonymous memory, i.e. without the store's page cache) and the index's
memory, then searches the 1 000 queries: batch QPS, median single-query latency (100 queries one at
a time) and recall@10 against exact search, next to the recall the build printed.  The exact
baseline (plain IndexFlatIP over all vectors in RAM) runs in its own child first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_cpu  # noqa: E402

DIM, LATENT, CLASSES, SUBS = 1280, 64, 1000, 4
CHUNK = 65_536


def generator():
    rng = np.random.default_rng(12345)
    w = rng.normal(0, 1 / np.sqrt(LATENT), (LATENT, DIM)).astype(np.float32)
    w *= rng.lognormal(0, 0.5, DIM).astype(np.float32)
    classes = rng.normal(0, 1, (CLASSES, LATENT)).astype(np.float32)
    subs = rng.normal(0, 1, (CLASSES, SUBS, LATENT)).astype(np.float32)
    return w, classes, subs


def vectors(n: int, seed: int) -> np.ndarray:
    w, classes, subs = generator()
    rng = np.random.default_rng(seed)
    c = rng.integers(0, CLASSES, n)
    latent = classes[c] + 0.6 * subs[c, rng.integers(0, SUBS, n)] + 0.9 * rng.standard_normal((n, LATENT), np.float32)
    x = latent @ w + 0.35 * rng.standard_normal((n, DIM), np.float32) - 0.25
    return np.maximum(x, 0, out=x)


def write_store(path: Path, n: int) -> None:
    from tl_embed.embedding import BackboneSpec, EmbeddingStore, ManifestRow

    spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", DIM)
    with EmbeddingStore.create(path, spec, root=path.parent) as s:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            s.add([ManifestRow(f"img/{i:08d}.jpg", f"c{i % 10}", None, f"{i:064x}", 1, 1, 1, 1)
                   for i in range(start, start + k)], vectors(k, seed=start + 1))
        s.consolidate()


class Peak:
    """Peak anonymous RSS, sampled every 20 ms (VmHWM also counts the store's mapped page cache)."""

    def __init__(self):
        self.anon, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_mb("RssAnon:"))
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.anon


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(field)) / 1024


def timed_search(search, q: np.ndarray, singles: int = 100) -> tuple[np.ndarray, float, float]:
    """(ids of a batch search of q, batch QPS, median single-query ms)."""
    t = time.perf_counter()
    found = search(q)
    qps = len(q) / (time.perf_counter() - t)
    times = []
    for row in q[:singles]:
        t = time.perf_counter()
        search(row[None, :])
        times.append(time.perf_counter() - t)
    return found, qps, 1000 * float(np.median(times))


def child_exact(tmp: Path) -> dict:
    """Plain IndexFlatIP over all stored vectors (normalised) in RAM: truth, QPS, latency."""
    import faiss

    from tl_embed import EmbeddingStore
    from tl_embed.search import prepare_vectors

    peak = Peak()
    t = time.perf_counter()
    with EmbeddingStore.open(tmp / "s.tle") as s:
        flat = faiss.IndexFlatIP(DIM)
        ids = s.ids.copy()
        for _, _, chunk in s.iter_chunks():
            flat.add(prepare_vectors(chunk, "cosine"))
    build = time.perf_counter() - t
    q = prepare_vectors(np.load(tmp / "queries.npy"), "cosine")
    found, qps, single = timed_search(lambda x: flat.search(x, 10)[1], q, singles=20)
    np.save(tmp / "truth.npy", ids[found])
    return {"build_s": build, "qps": qps, "single_ms": single, "memory_mb": flat.ntotal * DIM * 4 / 1e6,
            "peak_rss_mb": _status_mb("VmHWM:"), "peak_anon_mb": peak.stop(), "recall": 1.0}


def child_build(tmp: Path, kind: str) -> dict:
    from tl_embed.cli.search import memory_size
    from tl_embed.search import Index, prepare_vectors

    name, _, budget = kind.partition(":")
    peak = Peak()
    t = time.perf_counter()
    idx = Index.build(tmp / "s.tle", tmp / f"{kind.replace(':', '_')}.tli", name,
                      max_memory=memory_size(budget) if budget else None, log=lambda *_: None)
    build = time.perf_counter() - t
    build_anon, build_hwm = peak.stop(), _status_mb("VmHWM:")
    q = prepare_vectors(np.load(tmp / "queries.npy"), "cosine")
    truth = np.load(tmp / "truth.npy")
    found, qps, single = timed_search(lambda x: idx.search_ids(x, 10), q)
    recall = np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth, strict=True)])
    m = idx.meta
    return {"factory": m["factory"] + (" +rerank" if m.get("rerank") else ""), "params": m["search_params"],
            "build_s": build, "qps": qps, "single_ms": single, "memory_mb": m["memory_bytes"] / 1e6,
            "peak_rss_mb": build_hwm, "peak_anon_mb": build_anon, "recall": float(recall),
            "printed": m["recall_at_10"], "reached": m.get("target_reached")}


def in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--types", nargs="+", default=["auto", "auto:500MB", "ivf", "hnsw"],
                    help="--type values; TYPE:SIZE adds --max-memory SIZE")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tmp = Path(args.child[1])
        print(json.dumps(child_exact(tmp) if args.child[0] == "exact" else child_build(tmp, args.child[2])))
        return
    print(describe_cpu())
    print(__doc__.split("\n\n")[2])
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="tl_embed_index_"))
        try:
            t = time.perf_counter()
            write_store(tmp / "s.tle", n)
            np.save(tmp / "queries.npy", vectors(1000, seed=10**9))
            print(f"\n== N = {n:,} x {DIM}: store written in {time.perf_counter() - t:.0f} s; 1 000 held-out "
                  "queries, k = 10 ==", flush=True)
            print(f"{'type':<12} {'index':<26} {'params':<28} {'build s':>8} {'peak RSS':>9} {'(anon)':>8} "
                  f"{'index MB':>9} {'QPS':>7} {'1 query':>9} {'speed-up':>8} {'recall':>7} {'printed':>7}")
            exact = in_child("exact", str(tmp))
            rows = [("exact", {"factory": "IndexFlatIP", "params": {}, "printed": 1.0} | exact)]
            print(row(*rows[0], exact), flush=True)
            for kind in args.types:
                if kind.startswith("hnsw") and n > 100_000:
                    continue  # HNSW32 over 1M x 1280 on 2 cores: hours of build; only on request
                r = in_child("build", str(tmp), kind)
                print(row(kind, r, exact), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def row(kind: str, r: dict, exact: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in r["params"].items())
    return (f"{kind:<12} {r['factory']:<26} {params:<28} {r['build_s']:8.1f} {r['peak_rss_mb']:7.0f}MB "
            f"{r['peak_anon_mb']:6.0f}MB {r['memory_mb']:9.1f} {r['qps']:7.0f} {r['single_ms']:7.2f}ms "
            f"{exact['single_ms'] / r['single_ms']:7.1f}x {r['recall']:7.3f} {r['printed']:7.3f}")


if __name__ == "__main__":
    main()
