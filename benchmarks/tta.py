"""Does ``--tta flip`` earn its cost? Embedding time against accuracy gain on every set in ../shared.

Each labelled set in ``../shared/datasets`` is embedded with the genuine ImageNet MobileNetV2 (through a
temporary KERAS_HOME) twice, side by side: ``--tta none`` (the baseline) then ``--tta flip``. Printed per
set: images/s of each (decode + inference, ``EmbedReport.embed_seconds``; model loading excluded) and
their ratio, then the held-out accuracy of the ``logreg`` head (``train_from_store`` with its
other default arguments) and of the plain reference ``StandardScaler + LogisticRegression(C=0.1)`` on each
store (the same split: the set's own, else a seeded stratified 20% hold-out), and the gain in points.

    python benchmarks/tta.py [--sets flowers12 pets3] [--cache /tmp/tl-embed-tta-bench]

Stores and their embedding times are kept in ``--cache``: a rerun only trains (delete a store to time
it again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_cpu  # noqa: E402

TTAS = ("none", "flip")


def keras_home() -> None:
    """The genuine weights through a temporary KERAS_HOME (../shared is never written)."""
    home = Path(tempfile.mkdtemp(prefix="tl-embed-keras-"))
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)


def embed_timed(name: str, tta: str, cache: Path) -> tuple[Path, dict]:
    """The set's store for ``tta`` and its measured embedding time (this run's, or the cached run's)."""
    from tl_embed import embed_folder

    out, record = cache / f"{name}-{tta}.tle", cache / f"{name}-{tta}.json"
    if out.exists() and record.exists():
        return out, {**json.loads(record.read_text()), "cached": True}
    shutil.rmtree(out, ignore_errors=True)  # a partial store from an interrupted run: time it whole
    report = embed_folder(SHARED / "datasets" / name, out, model="mobilenet_v2", progress=False, tta=tta)
    timing = {"images": report.embedded, "embed_seconds": report.embed_seconds, "seconds": report.seconds,
              "runtime": report.runtime}
    record.write_text(json.dumps(timing))
    return out, {**timing, "cached": False}


def reference_accuracy(store: Path) -> float:
    """The plain probe: StandardScaler + LogisticRegression(C=0.1) on train_from_store's default split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tl_embed import EmbeddingStore
    from tl_embed.heads.training import choose_split

    with EmbeddingStore.open(store) as s:
        X, labels, splits = np.asarray(s.embeddings), s.labels, s.splits
    tr, te, _ = choose_split(labels, splits, 0.2, 0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(X[tr], labels[tr].astype(str))
    return float((clf.predict(X[te]) == labels[te].astype(str)).mean())


def bench_set(name: str, cache: Path) -> dict:
    from tl_embed.heads.training import train_from_store

    row: dict = {"set": name}
    for tta in TTAS:
        store, timing = embed_timed(name, tta, cache)
        t = time.perf_counter()
        result = train_from_store(store, head="logreg")  # the head benchmarks/README.md's TTA table measured
        row[tta] = {**timing, "rate": timing["images"] / timing["embed_seconds"],
                    "logreg": result.metrics.accuracy, "train_seconds": time.perf_counter() - t,
                    "reference": reference_accuracy(store), "held_out": result.split}
    return row


def print_row(r: dict) -> None:
    none, flip = r["none"], r["flip"]
    cached = " (times cached)" if none["cached"] or flip["cached"] else ""
    print(f"{r['set']:<12}{none['rate']:>8.1f}{flip['rate']:>8.1f}{none['rate'] / flip['rate']:>7.2f}x"
          f"{none['reference']:>9.2%}{flip['reference']:>9.2%}{100 * (flip['reference'] - none['reference']):>+7.2f}"
          f"{none['logreg']:>9.2%}{flip['logreg']:>9.2%}{100 * (flip['logreg'] - none['logreg']):>+7.2f}"
          f"{none['train_seconds']:>7.1f}{flip['train_seconds']:>7.1f}  {none['held_out']}{cached}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=None, help="default: every set in ../shared/datasets")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tl-embed-tta-bench")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TL_EMBED_CACHE", str(args.cache / "converted"))  # the IR once, not once per run
    keras_home()
    sets = args.sets or sorted(p.name for p in (SHARED / "datasets").iterdir() if p.is_dir())
    print(describe_cpu())
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("MobileNetV2 (genuine ImageNet weights); img/s = decode + inference; accuracy on the held-out split; "
          "gain in points")
    print(f"{'set':<12}{'img/s':>8}{'flip':>8}{'cost':>8}{'ref':>9}{'flip':>9}{'gain':>7}"
          f"{'logreg':>9}{'flip':>9}{'gain':>7}{'fit s':>7}{'flip':>7}  held out")
    rows = []
    for name in sets:
        rows.append(bench_set(name, args.cache))
        print_row(rows[-1])
    images = sum(r["none"]["images"] for r in rows)
    secs = {t: sum(r[t]["embed_seconds"] for r in rows) for t in TTAS}
    mean = {(t, m): 100 * np.mean([r[t][m] for r in rows]) for t in TTAS for m in ("reference", "logreg")}
    print(f"{'all':<12}{images / secs['none']:>8.1f}{images / secs['flip']:>8.1f}{secs['flip'] / secs['none']:>7.2f}x"
          f"{mean['none', 'reference']:>8.2f}%{mean['flip', 'reference']:>8.2f}%"
          f"{mean['flip', 'reference'] - mean['none', 'reference']:>+7.2f}"
          f"{mean['none', 'logreg']:>8.2f}%{mean['flip', 'logreg']:>8.2f}%"
          f"{mean['flip', 'logreg'] - mean['none', 'logreg']:>+7.2f}   (mean accuracy over the sets; "
          f"{images} images)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
