"""Better search from the same backbone: descriptors (GeM, R-MAC), whitening, αDBA and αQE against plain
average pooling and cosine, on real photo sets; and what each descriptor does to the default head.

    python benchmarks/retrieval.py [--work /tmp/tl-embed-retrieval-bench] [--sets nyala_reid paris ...]
                                   [--poolings avg gem rmac rmac@1,1.414] [--few-rows]

Every set in ../shared/datasets is embedded once per descriptor with the genuine ImageNet MobileNetV2
(through a temporary KERAS_HOME) into ``--work`` (a rerun reuses the stores).  A descriptor is a
``--pooling``, optionally with ``@`` and ``--scales`` (multi-scale: ``rmac@1,1.414``).  Retrieval sets:

* ``nyala_reid``: 58 individual antelopes, 729 photos; every photo a query against all the others,
  relevant = the same individual (re-identification).
* ``paris``: ``paris_landmarks/db`` (250 photos of landmarks) and its ``queries`` (25), embedded as
  two stores; the queries against the database, relevant = the same landmark.
* the classification sets as class-level retrieval: every photo against all others, relevant = the
  same label.

Each row builds an exact (Flat) index with ``Index.build`` and scores it with ``evaluate_search``: mAP
and recall@1 (and @5 for paris), in %.  Latency: the median of 200 single queries (``search_scored``
with k=10, one FAISS thread: mapping, whitening and expansion included) on the largest set, and the
largest ratio to the baseline's over all sets.  Rows, for average pooling: the baseline, each option
alone, then the combinations of centring onto 256 principal components (``--whiten-power 0 --whiten-dim
256``) with DBA and QE; for every other descriptor: plain, and the combinations the average-pooling rows
found best.  At the end the best row (mean mAP over the sets) and the rows that are at least the
baseline's mAP and recall@1 on every set at no more than twice its latency (the bar for changing a
default).  A descriptor costs nothing at query time (it is computed in the same inference); its embed
rate is printed beside the head table (a multi-scale descriptor costs one backbone pass per scale).

Heads: ``tl_embed.train`` (the default head) on each classification set's store per descriptor; held-out
accuracy on the set's own test split, or, for a set without one, the mean and standard deviation over
three seeds of the 20% split ``train`` holds out.
"""

from __future__ import annotations

import argparse
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

CLASS_SETS = ("flowers12", "flowers5", "hymenoptera", "pets3", "sign_digits")
SETS = ("nyala_reid", "paris", *CLASS_SETS)
LATENCY_QUERIES = 200

# (row name, index options, search qe)
SINGLE = [("baseline", {}, 0), ("whiten", {"whiten": True}, 0), ("whiten-dim 512", {"whiten_dim": 512}, 0),
          ("whiten-dim 256", {"whiten_dim": 256}, 0), ("whiten-power 0.25", {"whiten_power": 0.25}, 0),
          ("whiten-power 0 (centre)", {"whiten_power": 0.0}, 0),
          ("centre, whiten-dim 256", {"whiten_power": 0.0, "whiten_dim": 256}, 0)]
SINGLE += [(f"dba {n}", {"dba": n}, 0) for n in (1, 2, 3, 5)] + [(f"qe {n}", {}, n) for n in (1, 2, 5, 10)]
CENTRE = {"whiten_power": 0.0, "whiten_dim": 256}
COMBOS = [(f"centre 256{f', dba {d}' if d else ''}{f', qe {q}' if q else ''}", {**CENTRE, "dba": d}, q)
          for d in (0, 1, 2, 3) for q in (0, 1, 2) if d or q]
OTHER_ROWS = [("plain", {}, 0), ("centre, whiten-dim 256", CENTRE, 0),
              ("centre 256, dba 2", {**CENTRE, "dba": 2}, 0), ("centre 256, dba 2, qe 2", {**CENTRE, "dba": 2}, 2),
              ("centre 256, dba 3, qe 2", {**CENTRE, "dba": 3}, 2)]
POOLINGS = ("avg", "gem", "rmac")  # the default descriptors; any "POOLING@SCALES" is accepted too
HEAD_SEEDS = (0, 1, 2)


def keras_home() -> None:
    """The genuine weights through a temporary KERAS_HOME (../shared is never written)."""
    home = Path(tempfile.mkdtemp(prefix="tl-embed-keras-"))
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)


EMBED_RATES: dict[str, list[float]] = {}  # descriptor -> images/s of the embeddings made in this run


def descriptor(text: str) -> str:
    """``POOLING`` or ``POOLING@SCALES``, checked, the scales written as the spec records them."""
    from tl_embed.embedding.pooling import check_scales

    pooling, _, scales = text.partition("@")
    if pooling not in POOLINGS:
        raise argparse.ArgumentTypeError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    scales = check_scales(scales or "1")
    return pooling if scales == "1" else f"{pooling}@{scales}"


def file_part(desc: str) -> str:
    """How a descriptor names its stores and indexes: avg keeps the names of earlier runs' files."""
    return "" if desc == "avg" else "-" + desc.replace("@", "-ms").replace(",", "_")


def store_for(name: str, folder: Path, work: Path, desc: str) -> Path:
    """The set's store in ``work``, embedded now unless an earlier run left it complete."""
    from tl_embed import embed_folder

    pooling, _, scales = desc.partition("@")
    name = f"{name}{file_part(desc)}"
    out, done = work / f"{name}.tle", work / f"{name}.done"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        report = embed_folder(folder, out, model="mobilenet_v2", pooling=pooling, scales=scales or "1",
                              progress=False)
        EMBED_RATES.setdefault(desc, []).append(report.embedded / report.embed_seconds)
        print(f"embedded {name}: {report.embedded} images in {report.seconds:.0f} s ({report.runtime})", flush=True)
        done.touch()
    return out


def stores(sets: list[str], work: Path, pooling: str) -> dict[str, tuple[Path, Path | None]]:
    """Per set: (database store, query store or None for all-against-all)."""
    data = SHARED / "datasets"
    out = {}
    for name in sets:
        if name == "paris":
            out[name] = (store_for("paris_db", data / "paris_landmarks" / "db", work, pooling),
                         store_for("paris_queries", data / "paris_landmarks" / "queries", work, pooling))
        else:
            out[name] = (store_for(name, data / name, work, pooling), None)
    return out


def head_accuracy(store: Path, work: Path) -> tuple[float, float]:
    """The default head's held-out accuracy in %: (mean, std over seeds; 0 for a set with its own test split)."""
    from tl_embed import EmbeddingStore, train

    with EmbeddingStore.open(store, "r") as s:
        split = "test" in set(s.splits) or "val" in set(s.splits)
    accs = [100 * train(store, work / "bench-head.tlh", seed=seed).metrics["accuracy"]
            for seed in (HEAD_SEEDS[:1] if split else HEAD_SEEDS)]
    return float(np.mean(accs)), float(np.std(accs))


def latency_ms(index, store: Path, qe: int, own: bool) -> float:
    """Median ms of one query searched alone (k=10), from a stored raw vector (``own``: of the index's store,
    so its own image is excluded)."""
    from tl_embed import EmbeddingStore

    with EmbeddingStore.open(store, "r") as s:
        rows = np.linspace(0, len(s) - 1, min(LATENCY_QUERIES, len(s))).round().astype(np.int64)
        vectors, ids = s.take(rows), s.ids[rows]
    times = []
    for v, i in zip(vectors, ids, strict=True):
        t = time.perf_counter()
        index.search_scored(v[None, :], 10, qe, [int(i) if own else None])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def measure(row: tuple[str, dict, int], data: dict, work: Path, pooling: str) -> dict:
    from tl_embed.search import Index, evaluate_search

    name, options, qe = row
    out = {"name": name if pooling == "avg" else f"{pooling}: {name}", "sets": {}, "ms": {}}
    for set_name, (db, queries) in data.items():
        index_path = work / f"{set_name}{file_part(pooling)}.tli"
        index = Index.build(db, index_path, "flat", log=lambda *_: None, **options)
        scores = evaluate_search(index, queries, qe=qe)
        out["sets"][set_name] = (100 * scores.mean_ap, 100 * scores.recall[1], 100 * scores.recall[5])
        out["ms"][set_name] = latency_ms(index, queries or db, qe, queries is None)
    return out


def cells(r: dict, sets: list[str]) -> str:
    parts = []
    for s in sets:
        m, r1, r5 = r["sets"][s]
        parts.append(f"{m:5.1f} {r1:5.1f}" + (f" {r5:5.1f}" if s == "paris" else ""))
    return "  ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tl-embed-retrieval-bench")
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    ap.add_argument("--poolings", nargs="+", type=descriptor, default=list(POOLINGS),
                    help="descriptors: avg, gem, rmac, each optionally @SCALES (e.g. rmac@1,1.414)")
    ap.add_argument("--few-rows", action="store_true",
                    help="average pooling too gets only the rows every other descriptor gets (plain first)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TL_EMBED_CACHE", str(args.work / "converted"))
    keras_home()
    print(describe_cpu())
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    data = {pooling: stores(args.sets, args.work, pooling) for pooling in args.poolings}
    import faiss

    faiss.omp_set_num_threads(1)  # single-query latency without OpenMP's spinning threads
    first = data[args.poolings[0]]
    largest = max(args.sets, key=lambda s: _count(first[s][0]))
    heads = "  ".join(f"{s[:11]:>11}" if s != "paris" else f"{'paris':>17}" for s in args.sets)
    print(f"MobileNetV2 (genuine ImageNet weights); exact (Flat) cosine indexes; per set mAP and "
          f"recall@1 in % (paris also recall@5); ms: median single-query latency on {largest} "
          f"({_count(first[largest][0])} vectors); x: the largest latency ratio to the baseline over the sets")
    print(f"{'row':<38}{heads}  {'ms':>6} {'x':>5}")
    print(f"{'':<38}" + "  ".join(f"{'mAP':>5} {'R@1':>5}" + (f" {'R@5':>5}" if s == "paris" else "")
                                   for s in args.sets))
    rows = []
    plan = [(pooling, row) for pooling in args.poolings
            for row in ((SINGLE + COMBOS) if pooling == "avg" and not args.few_rows else OTHER_ROWS)]
    for pooling, row in plan:
        r = measure(row, data[pooling], args.work, pooling)
        base = rows[0] if rows else r
        r["ratio"] = max(r["ms"][s] / base["ms"][s] for s in args.sets)
        r["mean_map"] = float(np.mean([r["sets"][s][0] for s in args.sets]))
        r["wins"] = all(r["sets"][s][0] >= base["sets"][s][0] and r["sets"][s][1] >= base["sets"][s][1]
                        for s in args.sets) and r["ratio"] <= 2
        rows.append(r)
        print(f"{r['name']:<38}{cells(r, args.sets)}  {r['ms'][largest]:6.2f} {r['ratio']:5.2f}", flush=True)
    best = max(rows, key=lambda r: r["mean_map"])
    print(f"best row by mean mAP over the sets: {best['name']} ({best['mean_map']:.1f} against the baseline's "
          f"{rows[0]['mean_map']:.1f}; latency x{best['ratio']:.2f})")
    winners = sorted((r for r in rows[1:] if r["wins"]), key=lambda r: -r["mean_map"])
    print("rows at least the baseline's mAP and recall@1 on every set at <= 2x latency: "
          + (", ".join(f"{r['name']} (mean mAP {r['mean_map']:.1f}, x{r['ratio']:.2f})" for r in winners) or "none"))
    print_heads(data, args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def print_heads(data: dict, args) -> None:
    """The default head's held-out accuracy per descriptor on each classification set, and the embed rates."""
    sets = [s for s in args.sets if s in CLASS_SETS]
    if not sets:
        return
    print("\ndefault head, held-out accuracy % (mean ± std over seeds 0-2 where the set has no test split); "
          "embed images/s of the stores made in this run")
    print(f"{'descriptor':<16}" + "".join(f"{s:>16}" for s in sets) + f"{'mean':>8}{'img/s':>8}")
    for pooling in args.poolings:
        accs = [head_accuracy(data[pooling][s][0], args.work) for s in sets]
        rate = f"{np.mean(EMBED_RATES[pooling]):.1f}" if pooling in EMBED_RATES else "-"  # stores of an earlier run
        print(f"{pooling:<16}" + "".join(f"{m:>9.1f} ± {sd:3.1f}" for m, sd in accs)
              + f"{np.mean([m for m, _ in accs]):>8.1f}{rate:>8}", flush=True)


def _count(store: Path) -> int:
    from tl_embed import EmbeddingStore

    with EmbeddingStore.open(store, "r") as s:
        return len(s)


if __name__ == "__main__":
    main()
