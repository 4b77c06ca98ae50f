"""The store at millions of rows: adding k images costs O(k), and reading never needs all rows in RAM.

    python benchmarks/embed_scale.py                 # 1 000 000 x 1280 float32 (5.1 GB on disk)
    python benchmarks/embed_scale.py --rows 100000   # quicker

Builds a synthetic store of --rows x --dim random vectors directly (no model), then, each in a fresh
process so peak RSS is its own: (a) open it, add --add rows in batches of 64 (what `embed` commits),
consolidate and close; (b) the same into an empty store, the baseline (each --repeats times, alternating,
median shown); (c) open the large store and
iterate every row with iter_chunks().  Prints time and peak RSS of each and the ratios the issue sets as
goals: (a) <= 2x the time of (b) and peak RSS <= 1 GB above (b).  The large store was just written,
so (c) reads mostly from the page cache: it measures our overhead, not the disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_cpu  # noqa: E402

from tl_embed.embedding import BackboneSpec, EmbeddingStore, ManifestRow  # noqa: E402


def spec(dim: int) -> BackboneSpec:
    return BackboneSpec("synthetic", "random", "random", 224, "none", "avg", dim)


def rows(prefix: str, start: int, n: int) -> list[ManifestRow]:
    return [ManifestRow(f"{prefix}/{i:08d}.jpg", f"c{i % 10}", None, f"{i:064x}", 100_000, i, 640, 480)
            for i in range(start, start + n)]


def build(path: Path, n: int, dim: int, chunk: int = 131_072) -> float:
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    with EmbeddingStore.create(path, spec(dim)) as s:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            s.add(rows("old", start, k), rng.standard_normal((k, dim), dtype=np.float32))
        s.consolidate()
    return time.perf_counter() - t


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(field)) / 1024


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM): getrusage's maxrss is inherited from the parent across exec."""
    return _status_mb("VmHWM:")


def child_add(path: Path, n: int, dim: int, tag: str, batch: int = 64) -> dict:
    """Open (or create) the store, commit n rows in batches, consolidate, close: what `embed` does."""
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    s = EmbeddingStore.open(path, "a") if path.exists() else EmbeddingStore.create(path, spec(dim))
    with s:
        for start in range(0, n, batch):
            k = min(batch, n - start)
            s.add(rows(tag, start, k), rng.standard_normal((k, dim), dtype=np.float32))
        s.consolidate()
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
            "shards": len(list((path / "shards").glob("*.npy")))}


def child_read(path: Path) -> dict:
    t = time.perf_counter()
    s = EmbeddingStore.open(path)
    n = len(s)
    opened = time.perf_counter() - t
    total = 0.0
    seen = 0
    anon = 0.0
    for _, ids, vectors in s.iter_chunks():
        total += float(vectors[:, 0].sum())  # touch every chunk
        seen += len(ids)
        anon = max(anon, _status_mb("RssAnon:"))
    s.close()
    return {"open_seconds": opened, "iterate_seconds": time.perf_counter() - t - opened, "rows": n,
            "seen": seen, "peak_rss_mb": peak_rss_mb(), "peak_anon_mb": anon}


def in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--add", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="runs of (a) and (b); the median time is shown")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path = args.child[0], Path(args.child[1])
        result = child_add(path, args.add, args.dim, args.child[2]) if kind == "add" else child_read(path)
        print(json.dumps(result))
        return
    print(describe_cpu())
    tmp = Path(tempfile.mkdtemp(prefix="tl_embed_scale_"))
    try:
        large = tmp / "large.tle"
        gb = args.rows * args.dim * 4 / 1e9
        print(f"building {args.rows:,} x {args.dim} float32 ({gb:.1f} GB) ...", flush=True)
        print(f"  built in {build(large, args.rows, args.dim):.1f} s")
        runs = {"empty": [], "large": []}
        for r in range(args.repeats):  # alternate, so both see the same background load
            opts = ("--add", str(args.add), "--dim", str(args.dim))
            runs["empty"].append(in_child("add", str(tmp / f"empty{r}.tle"), f"run{r}", *opts))
            runs["large"].append(in_child("add", str(large), f"run{r}", *opts))
        base, grown = (min(v, key=lambda x: x["seconds"]) | {"seconds": float(np.median([x["seconds"] for x in v]))}
                       for v in (runs["empty"], runs["large"]))
        read = in_child("read", str(large), "--dim", str(args.dim))
        print(f"median of {args.repeats} runs each, alternating (a) and (b)")
        print(f"(b) add {args.add} rows to an empty store: {base['seconds']:.2f} s, peak RSS "
              f"{base['peak_rss_mb']:.0f} MB, {base['shards']} shard(s) after")
        print(f"(a) add {args.add} rows to the {args.rows:,}-row store: {grown['seconds']:.2f} s, peak RSS "
              f"{grown['peak_rss_mb']:.0f} MB, {grown['shards']} shard(s) after")
        ratio = grown["seconds"] / base["seconds"]
        extra = grown["peak_rss_mb"] - base["peak_rss_mb"]
        print(f"    time {ratio:.2f}x the empty store's (goal <= 2x: {'met' if ratio <= 2 else 'NOT met'}); "
              f"peak RSS +{extra:.0f} MB (goal <= 1024 MB: {'met' if extra <= 1024 else 'NOT met'})")
        rate = read["rows"] / read["iterate_seconds"]
        print(f"(c) open the {read['rows']:,}-row store: {read['open_seconds'] * 1000:.1f} ms; iterate every row "
              f"in chunks (64 MB each): {read['iterate_seconds']:.2f} s ({rate:,.0f} rows/s, "
              f"{rate * args.dim * 4 / 1e9:.2f} GB/s); heap (anonymous) memory at most {read['peak_anon_mb']:.0f} MB, "
              f"peak RSS {read['peak_rss_mb']:.0f} MB counting the memory-mapped page cache")
        assert read["seen"] == args.rows + args.add * args.repeats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
