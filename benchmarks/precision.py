"""``embed --precision int8`` (and bf16 where the CPU has it) against fp32: quality, accuracy, speed.

    python benchmarks/precision.py [--work /tmp/tl-embed-precision-bench] [--sets flowers12 nyala_reid ...]
                                   [--speed-set flowers5] [--speed-images 500]

Every set (the five classification sets of ../shared/datasets and ``nyala_reid``) is embedded with the
genuine ImageNet MobileNetV2 (through a temporary KERAS_HOME) four times, by ``tl_embed.embed_folder`` as
a user would: fp32, int8, fp32 + ``--tta flip`` and int8 + flip (bf16 and bf16 + flip too where the CPU has
native bf16; elsewhere ``embed --precision bf16`` is refused, and so is it here).  Stores are kept in
``--work`` (``NAME-VARIANT.tle``, its ``.done`` file holding that run's report): a rerun reuses them and
their recorded times (delete a ``.done`` to embed that store again).  Before the first embedding, a
2-image folder is embedded fp32 and int8, so TensorFlow, NNCF and the fp32 conversion are not counted in
the first set's times.  Tables:

1. Speed, end to end: img/s = ``report.embedded / report.embed_seconds`` (decode + inference, model set-up
   excluded) for each store; "int8 extra" = int8's set-up minus fp32's, where set-up = ``report.seconds -
   report.embed_seconds``: what calibration (100 images decoded), NNCF quantization and the 32-image
   fidelity check add to a new store.
2. Quality against fp32 on the same images (stores aligned by path): cosine of each image's two
   embeddings (median, 1st percentile); top-10 neighbour overlap (exact cosine kNN within the set, itself
   excluded: mean |top10 ∩ top10| / 10); and the fidelity line ``embed`` printed for the store.
3. The default head (``tl_embed.train``): held-out accuracy on the set's own test (else val) split, or the
   mean ± std over seeds 0, 1, 2 of the 20% hold-out ``train`` draws; the difference to fp32 paired by
   seed.  ``nyala_reid`` (re-identification, no classes to train on): mAP of an exact index
   (``Index.build`` + ``evaluate_search``, every photo against the others) instead.
4. Model only: ``--speed-images`` photos of ``--speed-set`` decoded once (``load_image``), then the runtime
   a query of each store gets (``runtime_for(store.spec)``; the int8 one installed from the store) on the
   same uint8 batches of 64, precisions alternating, 3 repeats: median img/s and int8 / fp32.  Its output is
   checked against the store's own rows for those photos (minimum cosine).

At the end, the issue's rule: a reduced precision may become ``auto`` only if on EVERY set the default
head loses at most 0.3 points (nyala_reid: mAP, in points) and the top-10 overlap is at least 0.9.
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

CLASS_SETS = ("flowers12", "flowers5", "hymenoptera", "pets3", "sign_digits")
RETRIEVAL_SETS = ("nyala_reid",)
SETS = (*CLASS_SETS, *RETRIEVAL_SETS)
SEEDS = (0, 1, 2)
TOP_K = 10
BATCH = 64
REPEATS = 3
MAX_HEAD_LOSS = 0.3  # points
MIN_OVERLAP = 0.9


def keras_home() -> None:
    """The genuine weights through a temporary KERAS_HOME (../shared is never written)."""
    home = Path(tempfile.mkdtemp(prefix="tl-embed-keras-"))
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)


def variant(precision: str, tta: str) -> str:
    return precision if tta == "none" else f"{precision}+flip"


def warm_up(work: Path, precisions: list[str]) -> None:
    """Embed 2 photos in each precision into a throw-away store: one-time imports and the fp32 conversion."""
    from tl_embed import embed_folder

    src = sorted((SHARED / "datasets" / "hymenoptera" / "train").rglob("*.jpg"))[:2]
    with tempfile.TemporaryDirectory(prefix="warm-", dir=work) as tmp:
        (Path(tmp) / "img" / "a").mkdir(parents=True)
        for f in src:
            shutil.copy(f, Path(tmp) / "img" / "a" / f.name)
        for precision in precisions:
            embed_folder(Path(tmp) / "img", Path(tmp) / f"{precision}.tle", model="mobilenet_v2",
                         precision=precision, progress=False)


def store_for(name: str, precision: str, tta: str, work: Path, warm: list[str]) -> tuple[Path, dict]:
    """The set's store for (precision, tta) and its embed report's numbers (this run's or a kept run's)."""
    from tl_embed import embed_folder

    out, done = work / f"{name}-{variant(precision, tta)}.tle", work / f"{name}-{variant(precision, tta)}.done"
    if done.exists():
        return out, {**json.loads(done.read_text()), "kept": True}
    if not warm:
        warm_up(work, ["fp32", "int8"])
        warm.append("done")
    shutil.rmtree(out, ignore_errors=True)  # a partial store from an interrupted run: time it whole
    report = embed_folder(SHARED / "datasets" / name, out, model="mobilenet_v2", precision=precision, tta=tta,
                          progress=False)
    record = {"embedded": report.embedded, "embed_seconds": report.embed_seconds, "seconds": report.seconds,
              "runtime": report.runtime, "fidelity": report.fidelity, "failed": len(report.failed)}
    done.write_text(json.dumps(record))
    print(f"embedded {name} {variant(precision, tta)}: {report.embedded} images in {report.seconds:.1f} s "
          f"({report.embedded / report.embed_seconds:.1f} img/s){'; ' + report.fidelity if report.fidelity else ''}",
          flush=True)
    return out, {**record, "kept": False}


def aligned(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray]:
    """The two stores' vectors, row for row by image path (the paths both hold)."""
    from tl_embed import EmbeddingStore

    with EmbeddingStore.open(a) as sa, EmbeddingStore.open(b) as sb:
        where = {p: i for i, p in enumerate(sb.paths)}
        ia = np.array([i for i, p in enumerate(sa.paths) if p in where], np.int64)
        ib = np.array([where[p] for p in sa.paths[ia]], np.int64)
        return np.asarray(sa.embeddings, np.float32)[ia], np.asarray(sb.embeddings, np.float32)[ib]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k(x: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Each row's k nearest other rows by cosine (itself excluded), as sets of row numbers."""
    u = unit(x)
    out = np.empty((len(u), k), np.int64)
    for i in range(0, len(u), 1024):
        sims = u[i:i + 1024] @ u.T
        sims[np.arange(len(sims)), np.arange(i, i + len(sims))] = -np.inf
        out[i:i + 1024] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def quality(reduced: Path, fp32: Path) -> dict:
    """Cosine of each image's two embeddings and the top-10 neighbour overlap, reduced against fp32."""
    a, b = aligned(reduced, fp32)
    cos = np.sum(unit(a) * unit(b), axis=1)
    na, nb = top_k(a), top_k(b)
    overlap = np.mean([len(set(x) & set(y)) / TOP_K for x, y in zip(na, nb, strict=True)])
    return {"n": len(cos), "median": float(np.median(cos)), "p1": float(np.percentile(cos, 1)),
            "overlap": float(overlap)}


def head_scores(store: Path) -> dict[int, float]:
    """Seed -> held-out accuracy in % of the default head (one seed where the set has its own split)."""
    from tl_embed import EmbeddingStore, train

    with EmbeddingStore.open(store) as s:
        split = bool({"test", "val"} & set(s.splits))
    return {seed: 100 * train(store, seed=seed).metrics["accuracy"] for seed in (SEEDS[:1] if split else SEEDS)}


def map_score(store: Path, work: Path) -> float:
    """mAP in % of an exact index of the store, every photo a query against the others."""
    from tl_embed.search import Index, evaluate_search

    with tempfile.TemporaryDirectory(prefix="index-", dir=work) as tmp:  # never an index of an earlier store
        index = Index.build(store, Path(tmp) / f"{store.stem}.tli", "flat", log=lambda *_: None)
        return 100 * evaluate_search(index, None).mean_ap


def runtime_of(store: Path):
    """What a query of ``store`` is embedded by: its spec's runtime (a carried model installed first)."""
    from tl_embed import EmbeddingStore
    from tl_embed.embedding import carried
    from tl_embed.embedding.query import runtime_for

    with EmbeddingStore.open(store) as s:
        spec = s.spec
    carried.install(spec, carried.read_files(store / carried.FOLDER), "store")
    return runtime_for(spec)


def model_speed(name: str, stores: dict[str, Path], n: int) -> dict:
    """Model-only img/s per precision on the same decoded photos, alternating; and the check against the store."""
    from tl_embed import EmbeddingStore
    from tl_embed.embedding.images import load_image

    with EmbeddingStore.open(stores["fp32"]) as s:
        rows = np.linspace(0, len(s) - 1, min(n, len(s))).round().astype(np.int64)
        files = [s.absolute_path(p) for p in s.paths[rows]]
        paths = list(s.paths[rows])
    t = time.perf_counter()
    pixels = np.stack([load_image(f, 224).pixels for f in files])
    decode_s = time.perf_counter() - t
    runs = {p: runtime_of(store) for p, store in stores.items()}
    out = {p: run(pixels[:BATCH]) for p, run in runs.items()}  # warm: first requests, memory
    rates: dict[str, list[float]] = {p: [] for p in runs}
    for _ in range(REPEATS):
        for p, run in runs.items():
            t = time.perf_counter()
            out[p] = np.concatenate([run(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)])
            rates[p].append(len(pixels) / (time.perf_counter() - t))
    check = {}
    for p, store in stores.items():
        with EmbeddingStore.open(store) as s:
            pos = {q: i for i, q in enumerate(s.paths)}
            ref = np.asarray(s.embeddings, np.float32)[[pos[q] for q in paths]]
        check[p] = float(np.min(np.sum(unit(out[p]) * unit(ref), axis=1)))
    return {"set": name, "images": len(pixels), "decode_ms": 1000 * decode_s / len(pixels), "rates": rates,
            "check": check}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tl-embed-precision-bench")
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    ap.add_argument("--speed-set", choices=SETS, default=None, help="default: flowers5, else the first set")
    ap.add_argument("--speed-images", type=int, default=500)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TL_EMBED_CACHE", str(args.work / "converted"))
    keras_home()
    from tl_embed.embedding.precision import cpu_has_bf16

    print(describe_cpu())
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    reduced = ["int8"]
    if cpu_has_bf16():
        reduced.append("bf16")
        print("bf16: this CPU has native bf16: measured like int8")
    else:
        print("bf16: not measured: this CPU has no native bf16 (embed --precision bf16 is refused here)")
    precisions = ["fp32", *reduced]
    variants = [(p, t) for t in ("none", "flip") for p in precisions]
    sets = list(args.sets)
    warm: list[str] = []
    stores: dict[str, dict[str, Path]] = {}
    timing: dict[str, dict[str, dict]] = {}
    for name in sets:
        stores[name], timing[name] = {}, {}
        for p, t in variants:
            stores[name][variant(p, t)], timing[name][variant(p, t)] = store_for(name, p, t, args.work, warm)
    embed_end = time.perf_counter()

    names = [variant(p, t) for p, t in variants]
    print(f"\nMobileNetV2, genuine ImageNet weights. (1) embed end to end, img/s = embedded / embed_seconds "
          f"(decode + inference); 'extra s': {', '.join(reduced)} set-up minus fp32 set-up, same TTA "
          "(calibration + quantization + fidelity check)")
    print(f"{'set':<12}{'images':>7}" + "".join(f"{v:>11}" for v in names)
          + "".join(f"{p + ' extra s':>14}{'(flip)':>8}" for p in reduced))
    for name in sets:
        tm = timing[name]
        setup = {v: tm[v]["seconds"] - tm[v]["embed_seconds"] for v in names}
        kept = " (kept)" if any(tm[v]["kept"] for v in names) else ""
        print(f"{name:<12}{tm['fp32']['embedded']:>7}"
              + "".join(f"{tm[v]['embedded'] / tm[v]['embed_seconds']:>11.1f}" for v in names)
              + "".join(f"{setup[p] - setup['fp32']:>14.1f}{setup[p + '+flip'] - setup['fp32+flip']:>8.1f}"
                        for p in reduced) + kept, flush=True)
    total = {v: sum(timing[n][v]["embedded"] for n in sets) / sum(timing[n][v]["embed_seconds"] for n in sets)
             for v in names}
    print(f"{'all':<12}{sum(timing[n]['fp32']['embedded'] for n in sets):>7}"
          + "".join(f"{total[v]:>11.1f}" for v in names))
    for p in reduced:
        print(f"{p} / fp32: {total[p] / total['fp32']:.2f}x; {p}+flip / fp32: {total[p + '+flip'] / total['fp32']:.2f}x"
              f"; {p}+flip / fp32+flip: {total[p + '+flip'] / total['fp32+flip']:.2f}x (all sets' images / seconds)")

    qual: dict[str, dict[str, dict]] = {}
    print(f"\n(2) quality against fp32 on the same images: cosine median / 1st percentile; top-{TOP_K} overlap "
          "(cosine kNN within the set)")
    print(f"{'set':<12}{'pair':<22}{'images':>7}{'cos med':>9}{'cos p1':>9}{'top10':>7}   embed's own line")
    for name in sets:
        qual[name] = {}
        for p in reduced:
            for t in ("none", "flip"):
                q = quality(stores[name][variant(p, t)], stores[name][variant("fp32", t)])
                qual[name][variant(p, t)] = q
                fid = timing[name][variant(p, t)]["fidelity"] or "-"
                print(f"{name:<12}{variant(p, t) + ' vs ' + variant('fp32', t):<22}{q['n']:>7}{q['median']:>9.4f}"
                      f"{q['p1']:>9.4f}{q['overlap']:>7.3f}   {fid}", flush=True)

    accs: dict[str, dict[str, dict[int, float]]] = {}
    class_sets = [s for s in sets if s in CLASS_SETS]
    if class_sets:
        print("\n(3) default head (tl_embed.train), held-out accuracy %: own split (1 seed) or mean ± std over "
              "seeds 0-2 of a 20% hold-out; Δ = reduced - fp32 paired by seed, points")
        print(f"{'set':<12}{'seeds':>6}" + "".join(f"{v:>15}" for v in names)
              + "".join(f"{'Δ ' + p:>9}{'Δ ' + p + '+flip':>13}" for p in reduced)
              + "".join(f"{p + '+flip - fp32':>19}" for p in reduced))
    for name in class_sets:
        accs[name] = {v: head_scores(stores[name][v]) for v in names}
        a = accs[name]
        row = f"{name:<12}{len(a['fp32']):>6}"
        row += "".join(f"{np.mean(list(a[v].values())):>9.2f} ± {np.std(list(a[v].values())):3.1f}" for v in names)
        for p in reduced:
            for base, v in (("fp32", p), ("fp32+flip", p + "+flip")):
                row += f"{np.mean([a[v][s] - a[base][s] for s in a[base]]):>+{9 if v == p else 13}.2f}"
        row += "".join(f"{np.mean([a[p + '+flip'][s] - a['fp32'][s] for s in a['fp32']]):>+19.2f}"
                       for p in reduced)
        print(row, flush=True)
    for name in [s for s in sets if s in RETRIEVAL_SETS]:
        maps = {v: map_score(stores[name][v], args.work) for v in names}
        accs[name] = {v: {0: m} for v, m in maps.items()}
        print(f"{name:<12} mAP % (exact index, every photo against the others): "
              + ", ".join(f"{v} {m:.2f}" for v, m in maps.items())
              + "".join(f"; Δ {p} {maps[p] - maps['fp32']:+.2f}" for p in reduced), flush=True)

    speed_set = args.speed_set or ("flowers5" if "flowers5" in sets else sets[0])
    if speed_set not in sets:
        ap.error(f"--speed-set {speed_set} is not among --sets")
    ms = model_speed(speed_set, {p: stores[speed_set][p] for p in precisions}, args.speed_images)
    med = {p: float(np.median(r)) for p, r in ms["rates"].items()}
    print(f"\n(4) model only: {ms['images']} {speed_set} photos decoded once ({ms['decode_ms']:.1f} ms each), "
          f"runtime_for(store.spec) on uint8 batches of {BATCH}, alternating, {REPEATS} repeats, img/s")
    for p in precisions:
        ratios = [r / f for r, f in zip(ms["rates"][p], ms["rates"]["fp32"], strict=True)]
        print(f"{p:<6} median {med[p]:7.1f}  runs " + " ".join(f"{r:6.1f}" for r in ms["rates"][p])
              + (f"   {p} / fp32: median {med[p] / med['fp32']:.2f}x, per repeat "
                 + " ".join(f"{r:.2f}" for r in ratios) if p != "fp32" else "")
              + f"   min cosine to the store's rows {ms['check'][p]:.6f}")
    analysis_end = time.perf_counter()

    print(f"\n(5) verdict: a reduced precision may become auto only if on every set the default head loses at most "
          f"{MAX_HEAD_LOSS} points ({', '.join(s for s in sets if s in RETRIEVAL_SETS) or 'no retrieval set'}: mAP) "
          f"and the top-{TOP_K} overlap is at least {MIN_OVERLAP}")
    for p in reduced:
        fails = []
        for name in sets:
            a = accs[name]
            loss = -np.mean([a[p][s] - a["fp32"][s] for s in a["fp32"]])
            if loss > MAX_HEAD_LOSS:
                what = "mAP" if name in RETRIEVAL_SETS else "head"
                fails.append(f"{name}: {what} loses {loss:.2f} points")
            if qual[name][p]["overlap"] < MIN_OVERLAP:
                fails.append(f"{name}: top-{TOP_K} overlap {qual[name][p]['overlap']:.3f}")
        print(f"{p}: " + ("may become auto (every criterion met on every set)" if not fails else
                          "stays off auto; failed: " + "; ".join(fails)))
    print(f"\nwall time: embedding {embed_end - t_start:.0f} s, measuring {analysis_end - embed_end:.0f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
