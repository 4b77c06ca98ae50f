"""`tl-embed audit` at a million images: the time of each pass, peak memory, and what it finds of what was planted.

    python benchmarks/audit_scale.py                      # 1M x 1280 (a 5.1 GB store, kept in --work)
    python benchmarks/audit_scale.py --n 100000 --classes 20

A real store is written directly (no model), with ``dedup_scale.py``'s CNN-like embeddings: each row is
drawn around one of ``--classes`` centres of the generator's latent space, and that centre is its label;
80% of the rows are ``train``, 20% ``test``.  Planted:

* label noise: ``--noise`` of the rows relabelled to a random other class;
* cross-split copies: ``--copies`` test images with a near-copy (cosine 0.955-0.995) in ``train``;
* outliers: ``--outliers`` rows of unstructured non-negative noise, each labelled as some class.

Then :func:`tl_embed.audit_store` runs in a fresh process with the CLI's defaults (progress on
stderr): seconds of each pass, wall time, peak RSS (VmHWM, which counts the store's memory-mapped
pages the process holds) and peak anonymous memory (sampled every 0.1 s), and the findings against
the planted rows: precision and recall of the likely wrong labels, the share of planted copies found
as cross-split duplicates, and of planted outliers found as outliers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dedup_scale import CHUNK, LATENT, Generator, _status_mb  # noqa: E402
from machine import describe_cpu  # noqa: E402

from tl_embed.embedding import BackboneSpec, EmbeddingStore, ManifestRow  # noqa: E402


def plan(n: int, classes: int, noise: float, copies: int, outliers: int, seed: int) -> dict[str, np.ndarray]:
    """Per image number: its true class, given label, split; which rows are copies (of what) and outliers."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    split = np.where(rng.random(n) < 0.2, "test", "train")
    copy_rows = np.arange(n - copies, n)  # the last rows are the copies, in train
    split[copy_rows] = "train"
    original = rng.choice(np.flatnonzero(split[:n - copies] == "test"), copies, replace=False)
    true[copy_rows] = true[original]
    free = np.setdiff1d(np.arange(n - copies), original)
    outlier_rows = np.sort(rng.choice(free, outliers, replace=False))
    noisy = np.sort(rng.choice(np.setdiff1d(free, outlier_rows), int(round(noise * n)), replace=False))
    given = true.copy()
    given[noisy] = (true[noisy] + rng.integers(1, classes, len(noisy))) % classes
    return {"true": true, "given": given, "split": split, "copy_rows": copy_rows, "original": original,
            "outliers": outlier_rows, "noisy": noisy}


def build(path: Path, planned: dict[str, np.ndarray], dim: int, seed: int) -> float:
    """Write the store (rows named img/NUMBER.jpg, labelled and split as planned); returns seconds."""
    t = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    gen = Generator(dim, seed)
    n = len(planned["true"])
    copy_rows, original = planned["copy_rows"], planned["original"]
    kept_x = np.zeros((len(original), dim), np.float32)  # the originals, as their rows are written
    kept_z = np.zeros((len(original), LATENT), np.float32)
    slot = {int(r): i for i, r in enumerate(original)}
    is_outlier = np.zeros(n, bool)
    is_outlier[planned["outliers"]] = True
    spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", dim)
    with EmbeddingStore.create(path, spec, root=path.parent) as s:
        for start in range(0, n - len(copy_rows), CHUNK):
            rows = np.arange(start, min(start + CHUNK, n - len(copy_rows)))
            spread = rng.standard_normal((len(rows), LATENT), np.float32) * gen.scale * 3
            z = gen.centres[planned["true"][rows]] + spread
            x = gen.embed(rng, z)
            odd = is_outlier[rows]
            x[odd] = np.abs(rng.standard_normal((int(odd.sum()), dim), np.float32))
            for i, r in enumerate(rows):
                if int(r) in slot:
                    kept_x[slot[int(r)]], kept_z[slot[int(r)]] = x[i], z[i]
            s.add(_manifest(rows, planned), x)
        cosines = rng.uniform(0.955, 0.995, len(copy_rows)).astype(np.float32)
        s.add(_manifest(copy_rows, planned), gen.copy_of(rng, kept_x, kept_z, cosines))
        s.consolidate()
    return time.perf_counter() - t


def _manifest(rows: np.ndarray, planned: dict[str, np.ndarray]) -> list[ManifestRow]:
    given, split = planned["given"], planned["split"]
    return [ManifestRow(f"img/{r:08d}.jpg", f"class{given[r]:04d}", str(split[r]), "h", 1, 1, 1, 1)
            for r in rows.tolist()]


def child(store: Path, out: Path) -> dict:
    """One audit in this fresh process: pass times, peak memory, and the rows each finding names."""
    from tl_embed import audit_store

    samples: list[tuple[float, float, float]] = []  # (seconds, RSS MB, anonymous MB)
    done = threading.Event()
    t = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append((time.perf_counter() - t, _status_mb("VmRSS:"), _status_mb("RssAnon:")))

    threading.Thread(target=sample, daemon=True).start()
    audit = audit_store(store, progress=True)
    seconds = time.perf_counter() - t
    done.set()
    # each pass's peak RSS: the passes run one after another, in this order, after the store is opened
    peaks, start = {}, seconds - sum(audit.settings["seconds"].values())
    for name, spent in audit.settings["seconds"].items():
        inside = [rss for at, rss, _ in samples if start <= at < start + spent]
        peaks[name] = max(inside, default=0.0)
        start += spent

    def number(path: str) -> int:
        return int(Path(path).stem)

    np.save(out / "flagged.npy", np.array([number(f.path) for f in audit.label_issues], np.int64))
    cross = [(number(d.path), number(d.other)) for d in audit.duplicates if d.kind == "cross-split"]
    np.save(out / "cross.npy", np.array(cross, np.int64).reshape(-1, 2))
    np.save(out / "outliers.npy", np.array([number(o.path) for o in audit.outliers], np.int64))
    return {"seconds": seconds, "passes": audit.settings["seconds"], "pass_peaks_mb": peaks,
            "peak_rss_mb": _status_mb("VmHWM:"), "peak_anon_mb": max((a for _, _, a in samples), default=0.0),
            "oof_accuracy": audit.shape.oof_accuracy,
            "conflicts": sum(d.kind == "label-conflict" for d in audit.duplicates), "notes": audit.notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.02, help="share of rows given a wrong label")
    ap.add_argument("--copies", type=int, default=1000, help="test images copied into train")
    ap.add_argument("--outliers", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/tl_embed_audit_scale", help="where the store and results are kept")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    print(describe_cpu())
    work = Path(args.work) / f"n{args.n}-d{args.dim}-k{args.classes}-s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    planned = plan(args.n, args.classes, args.noise, args.copies, args.outliers, args.seed)
    store = work / "s.tle"
    if not (work / "built").exists():
        print(f"writing {args.n:,} x {args.dim} float32 ({args.n * args.dim * 4 / 1e9:.2f} GB) ...", flush=True)
        print(f"store written in {build(store, planned, args.dim, args.seed):.0f} s", flush=True)
        (work / "built").touch()
    print(f"{args.n:,} rows, {args.classes} classes; planted: {len(planned['noisy']):,} wrong labels, "
          f"{args.copies:,} cross-split copies, {args.outliers:,} outliers", flush=True)
    cmd = [sys.executable, __file__, "--child", str(store), str(work)]
    t = time.perf_counter()
    r = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - t
    report(r, wall, planned, work)


def report(r: dict, wall: float, planned: dict[str, np.ndarray], work: Path) -> None:
    """Print the run's times and memory, and its findings against what was planted."""
    passes = ", ".join(f"{name} {s:.0f} s (peak RSS {r['pass_peaks_mb'][name]:.0f} MB)"
                       for name, s in r["passes"].items())
    print(f"audit {r['seconds']:.0f} s ({wall:.0f} s wall with the interpreter's start): {passes}")
    print(f"peak RSS {r['peak_rss_mb']:.0f} MB (anonymous {r['peak_anon_mb']:.0f} MB); "
          f"out-of-fold accuracy {r['oof_accuracy']:.4f}")
    flagged = np.load(work / "flagged.npy")
    hit = np.isin(flagged, planted := planned["noisy"])
    print(f"likely wrong labels: {len(flagged):,} flagged, precision {hit.mean() if len(flagged) else 0:.3f}, "
          f"recall {hit.sum() / len(planted):.3f} (of {len(planted):,} planted)")
    cross = np.load(work / "cross.npy")
    wanted = set(zip(planned["copy_rows"].tolist(), planned["original"].tolist(), strict=True))
    found = {tuple(p) for p in cross.tolist()} & wanted
    print(f"cross-split duplicates: {len(cross):,} pairs; planted copies found {len(found):,} of {len(wanted):,}, "
          f"each with the training copy named first")
    outliers = np.load(work / "outliers.npy")
    print(f"outliers: {len(outliers):,} flagged; planted found {np.isin(planned['outliers'], outliers).sum():,} of "
          f"{len(planned['outliers']):,}; label conflicts {r['conflicts']:,}")
    for note in r["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
