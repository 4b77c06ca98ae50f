"""`tl-embed dedup` at 10k, 100k and 1M vectors (dimension 1280): time, memory, and recall of duplicate pairs.

    python benchmarks/dedup_scale.py                          # 10k, 100k, 1M (the 1M store is 5.1 GB in /tmp)
    python benchmarks/dedup_scale.py --sizes 10000 50000 --exact-upto 50000

For each N a real store is written directly (no model): CNN-like embeddings (non-negative, a decaying
spectrum, 1 000 clusters, unrelated images at cosine ~0.52, same-cluster ~0.82, at most ~0.92) with
planted near-duplicate groups over ~10% of the rows (pairs, triples and groups of 5 and 8: one original
plus copies at cosine 0.955-0.995 to it, half the change in the principal subspace, half isotropic).
Then, each in a fresh process so peak memory is its own: `find_duplicates(mode="ann")` (and
`mode="exact"`, the all-pairs reference, up to --exact-upto, to compare time and groups).
Recall: for --sample query rows (half uniform, half planted), every pair at cosine >= threshold found by
brute force over the whole store (streamed), and the share of those pairs that the ann run put in one
group.  Peak memory: VmHWM (which counts the store's memory-mapped pages the process touched) and the
peak of anonymous (heap) memory, sampled every 0.1 s.
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

from tl_embed.embedding import BackboneSpec, EmbeddingStore, ManifestRow  # noqa: E402

LATENT = 256  # rank of the structured part of each embedding
CLUSTERS = 1000
CHUNK = 65_536


class Generator:
    """CNN-like embeddings: relu(bias + (cluster centre + within-cluster variation) @ basis + noise)."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.scale = (np.arange(1, LATENT + 1) ** -0.5).astype(np.float32)  # decaying spectrum
        self.basis = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.centres = (rng.standard_normal((CLUSTERS, LATENT)) * self.scale * 4).astype(np.float32)
        self.bias = np.abs(rng.standard_normal(dim)).astype(np.float32) * 0.5
        self.dim = dim

    def latent(self, rng, m: int) -> np.ndarray:
        z = rng.standard_normal((m, LATENT), dtype=np.float32) * self.scale * 3
        return self.centres[rng.integers(0, CLUSTERS, m)] + z

    def embed(self, rng, z: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(z), self.dim), dtype=np.float32) * 0.3
        return np.maximum(self.bias + z @ self.basis + noise, 0)

    def copy_of(self, rng, x: np.ndarray, z: np.ndarray, cosine: np.ndarray) -> np.ndarray:
        """Near-copies of rows x (latents z), each at about the given cosine to its original."""
        out = np.empty_like(x)
        for lo in range(0, len(x), CHUNK):
            xs, zs, cs = x[lo:lo + CHUNK], z[lo:lo + CHUNK], cosine[lo:lo + CHUNK]
            change = (rng.standard_normal(zs.shape, dtype=np.float32) * self.scale) @ self.basis
            change = change / np.linalg.norm(change, axis=1, keepdims=True)
            iso = rng.standard_normal(xs.shape, dtype=np.float32)
            iso = iso / np.linalg.norm(iso, axis=1, keepdims=True)
            norm = np.linalg.norm(xs, axis=1, keepdims=True)
            size = norm * np.sqrt(1 / cs[:, None] ** 2 - 1)  # |delta| for cos(x, x + delta) ~ cs (delta _|_ x)
            out[lo:lo + CHUNK] = xs + size * (change + iso) / np.sqrt(2)
        return out


def plan_groups(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Planted groups over ~10% of the rows: (member position, group id) with the original first."""
    sizes = rng.choice([2, 2, 2, 2, 2, 3, 3, 5, 8], size=max(1, n // 45))
    members = rng.permutation(n)[:sizes.sum()]
    group = np.repeat(np.arange(len(sizes)), sizes)
    return members, group


def build(path: Path, n: int, dim: int, seed: int = 0) -> dict:
    """Write the store; returns the planted groups (positions) and build time."""
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    gen = Generator(dim, seed)
    members, group = plan_groups(n, rng)
    first = np.r_[True, group[1:] != group[:-1]]
    orig_z = gen.latent(rng, int(first.sum()))
    orig_x = gen.embed(rng, orig_z)
    gid = group[~first]
    copies = gen.copy_of(rng, orig_x[gid], orig_z[gid], rng.uniform(0.955, 0.995, len(gid)).astype(np.float32))
    planted = np.full(n, -1, np.int64)  # row -> index into the planted vectors, or -1
    planted[members[first]] = np.arange(int(first.sum()))
    planted[members[~first]] = first.sum() + np.arange(len(gid))
    planted_x = np.concatenate([orig_x, copies])
    spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", dim)
    with EmbeddingStore.create(path, spec, root=path.parent) as s:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            x = gen.embed(rng, gen.latent(rng, m))
            p = planted[start:start + m]
            x[p >= 0] = planted_x[p[p >= 0]]
            s.add([ManifestRow(f"img/{i:08d}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(start, start + m)], x)
        s.consolidate()
    return {"seconds": time.perf_counter() - t, "members": members, "group": group}


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(field)) / 1024


def child(store: Path, mode: str, threshold: float, k: int, labels_out: Path) -> dict:
    """One dedup run in this (fresh) process: time, peak memory, and each row's group label."""
    from tl_embed import find_duplicates

    anon = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            anon[0] = max(anon[0], _status_mb("RssAnon:"))

    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    groups = find_duplicates(store, threshold, mode, k, exact_max=0, progress=True)
    seconds = time.perf_counter() - t
    done.set()
    with EmbeddingStore.open(store) as s:
        n = len(s)
    labels = np.full(n, -1, np.int64)
    for g, members in enumerate(groups):
        labels[[int(Path(p).stem) for p, _ in members]] = g
    np.save(labels_out, labels)
    return {"seconds": seconds, "peak_rss_mb": _status_mb("VmHWM:"), "peak_anon_mb": anon[0],
            "groups": len(groups), "in_groups": int((labels >= 0).sum())}


def run_child(store: Path, mode: str, threshold: float, k: int, labels: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), mode, str(threshold), str(k), str(labels)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # progress bars go to stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def exact_pairs_of(store: Path, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, other row) pair at cosine >= threshold, by brute force over the streamed store.

    Rows are named by image number (img/NUMBER.jpg, the order they were added), like the groups'
    labels: a store's positions follow its shard order, which at 1M rows was not the order of adding.
    """
    from tl_embed.search import prepare_vectors

    with EmbeddingStore.open(store) as s:
        name_at = np.fromiter((int(Path(p).stem) for batch in s.iter_paths() for p in batch), np.int64, len(s))
        position = np.empty_like(name_at)
        position[name_at] = np.arange(len(name_at))
        qrows = np.sort(queries)
        q = prepare_vectors(s.take(position[qrows]), "cosine")
        found = []
        for start, _, chunk in s.iter_chunks():
            sims = q @ prepare_vectors(chunk, "cosine").T
            a, b = np.nonzero(sims >= threshold - 1e-6)
            found.append((qrows[a], name_at[start + b]))
    a, b = (np.concatenate(x) for x in zip(*found, strict=True))
    return a[a != b], b[a != b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--sample", type=int, default=2000, help="query rows for the recall measurement")
    ap.add_argument("--exact-upto", type=int, default=10_000, help="also time mode=exact up to this N")
    ap.add_argument("--tmp", default=None, help="folder for the stores (default: the system's temp folder)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        store, mode, threshold, k, labels = args.child
        print(json.dumps(child(Path(store), mode, float(threshold), int(k), Path(labels))))
        return
    print(describe_cpu())
    print(f"threshold {args.threshold}, k = {args.k}, recall on {args.sample} query rows (half planted)")
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="tl_embed_dedup_", dir=args.tmp))
        try:
            measure(tmp, n, args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def measure(tmp: Path, n: int, args) -> None:
    store = tmp / "s.tle"
    print(f"\n== N = {n:,} x {args.dim} float32 ({n * args.dim * 4 / 1e9:.2f} GB) ==", flush=True)
    built = build(store, n, args.dim)
    print(f"store written in {built['seconds']:.1f} s; planted {len(np.unique(built['group'])):,} groups over "
          f"{len(built['members']):,} rows", flush=True)
    modes = ["ann"] + (["exact"] if n <= args.exact_upto else [])
    runs = {m: run_child(store, m, args.threshold, args.k, tmp / f"{m}.npy") for m in modes}
    labels = {m: np.load(tmp / f"{m}.npy") for m in modes}
    for m, r in runs.items():
        print(f"{m:<6} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB (heap {r['peak_anon_mb']:5.0f} MB)"
              f"  {r['groups']:,} groups, {r['in_groups']:,} images in them", flush=True)
    if "exact" in runs:
        same = np.array_equal(*(canonical(labels[m]) for m in modes))
        ratio = runs["exact"]["seconds"] / runs["ann"]["seconds"]
        print(f"ann groups identical to exact: {same}; exact takes {ratio:.1f}x ann's time")
    rng = np.random.default_rng(1)
    half = args.sample // 2
    planted_rows = rng.choice(built["members"], min(half, len(built["members"])), replace=False)
    queries = np.unique(np.r_[rng.choice(n, half, replace=False), planted_rows])
    t = time.perf_counter()
    a, b = exact_pairs_of(store, queries, args.threshold)
    ann = labels["ann"]
    found = (ann[a] >= 0) & (ann[a] == ann[b])
    planted = np.isin(a, built["members"])
    print(f"duplicate-pair recall vs exact search ({len(queries):,} query rows, {len(a):,} pairs at cosine >= "
          f"{args.threshold}, exact search {time.perf_counter() - t:.0f} s): {found.mean() if len(a) else 1:.4f} "
          f"(planted rows {found[planted].mean() if planted.any() else 1:.4f}, "
          f"uniform rows' pairs {found[~planted].mean() if (~planted).any() else 1:.4f})", flush=True)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Group labels renumbered by first appearance, so two groupings compare equal when they are the same."""
    out = np.full(len(labels), -1, np.int64)
    grouped = labels >= 0
    _, first, inverse = np.unique(labels[grouped], return_index=True, return_inverse=True)
    out[grouped] = np.argsort(np.argsort(first))[inverse]
    return out


if __name__ == "__main__":
    main()
