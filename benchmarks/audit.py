"""Label-error audit: planted label noise found, next to cleanlab, and what dropping the flagged rows buys.

Each labelled set in ../shared/datasets (flowers5, flowers12, hymenoptera, pets3, sign_digits) is embedded
once with the genuine ImageNet MobileNetV2 (../shared/weights through a temporary KERAS_HOME; stores are
cached in --work).  Its training rows (the store's split, else a seeded stratified 20% hold-out) get
label noise planted at each rate in two ways: ``uniform`` (a random other class) and ``realistic`` (the
other class whose centroid the image's embedding is closest to; with 2 classes, as in hymenoptera, the
kinds coincide).  Out-of-fold probabilities of the
default head (``tl_embed.audit.oof``) are then ranked by

* ``paper``: ``tl_embed.audit.confident.find_label_issues(method="prune_by_noise_rate")``: the paper's
  Prune by Noise Rate ranked by self-confidence (cleanlab's default, reimplemented),
* ``margin``: ``method="margin"``: as many rows, those with the highest normalized-margin suspicion,
* ``+knn``: either with the k-NN view blended in (similarity-weighted labels of the 20 nearest training
  rows, exact cosine); ``margin+knn`` is what ``tl-embed audit`` runs,
* ``cleanlab``: ``cleanlab.filter.find_label_issues(labels, pred_probs, return_indices_ranked_by=
  'self_confidence')`` on the SAME probabilities, run in its own venv (/work/.bench-venvs/cleanlab)
  through a subprocess, so cleanlab (AGPL) is never imported here.

Columns: P@m = precision (= recall) of the top m rows of the ranking, m = the planted count (flagged rows
first, then the rest by score); flags = how many the method flags itself, with their precision P and
recall R; AUROC of the score against the planted rows.  Payoff: test accuracy on the clean held-out
split of the default head trained on the noisy rows, on them less ``margin+knn``'s (or cleanlab's) flags,
on them with ``margin+knn``'s flags relabelled as audit suggests (``train --relabel``, nothing left out), on
them less exactly the planted rows (what a perfect audit would leave), and on clean labels;
``recovered`` = (less flags - noisy) / (clean - noisy), shown when the noise cost at least a point;
``pooled`` sums both over those cells.  Every head of one replicate (seed), the clean one included, is
fitted with that seed's folds (``train --seed``), so the cost is not measured against one lucky draw of C.

    python benchmarks/audit.py [--work DIR] [--seeds 0] [--sets ...] [--rates .05 .1 .2] [--kinds ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_cpu  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETS = ("flowers5", "flowers12", "hymenoptera", "pets3", "sign_digits")
CLEANLAB_PYTHON = Path("/work/.bench-venvs/cleanlab/bin/python")
K_NEIGHBOURS = 20
OURS = {"paper": "prune_by_noise_rate", "paper+knn": "prune_by_noise_rate", "margin": "margin",
        "margin+knn": "margin"}
DEFAULT = "margin+knn"  # what tl-embed audit runs
ORACLE = "the planted rows"  # the payoff's upper bound: exactly the noisy rows left out
RELABEL = "relabelled"  # margin+knn's flags given the label audit suggests (train --relabel), none left out
# run by CLEANLAB_PYTHON: for each job_<i>_labels.npy / job_<i>_proba.npy in the folder, cleanlab's
# ranked issues and its self-confidence quality scores
CLEANLAB_SCRIPT = """
import sys, pathlib, numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
d = pathlib.Path(sys.argv[1])
for f in sorted(d.glob("job_*_labels.npy")):
    job = f.name[:-len("_labels.npy")]
    labels, proba = np.load(f), np.load(d / f"{job}_proba.npy")
    issues = find_label_issues(labels, proba, filter_by="prune_by_noise_rate",
                               return_indices_ranked_by="self_confidence")
    np.save(d / f"{job}_issues.npy", np.asarray(issues, dtype=np.int64))
    np.save(d / f"{job}_scores.npy", 1 - get_label_quality_scores(labels, proba, method="self_confidence"))
"""


def keras_home() -> None:
    """Point Keras at the genuine weights through a temporary KERAS_HOME (before anything imports keras)."""
    home = Path(tempfile.mkdtemp(prefix="keras_home_"))
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)


def load_set(name: str, work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], str]:
    """Embeddings (float32), int labels, train and held-out indices, class names, how it was split."""
    from tl_embed import EmbeddingStore, embed_folder
    from tl_embed.heads.training import choose_split

    out = work / f"{name}.tle"
    embed_folder(SHARED / "datasets" / name, out, progress=False)  # a no-op on a cached, complete store
    with EmbeddingStore.open(out) as s:
        X, labels, splits = np.asarray(s.embeddings, dtype=np.float32), s.labels, s.splits
    tr, te, how = choose_split(labels, splits, 0.2, 0)
    classes = sorted({str(v) for v in labels[tr]})
    y = np.array([classes.index(str(v)) for v in labels])
    return X, y, tr, te, classes, how


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def nearest(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of every row among the others: (indices, similarities), nearest first."""
    U = unit(X)
    sims = U @ U.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argpartition(-sims, k, axis=1)[:, :k]
    part = np.take_along_axis(sims, idx, axis=1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def plant(X: np.ndarray, y: np.ndarray, k: int, rate: float, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the indices changed: ``rate`` of the rows, each to another class."""
    rng = np.random.default_rng(seed)
    changed = np.sort(rng.choice(len(y), int(round(rate * len(y))), replace=False))
    noisy = y.copy()
    if kind == "uniform":
        shift = rng.integers(1, k, len(changed))  # any class but its own, uniformly
        noisy[changed] = (y[changed] + shift) % k
    else:
        centroids = unit(np.stack([unit(X[y == c]).mean(0) for c in range(k)]))
        sims = unit(X[changed]) @ centroids.T
        sims[np.arange(len(changed)), y[changed]] = -np.inf
        noisy[changed] = sims.argmax(1)
    return noisy, changed


def scores(flagged: np.ndarray, score: np.ndarray, planted: np.ndarray) -> dict[str, float]:
    """P@m, the flagged set's size, precision and recall, and the score's AUROC against ``planted``."""
    from sklearn.metrics import roc_auc_score

    truth = np.zeros(len(score), dtype=bool)
    truth[planted] = True
    rest = np.setdiff1d(np.arange(len(score)), flagged)
    ranking = np.concatenate([flagged, rest[np.argsort(-score[rest], kind="stable")]])
    m = len(planted)
    hits = truth[flagged].sum()
    return {"P@m": truth[ranking[:m]].mean(), "flags": len(flagged), "P": hits / max(len(flagged), 1),
            "R": hits / m, "AUROC": roc_auc_score(truth, score)}


def run_cleanlab(jobs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """cleanlab's (ranked issues, suspicion scores) for each (labels, proba), or None without its venv."""
    if not CLEANLAB_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        for i, (labels, proba) in enumerate(jobs):
            np.save(Path(d) / f"job_{i:03d}_labels.npy", labels)
            np.save(Path(d) / f"job_{i:03d}_proba.npy", proba)
        subprocess.run([str(CLEANLAB_PYTHON), "-c", CLEANLAB_SCRIPT, d], check=True)
        return [(np.load(Path(d) / f"job_{i:03d}_issues.npy"), np.load(Path(d) / f"job_{i:03d}_scores.npy"))
                for i in range(len(jobs))]


def accuracy(X: np.ndarray, y: np.ndarray, Xte: np.ndarray, yte: np.ndarray, seed: int) -> float:
    """Held-out accuracy of the default head trained as ``train --seed SEED`` trains it.

    The seed draws the folds that choose C and the transform; that choice alone moves flowers12's clean
    accuracy between 96.7% and 98.3%, so every arm of one replicate, clean labels included, shares it.
    """
    from tl_embed.heads.estimator import features_spec
    from tl_embed.heads.fit import fit_head

    head, _ = fit_head(X, y.astype(str), features_spec(X.shape[1]), seed=seed)
    return float((head.predict(Xte) == yte.astype(str)).mean())


def relabelled(noisy: np.ndarray, proba: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """``noisy`` with each flagged row given audit's suggestion: its most probable other class out of fold."""
    others = proba[flagged].copy()
    others[np.arange(len(flagged)), noisy[flagged]] = -1
    out = noisy.copy()
    out[flagged] = others.argmax(1)
    return out


def bench_set(name: str, work: Path, seeds: list[int], rates: list[float], kinds: list[str],
              results: dict, timings: dict) -> None:
    from tl_embed.audit.confident import METHODS, find_label_issues, label_quality, neighbour_label_proba
    from tl_embed.audit.oof import out_of_fold_proba

    X, y, tr, te, classes, how = load_set(name, work)
    Xtr, ytr, k = X[tr], y[tr], len(classes)
    print(f"\n{name}: {len(tr)} train / {len(te)} held out ({how}), {k} classes", flush=True)
    nbr, sims = nearest(Xtr, K_NEIGHBOURS)
    configs, jobs = [], []
    for seed in seeds:
        clean_acc = accuracy(Xtr, ytr, X[te], y[te], seed)
        for kind in kinds:
            for rate in rates:
                noisy, planted = plant(Xtr, ytr, k, rate, kind, seed)
                t = time.perf_counter()
                proba, names = out_of_fold_proba(Xtr, noisy, seed=seed)
                timings[name].append(time.perf_counter() - t)
                proba = proba[:, np.argsort([int(c) for c in names])]  # columns back to class index order
                q = neighbour_label_proba(nbr, sims, noisy, k)
                row: dict = {"m": len(planted)}
                flags = {}
                for label, method in OURS.items():
                    view = q if label.endswith("+knn") else None
                    flags[label] = find_label_issues(noisy, proba, view, method)
                    score = label_quality(noisy, proba, METHODS[method], view)
                    row[label] = scores(flags[label], score, planted)
                keep = np.setdiff1d(np.arange(len(ytr)), flags[DEFAULT])
                truth = np.setdiff1d(np.arange(len(ytr)), planted)
                row["payoff"] = {"clean": clean_acc, "noisy": accuracy(Xtr, noisy, X[te], y[te], seed),
                                 DEFAULT: accuracy(Xtr[keep], noisy[keep], X[te], y[te], seed),
                                 RELABEL: accuracy(Xtr, relabelled(noisy, proba, flags[DEFAULT]), X[te], y[te],
                                                   seed),
                                 ORACLE: accuracy(Xtr[truth], noisy[truth], X[te], y[te], seed)}
                configs.append(((name, kind, rate), row, planted, noisy, seed))
                jobs.append((noisy, proba))
                p = row["payoff"]
                print(f"  seed {seed} {kind:<9} {rate:>4.0%}: OOF {timings[name][-1]:5.1f} s, P@m paper "
                      f"{row['paper']['P@m']:.3f} {DEFAULT} {row[DEFAULT]['P@m']:.3f}; accuracy noisy "
                      f"{p['noisy']:.2%} less flags {p[DEFAULT]:.2%} clean {p['clean']:.2%}", flush=True)
    cl = run_cleanlab(jobs)
    for i, (key, row, planted, noisy, seed) in enumerate(configs):
        if cl is not None:
            row["cleanlab"] = scores(cl[i][0], cl[i][1], planted)
            keep = np.setdiff1d(np.arange(len(ytr)), cl[i][0])
            row["payoff"]["cleanlab"] = accuracy(Xtr[keep], noisy[keep], X[te], y[te], seed)
        results[key].append(row)


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)}±{format(np.std(values), fmt)}"


def cost(pay: dict[str, list[float]]) -> float:
    """The accuracy the planted noise cost, mean over replicates."""
    return float(np.mean(pay["clean"]) - np.mean(pay["noisy"]))


def share(pay: dict[str, list[float]], key: str) -> float | None:
    """The share of the accuracy the noise cost that ``key``'s training rows won back (None: it cost < 1 point)."""
    return float((np.mean(pay[key]) - np.mean(pay["noisy"])) / cost(pay)) if cost(pay) >= 0.01 else None


def pooled(pays: list[dict[str, list[float]]], key: str) -> str:
    """Accuracy won back over accuracy lost, summed over ``pays`` (the cells): overall and per replicate."""
    won = np.array([np.subtract(pay[key], pay["noisy"]) for pay in pays])  # (cells, replicates)
    lost = np.array([np.subtract(pay["clean"], pay["noisy"]) for pay in pays])
    per = won.sum(0) / lost.sum(0)
    return f"pooled {won.sum() / lost.sum():.0%} of the points lost (per replicate {mean_std(list(per), '.0%')})"


def recovered(pay: dict[str, list[float]], key: str) -> str:
    got = share(pay, key)
    return f"n/a (cost {100 * cost(pay):+.2f} pt)" if got is None else f"{got:.0%}"


def print_tables(results: dict, timings: dict) -> None:
    have_cl = all("cleanlab" in r for rows in results.values() for r in rows)
    methods = [*OURS, *(["cleanlab"] if have_cl else [])]
    head = "| set | noise | m | " + " | ".join(methods) + " |\n|---|---|---|" + "---|" * len(methods)
    tables = (("P@m: precision (= recall) of the top m = planted count", lambda g: mean_std(g["P@m"], ".3f")),
              ("the method's own flags: count (precision / recall)",
               lambda g: f"{mean_std(g['flags'], '.0f')} ({mean_std(g['P'], '.2f')} / {mean_std(g['R'], '.2f')})"),
              ("AUROC of the score against the planted rows", lambda g: mean_std(g["AUROC"], ".3f")))
    for title, cell in tables:
        print(f"\n== {title} ==\n{head}")
        for (name, kind, rate), rows in results.items():
            cells = [cell({metric: [r[meth][metric] for r in rows] for metric in rows[0][meth]}) for meth in methods]
            print(f"| {name} | {kind} {rate:.0%} | {rows[0]['m']} | " + " | ".join(cells) + " |")
    paid = [DEFAULT, *(["cleanlab"] if have_cl else []), RELABEL, ORACLE]
    print("\n== payoff: held-out accuracy of the default head trained on ... ==")
    less = " | ".join(f"less {m}" if m == ORACLE else m if m == RELABEL else f"less {m}'s flags" for m in paid)
    print(f"| set | noise | noisy labels | {less} | clean labels | "
          + " | ".join(f"recovered ({m})" for m in paid) + " |\n|---|---|" + "---|" * (2 + 2 * len(paid)))
    for (name, kind, rate), rows in results.items():
        pay = {key: [r["payoff"][key] for r in rows] for key in rows[0]["payoff"]}
        accs = " | ".join(mean_std(pay[key], ".2%") for key in ("noisy", *paid, "clean"))
        print(f"| {name} | {kind} {rate:.0%} | {accs} | " + " | ".join(recovered(pay, m) for m in paid) + " |")
    print("\n== summary over set x noise combinations (each the mean over seeds) ==")
    pays = [{key: [r["payoff"][key] for r in rows] for key in rows[0]["payoff"]} for rows in results.values()]
    costly = [pay for pay in pays if cost(pay) >= 0.01]
    for m in paid:
        got = [share(pay, m) for pay in costly]
        what = m if m == RELABEL else f"less {m}"
        print(f"  payoff, {what}: of the {len(got)} combinations where the noise cost >= 1 point, "
              f"{sum(g >= 0.5 for g in got)} recovered half or more"
              + (f" (median {np.median(got):.0%}); {pooled(costly, m)}" if got else ""))
    pairs = [("paper+knn", "paper"), ("margin", "paper"), ("margin+knn", "paper")]
    pairs += [("paper", "cleanlab"), (DEFAULT, "cleanlab")] if have_cl else []
    for a, b in pairs:
        for metric in ("P@m", "P", "R", "AUROC"):
            diff = [np.mean([r[a][metric] for r in rows]) - np.mean([r[b][metric] for r in rows])
                    for rows in results.values()]
            print(f"  {a} vs {b} {metric}: >= on {sum(d >= -1e-12 for d in diff)}/{len(diff)}, > on "
                  f"{sum(d > 1e-12 for d in diff)}, mean {np.mean(diff):+.4f}, worst {min(diff):+.4f}")
    print("\nout-of-fold seconds per run: " + ", ".join(f"{n} {np.mean(t):.1f} (n={len(t)})"
                                                        for n, t in timings.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="cache the embedded stores here (reused)")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--kinds", nargs="+", default=["uniform", "realistic"], choices=["uniform", "realistic"])
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(describe_cpu())
    if not CLEANLAB_PYTHON.exists():
        print(f"cleanlab's venv {CLEANLAB_PYTHON.parent.parent} is missing: cleanlab columns are left out "
              f"(create it: python3 -m venv {CLEANLAB_PYTHON.parent.parent} && "
              f"{CLEANLAB_PYTHON.parent}/pip install cleanlab numpy scikit-learn)")
    keras_home()
    work = args.work or Path(tempfile.mkdtemp(prefix="audit_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = defaultdict(list)
    timings: dict = defaultdict(list)
    t0 = time.perf_counter()
    for name in args.sets:
        bench_set(name, work, args.seeds, args.rates, args.kinds, results, timings)
    print_tables(results, timings)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
