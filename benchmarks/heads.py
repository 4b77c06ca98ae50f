"""Head training time and accuracy: synthetic features, then every labelled set in ../shared.

Synthetic: 50 000 x 1280 clustered training features (10 and 100 classes) + 10 000 test rows.
Real: each set embedded with the genuine ImageNet MobileNetV2 (../shared/weights via a temporary
KERAS_HOME), then each tl-embed head with its defaults (CV-chosen hyper-parameters) next to the plain
baseline StandardScaler + LogisticRegression(C=0.1), on the same split (the set's own, else a seeded
stratified 20% hold-out).

    python benchmarks/heads.py [--heads logreg svm knn] [--skip-synthetic] [--skip-real] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters that overlap enough that accuracy is not trivially 100%."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = centers[y] * 0.06 + rng.normal(0, 1, (n, dim)).astype(np.float32)
    return X, y.astype(str)


def bench_synthetic(heads: list[str]) -> None:
    from tl_embed.embedding.backbones import BackboneSpec
    from tl_embed.heads.fit import fit_head

    spec = BackboneSpec("synthetic", "random", "random", 224, "none", "avg", 1280)
    print(f"\n== synthetic 50 000 x 1280 ({os.cpu_count()} cores): train 50 000, test 10 000 ==")
    for classes in (10, 100):
        X, y = synthetic(60_000, 1280, classes)
        for head in heads:
            t = time.perf_counter()
            fitted, info = fit_head(X[:50_000], y[:50_000], spec, head)
            secs = time.perf_counter() - t
            acc = (fitted.predict(X[50_000:]) == y[50_000:]).mean()
            print(f"{classes:>4} classes  {head:<7} train {secs:6.1f} s (CV search {info['search_seconds']:.1f} s "
                  f"+ final fit {info['fit_seconds']:.1f} s)  test accuracy {acc:.2%}  params {fitted.params}")


def embed_set(name: str, cache: Path) -> Path:
    from tl_embed.embedding.embed import embed_folder

    out = cache / f"{name}.tle"
    embed_folder(SHARED / "datasets" / name, out, model="mobilenet_v2", progress=False)
    return out


def bench_real(heads: list[str], cache: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tl_embed.embedding.store import EmbeddingStore
    from tl_embed.heads.fit import fit_head
    from tl_embed.heads.metrics import evaluate_predictions
    from tl_embed.heads.training import choose_split

    home = Path(tempfile.mkdtemp())
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)
    print("\n== real photo sets, genuine ImageNet MobileNetV2 embeddings ==")
    print(f"{'set':<12}{'split':<36}{'method':<34}{'accuracy':>9}{'train s':>9}")
    for name in sorted(p.name for p in (SHARED / "datasets").iterdir() if p.is_dir()):
        with EmbeddingStore.open(embed_set(name, cache)) as s:
            X, labels, splits, spec = np.asarray(s.embeddings), s.labels, s.splits, s.spec
        tr, te, how = choose_split(labels, splits, 0.2, 0)
        ytr, yte = labels[tr].astype(str), labels[te].astype(str)
        t = time.perf_counter()
        base = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(X[tr], ytr)
        base_s = time.perf_counter() - t
        print(f"{name:<12}{how:<36}{'baseline scaler+logreg C=0.1':<34}"
              f"{(base.predict(X[te]) == yte).mean():>9.2%}{base_s:>9.2f}")
        for head in heads:
            t = time.perf_counter()
            fitted, _ = fit_head(X[tr], ytr, spec, head)
            secs = time.perf_counter() - t
            m = evaluate_predictions(yte, fitted.predict(X[te]), fitted.classes)
            label = f"tl-embed {head} {fitted.params}"
            print(f"{'':<12}{'':<36}{label:<34}{m.accuracy:>9.2%}{secs:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=["logreg", "svm", "knn"])
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--cache", type=Path, default=None, help="keep the embedded stores here (reused)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.skip_synthetic:
        bench_synthetic(args.heads)
    if not args.skip_real:
        cache = args.cache or Path(tempfile.mkdtemp())
        cache.mkdir(parents=True, exist_ok=True)
        bench_real(args.heads, cache)


if __name__ == "__main__":
    main()
