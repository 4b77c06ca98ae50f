"""Head training time and accuracy: synthetic features, then every labelled set in ../shared.

Synthetic: 50 000 x 1280 clustered training features (10 and 100 classes) + 10 000 test rows.
Real: each set embedded with the genuine ImageNet MobileNetV2 (../shared/weights via a temporary
KERAS_HOME), then the plain reference StandardScaler + LogisticRegression(C=0.1) next to each
tl-embed head and option (hyper-parameters chosen on the training rows only), on the same split (the
set's own, else a seeded stratified 20% hold-out). Each row: test accuracy, its difference from the
reference in points, training seconds, the chosen parameters; then the mean and the worst difference
per method over the sets.

    python benchmarks/heads.py [--heads logreg svm knn dense] [--skip-synthetic] [--skip-real] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_cpu  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
# (label, head, fit_head options) per method of the real-set table; a head with no options is as
# `tl-embed train --head HEAD` trains it
METHODS = [
    ("svm", "svm", {}),
    ("logreg", "logreg", {}),
    ("logreg transform=none", "logreg", {"transform": "none"}),
    ("logreg transform=sqrt-l2", "logreg", {"transform": "sqrt-l2"}),
    ("knn", "knn", {}),
    ("dense", "dense", {}),
    ("dense --hidden 512", "dense", {"hidden": 512}),
]


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters that overlap enough that accuracy is not trivially 100%."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = centers[y] * 0.06 + rng.normal(0, 1, (n, dim)).astype(np.float32)
    return X, y.astype(str)


def bench_synthetic(heads: list[str]) -> None:
    from tl_embed.embedding import BackboneSpec
    from tl_embed.heads.fit import fit_head

    spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", 1280)
    print("\n== synthetic 50 000 x 1280: train 50 000, test 10 000 ==")
    for classes in (10, 100):
        X, y = synthetic(60_000, 1280, classes)
        for head in heads:
            if head == "dense":
                continue  # its cost is per epoch, shown on the real sets
            t = time.perf_counter()
            fitted, info = fit_head(X[:50_000], y[:50_000], spec, head)
            secs = time.perf_counter() - t
            acc = (fitted.predict(X[50_000:]) == y[50_000:]).mean()
            print(f"{classes:>4} classes  {head:<7} train {secs:6.1f} s (search {info['search_seconds']:.1f} s "
                  f"+ final fit {info['fit_seconds']:.1f} s)  test accuracy {acc:.2%}  params {fitted.params}",
                  flush=True)


def embed_set(name: str, cache: Path) -> Path:
    from tl_embed import embed_folder

    out = cache / f"{name}.tle"
    embed_folder(SHARED / "datasets" / name, out, model="mobilenet_v2", progress=False)
    return out


def bench_real(heads: list[str], cache: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tl_embed import EmbeddingStore
    from tl_embed.heads.fit import fit_head
    from tl_embed.heads.head import DEFAULT_HEAD
    from tl_embed.heads.training import choose_split

    home = Path(tempfile.mkdtemp())
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)
    methods = [(f"{label} (default)" if head == DEFAULT_HEAD and not options else label, head, options)
               for label, head, options in METHODS if head in heads]
    gains: dict[str, list[float]] = {label: [] for label, _, _ in methods}
    print("\n== real photo sets, genuine ImageNet MobileNetV2 embeddings ==")
    print(f"{'set':<12}{'method':<28}{'accuracy':>9}{'vs ref':>8}{'train s':>9}  chosen")
    for name in sorted(p.name for p in (SHARED / "datasets").iterdir() if p.is_dir()):
        with EmbeddingStore.open(embed_set(name, cache)) as s:
            X, labels, splits, spec = np.asarray(s.embeddings), s.labels, s.splits, s.spec
        tr, te, how = choose_split(labels, splits, 0.2, 0)
        ytr, yte = labels[tr].astype(str), labels[te].astype(str)
        t = time.perf_counter()
        base = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(X[tr], ytr)
        base_s = time.perf_counter() - t
        ref = (base.predict(X[te]) == yte).mean()
        print(f"{name:<12}{'reference C=0.1':<28}{ref:>9.2%}{'':>8}{base_s:>9.2f}  "
              f"{len(tr)} train / {len(te)} test, {how}", flush=True)
        for label, head, options in methods:
            t = time.perf_counter()
            fitted, _ = fit_head(X[tr], ytr, spec, head, **options)
            secs = time.perf_counter() - t
            acc = (fitted.predict(X[te]) == yte).mean()
            gains[label].append(100 * (acc - ref))
            params = ", ".join(f"{k}={v}" for k, v in fitted.params.items())
            print(f"{'':<12}{label:<28}{acc:>9.2%}{100 * (acc - ref):>+8.2f}{secs:>9.2f}  {params}", flush=True)
    print("\nover the sets, points vs the reference:")
    for label, g in gains.items():
        print(f"  {label:<28} mean {np.mean(g):+.2f}  worst {min(g):+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=["svm", "logreg", "knn", "dense"])
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--cache", type=Path, default=None, help="keep the embedded stores here (reused)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(describe_cpu())
    if not args.skip_synthetic:
        bench_synthetic(args.heads)
    if not args.skip_real:
        cache = args.cache or Path(tempfile.mkdtemp())
        cache.mkdir(parents=True, exist_ok=True)
        bench_real(args.heads, cache)


if __name__ == "__main__":
    main()
