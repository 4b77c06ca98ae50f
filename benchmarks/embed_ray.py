"""--engine ray against the local engine on the same real JPEGs, start-up included, and a projection.

    python benchmarks/embed_ray.py [--images 2000] [--model mobilenet_v2] [--weights none]

The images are the first files of ../shared/datasets/flowers5 and sign_digits, linked (never copied,
never written) into a temporary folder. Both engines get the same backbone, built once (its build time
is added to both), so their vectors must agree (cosine >= 0.9999). The projection: N workers reach
min(N x the measured per-worker rate, the driver's commit rate), the latter from the time the driver
spent in ``store.add`` per image; past N* = commit rate / per-worker rate the driver is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tl_embed.embedding.backbones import load_backbone  # noqa: E402
from tl_embed.embedding.embed import embed_folder  # noqa: E402
from tl_embed.embedding.ray_engine import RayOptions  # noqa: E402
from tl_embed.embedding.runtime import cpu_count  # noqa: E402
from tl_embed.embedding.store import EmbeddingStore  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
SETS = ("flowers5", "sign_digits")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = set(next((ln for ln in lines if ln.startswith("flags")), "").split())
    return f"{model}; {cpu_count()} usable cores; flags: {' '.join(f for f in FLAGS if f in flags) or '-'}"


def link_images(dst: Path, total: int) -> int:
    """Link the first ``total`` JPEGs (half per dataset) as dst/<dataset>_<class>/<name>; the source stays read-only."""
    n = 0
    for i, name in enumerate(SETS):
        want = total // len(SETS) + (total % len(SETS) if i == 0 else 0)
        files = sorted(p for p in (DATASETS / name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:want]
        for f in files:
            link = dst / f"{name}_{f.parent.name}" / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
        n += len(files)
    return n


class CommitClock:
    """Seconds the driver spends in ``EmbeddingStore.add`` (wrapped for the duration of one run)."""

    def __init__(self):
        self.seconds, self.images, self._orig = 0.0, 0, EmbeddingStore.add

    def __enter__(self):
        clock, orig = self, self._orig

        def add(store, rows, vectors):
            t = time.perf_counter()
            orig(store, rows, vectors)
            clock.seconds += time.perf_counter() - t
            clock.images += len(rows)

        EmbeddingStore.add = add
        return self

    def __exit__(self, *exc):
        EmbeddingStore.add = self._orig


def min_cosine(a: Path, b: Path) -> float:
    with EmbeddingStore.open(a) as x, EmbeddingStore.open(b) as y:
        assert list(x.paths) == list(y.paths), "the two stores hold different images"
        u, v = x.embeddings.astype(np.float64), y.embeddings.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return float((u * v).sum(1).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="ray actors (default: the engine's)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = ap.parse_args()
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="tl-embed-bench-ray-") as tmp:
        folder = Path(tmp) / "images"
        n = link_images(folder, args.images)
        t = time.perf_counter()
        backbone = load_backbone(args.model, weights=args.weights)
        build = time.perf_counter() - t
        print(f"{n} JPEGs from {', '.join(SETS)}; {backbone.spec.describe()} built once in {build:.1f} s "
              "(added to both engines' times)")
        opts = dict(loader=lambda *a, **k: backbone, model=args.model, weights=args.weights,
                    batch_size=args.batch_size, progress=False)
        runs = {}
        for engine in ("local", "ray"):
            with CommitClock() as clock:
                t = time.perf_counter()
                report = embed_folder(folder, Path(tmp) / f"{engine}.tle", engine=engine,
                                      ray=RayOptions(None, args.workers, args.cpus_per_worker), **opts)
                wall = time.perf_counter() - t + build
            runs[engine] = (report, wall, clock)
            print(f"{engine:>5}: {report.embedded / wall:6.1f} img/s with start-up ({wall:.1f} s), "
                  f"{report.embedded / report.embed_seconds:6.1f} img/s embedding only, runtime {report.runtime}"
                  + (f", {len(report.workers)} workers" if report.workers else ""))
        (local, t_local, _), (ray_report, t_ray, clock) = runs["local"], runs["ray"]
        cosine = min_cosine(Path(tmp) / "local.tle", Path(tmp) / "ray.tle")
        print(f"ratio ray/local: {(ray_report.embedded / t_ray) / (local.embedded / t_local):.2f}x with start-up, "
              f"{(ray_report.embedded / ray_report.embed_seconds) / (local.embedded / local.embed_seconds):.2f}x "
              f"embedding only; min cosine between the stores {cosine:.6f}")
        project(ray_report, clock)


def project(report, clock: CommitClock) -> None:
    """What N workers would reach, from the measured per-worker rate and the driver's commit rate."""
    workers = max(1, len(report.workers))
    per_worker = report.embedded / report.embed_seconds / workers
    commit = clock.images / clock.seconds if clock.seconds else float("inf")
    print(f"per-worker rate {per_worker:.1f} img/s ({workers} workers sharing this machine's cores); driver commit "
          f"{commit:.0f} img/s ({1000 * clock.seconds / max(1, clock.images):.2f} ms/img in store.add)")
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        rate = min(n * per_worker, commit)
        print(f"  {n:>4} workers: ~{rate:8.0f} img/s{'  (driver-bound)' if n * per_worker > commit else ''}")
    print(f"the driver becomes the bottleneck past ~{commit / per_worker:.0f} workers at this per-worker rate")


if __name__ == "__main__":
    main()
