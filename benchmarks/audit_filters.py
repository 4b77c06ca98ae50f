"""Why leaving audit's flags out wins back less than leaving the planted rows out, and whether a stricter rule helps.

``audit.py`` measures the payoff of ``train --exclude`` with audit's flags at 37% of the points the noise
cost (pooled over seeds 3-8), against 68-90% for exactly the planted rows.  This script splits that gap on
the same sets, noise and heads (everything imported from ``audit.py``) by leaving out, from the noisy rows:

* ``flags``: audit's flags (``margin+knn``, what ``tl-embed audit`` lists),
* ``flagged planted``: only the flags that were planted (no clean row left out, the misses kept),
* ``flags + missed``: the flags and every planted row they missed (all noise gone, the clean flags too),
* ``planted``: exactly the planted rows,

and by three stricter rules from the literature that keep a flag only when a second view agrees:

* ``consensus``: the k-NN view alone also disputes the label (Brodley & Friedl 1999's consensus filter,
  with two views),
* ``agree``: the head and the k-NN view each put the same other class first,
* ``both``: the row also sits off the confident joint's diagonal: another class reaches its threshold
  (Northcutt et al. 2021's C_confusion rule; cleanlab's ``filter_by='both'`` intersects the two likewise).

``share`` = (accuracy less the rows - accuracy on the noisy rows) / (accuracy on clean labels - accuracy on
the noisy rows), pooled: summed over every cell and seed, whatever the cost.

    python benchmarks/audit_filters.py [--work DIR] [--seeds 0 1 2] [--sets sign_digits flowers5]
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
import audit as bench  # noqa: E402
from machine import describe_cpu  # noqa: E402

ARMS = ("flags", "flagged planted", "flags + missed", "planted", "consensus", "agree", "both")
CELLS = (("uniform", 0.1), ("uniform", 0.2), ("realistic", 0.1), ("realistic", 0.2))


def off_diagonal(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Rows the confident joint counts off its diagonal: another class reaches its own threshold (Sec. 3.1)."""
    from tl_embed.audit.confident import TOLERANCE

    thresholds = np.array([proba[labels == j, j].mean() for j in range(proba.shape[1])])
    above = proba >= thresholds - TOLERANCE
    guess = np.where(above, proba, -np.inf).argmax(axis=1)
    return above.any(axis=1) & (guess != labels)


def left_out(noisy: np.ndarray, planted: np.ndarray, proba: np.ndarray, q: np.ndarray) -> dict[str, np.ndarray]:
    """For each arm, the training rows it leaves out."""
    from tl_embed.audit.confident import blend, find_label_issues

    flags = find_label_issues(noisy, proba, q, "margin")
    head_says, knn_says = proba.argmax(1), q.argmax(1)
    return {"flags": flags, "flagged planted": np.intersect1d(flags, planted),
            "flags + missed": np.union1d(flags, planted), "planted": planted,
            "consensus": flags[knn_says[flags] != noisy[flags]],
            "agree": flags[(knn_says[flags] == head_says[flags]) & (head_says[flags] != noisy[flags])],
            "both": flags[off_diagonal(noisy, blend(proba, q))[flags]]}


def bench_set(name: str, work: Path, seeds: list[int], won: dict[str, float], lost: list[float]) -> None:
    from tl_embed.audit.confident import neighbour_label_proba
    from tl_embed.audit.oof import out_of_fold_proba

    X, y, tr, te, classes, how = bench.load_set(name, work)
    Xtr, ytr, Xte, yte, k = X[tr], y[tr], X[te], y[te], len(classes)
    print(f"\n{name}: {len(tr)} train / {len(te)} held out ({how}), {k} classes", flush=True)
    nbr, sims = bench.nearest(Xtr, bench.K_NEIGHBOURS)
    for seed in seeds:
        clean = bench.accuracy(Xtr, ytr, Xte, yte, seed)
        for kind, rate in CELLS:
            noisy, planted = bench.plant(Xtr, ytr, k, rate, kind, seed)
            proba, names = out_of_fold_proba(Xtr, noisy, seed=seed)
            proba = proba[:, np.argsort([int(c) for c in names])]
            q = neighbour_label_proba(nbr, sims, noisy, k)
            rows = left_out(noisy, planted, proba, q)
            base = bench.accuracy(Xtr, noisy, Xte, yte, seed)
            lost.append(clean - base)
            line = []
            for arm in ARMS:
                keep = np.setdiff1d(np.arange(len(ytr)), rows[arm])
                gain = bench.accuracy(Xtr[keep], noisy[keep], Xte, yte, seed) - base
                won[arm] += gain
                hits = int(np.isin(rows[arm], planted).sum())
                line.append(f"{arm} {len(rows[arm])}/{hits} {100 * gain:+.2f}")
            print(f"  seed {seed} {kind:<9} {rate:>4.0%} (planted {len(planted)}): cost {100 * (clean - base):+.2f} "
                  f"pt; left out/planted among them, points won: " + " | ".join(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="cache the embedded stores here (reused)")
    ap.add_argument("--sets", nargs="+", default=["sign_digits", "flowers5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(describe_cpu())
    bench.keras_home()
    work = args.work or Path(tempfile.mkdtemp(prefix="audit_filters_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in args.sets:
        won: dict[str, float] = dict.fromkeys(ARMS, 0.0)
        lost: list[float] = []
        bench_set(name, work, args.seeds, won, lost)
        print(f"{name}, pooled share won back over {len(lost)} cells x seeds: "
              + ", ".join(f"{arm} {won[arm] / sum(lost):.0%}" for arm in ARMS), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
