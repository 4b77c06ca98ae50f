"""`tl-embed embed --engine ray` against the local engine: whole commands, start-up included, and a projection.

    python benchmarks/embed_ray.py [--images 2000] [--runs 2] [--workers N] [--cpus-per-worker C]

Each run is the real command, `python -m tl_embed.cli embed DIR --out NEW.tle [--engine ray]`, timed from
process start to exit: Python and TensorFlow imports, the model build, Ray's start and shutdown, the
actors' start, embedding and every store commit.  The engines alternate (local, ray, local, ray, ...) so
drift on a shared machine hits both; the ratio is of their median times.

The images are the first JPEGs of ../shared/datasets/flowers5 and sign_digits, linked (never copied, never
written) into a temporary folder.  The backbone is MobileNetV2 with its genuine ImageNet weights (a temporary
KERAS_HOME links ../shared/weights), so every process builds the same model and the two stores must agree
(cosine >= 0.9999).  The converted model is cached once before the timed runs, as it is for any user after
their first run.

The projection: N workers reach min(N x the measured per-worker rate, the driver's commit rate).  The
per-worker rate is the ray run's embedding rate (from its summary) over its workers; the commit rate is
measured here by adding the same number of 1280-d rows, in the same batches, to a new store.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
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

from tl_embed.embedding import EmbeddingStore, ManifestRow  # noqa: E402

SHARED = ROOT.parent / "shared"
SETS = ("flowers5", "sign_digits")
SUMMARY = re.compile(r"Done: (\d+) embedded \(([\d.]+) images/s with the (\w+) runtime(?: on (\d+) Ray workers?)?\)")


def link_images(dst: Path, total: int) -> int:
    """Link the first ``total`` JPEGs (half per dataset) as dst/<dataset>_<class>/<name>; the source stays read-only."""
    n = 0
    for i, name in enumerate(SETS):
        want = total // len(SETS) + (total % len(SETS) if i == 0 else 0)
        files = sorted(p for p in (SHARED / "datasets" / name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        for f in files[:want]:
            link = dst / f"{name}_{f.parent.name}" / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
            n += 1
    return n


def keras_home(tmp: Path) -> Path:
    models = tmp / "keras_home" / "models"
    models.mkdir(parents=True)
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            (models / f.name).symlink_to(f.resolve())
    return models.parent


def embed(folder: Path, out: Path, env: dict, extra: list[str]) -> tuple[float, re.Match]:
    """Run the command; its wall time and its summary line."""
    cmd = [sys.executable, "-m", "tl_embed.cli", "embed", str(folder), "--out", str(out), "-q", *extra]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = SUMMARY.search(done.stdout)
    if done.returncode != 0 or summary is None:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, summary


def min_cosine(a: Path, b: Path) -> float:
    with EmbeddingStore.open(a) as x, EmbeddingStore.open(b) as y:
        assert list(x.paths) == list(y.paths), "the two stores hold different images"
        u, v = x.embeddings.astype(np.float64), y.embeddings.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return float((u * v).sum(1).min())


def commit_rate(like: Path, out: Path, n: int, batch: int) -> float:
    """Images/s of the driver's own work per batch: ``store.add`` of ``n`` new rows, ``batch`` at a time."""
    with EmbeddingStore.open(like) as s:
        spec, root, dim = s.spec, s.root, s.embeddings.shape[1]
    rng = np.random.default_rng(0)
    store = EmbeddingStore.create(out, spec, root=root)
    try:
        t = time.perf_counter()
        for start in range(0, n, batch):
            rows = [ManifestRow(f"c/{i}.jpg", "c", None, f"{i:064x}", 1, 1, 224, 224)
                    for i in range(start, min(n, start + batch))]
            store.add(rows, rng.standard_normal((len(rows), dim), dtype=np.float32))
        return n / (time.perf_counter() - t)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=2, help="runs per engine, alternating")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="ray actors (default: the engine's)")
    ap.add_argument("--cpus-per-worker", type=float, default=None)
    args = ap.parse_args()
    print(describe_cpu())
    ray_args = ["--engine", "ray"] + (["--workers", str(args.workers)] if args.workers else []) + (
        ["--cpus-per-worker", str(args.cpus_per_worker)] if args.cpus_per_worker else [])
    with tempfile.TemporaryDirectory(prefix="tl-embed-bench-ray-") as tmp_str:
        tmp = Path(tmp_str)
        folder = tmp / "images"
        n = link_images(folder, args.images)
        env = {**os.environ, "KERAS_HOME": str(keras_home(tmp)), "TL_EMBED_CACHE": str(tmp / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        warm = tmp / "warm"
        link_images(warm, 8)
        embed(warm, tmp / "warm.tle", env, [])  # converts MobileNetV2 once into the cache
        print(f"{n} JPEGs from {', '.join(SETS)}; MobileNetV2 (ImageNet weights), batch size {args.batch_size}; "
              f"ray: {' '.join(ray_args)}")
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        last: dict[str, re.Match] = {}
        for run in range(args.runs):
            for engine, extra in (("local", []), ("ray", ray_args)):
                out = tmp / f"{engine}{run}.tle"
                wall, summary = embed(folder, out, env, [*extra, "--batch-size", str(args.batch_size)])
                walls[engine].append(wall)
                last[engine] = summary
                workers = f", {summary[4]} Ray worker(s)" if summary[4] else ""
                print(f"  run {run + 1} {engine:>5}: {int(summary[1]) / wall:6.1f} img/s for the whole command "
                      f"({wall:5.1f} s); {float(summary[2]):6.1f} img/s embedding only{workers}")
        med = {e: statistics.median(w) for e, w in walls.items()}
        rate = {e: n / med[e] for e in med}
        cosine = min_cosine(tmp / "local0.tle", tmp / "ray0.tle")
        print(f"median: local {rate['local']:.1f} img/s ({med['local']:.1f} s), ray {rate['ray']:.1f} img/s "
              f"({med['ray']:.1f} s): ray/local {rate['ray'] / rate['local']:.2f}x for the whole command (goal 0.8x); "
              f"embedding only {float(last['ray'][2]) / float(last['local'][2]):.2f}x (last runs); "
              f"min cosine between the stores {cosine:.6f}")
        project(last["ray"], commit_rate(tmp / "ray0.tle", tmp / "commit.tle", n, args.batch_size))


def project(summary: re.Match, commit: float) -> None:
    """What N workers would reach, from the measured per-worker rate and the driver's commit rate."""
    workers = int(summary[4] or 1)
    per_worker = float(summary[2]) / workers
    print(f"per-worker rate {per_worker:.1f} img/s ({workers} worker(s) sharing this machine's cores); driver commit "
          f"{commit:.0f} img/s ({1000 / commit:.2f} ms/img in store.add)")
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        rate = min(n * per_worker, commit)
        print(f"  {n:>4} workers: ~{rate:8.0f} img/s{'  (driver-bound)' if n * per_worker > commit else ''}")
    print(f"the driver becomes the bottleneck past ~{commit / per_worker:.0f} workers at this per-worker rate")


if __name__ == "__main__":
    main()
