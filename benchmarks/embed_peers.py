"""Peer comparison (issue 20): `tl-embed embed` against a hand-written ONNX Runtime script, same JPEGs, one run.

    flock /tmp/tl-bench.lock python benchmarks/embed_peers.py [--n 1000] [--repeats 1] [--model-images 320]
                                                              [--work /work/.bench-work/peers]

Run it under the benchmark lock (it takes none itself: its child processes would wait on it).  MobileNetV2
(ImageNet architecture, pooling avg, no top) with its genuine ImageNet weights from ../shared/weights through
a temporary KERAS_HOME: random weights (``--weights none``) are never cached as converted IR, so "converted
model cached" needs real ones; speed does not depend on the values.  The first ``--n`` JPEGs of the shared
sets, picked as benchmarks/embed_throughput.py picks them.  Every contender runs in its own fresh process;
``--repeats`` rounds, contenders in turn, median per contender:

* ``tl-embed embed DIR --out NEW.tle -q`` (the console script, default precision fp32) into a new store.
  Warm-up beforehand: ``embed`` of 132 other photos (the "seed" folder) converted and cached the IR in a fresh
  TL_EMBED_CACHE; a new store still imports TensorFlow and builds the Keras model (the cached IR spares only
  the conversion).
* the same with ``--precision int8``: a new int8 store always quantizes (NNCF, calibrated on 100 of the
  folder's photos, plus embed's 32-photo fp32/int8 check), whatever is cached, so its start-up holds that.
* ``+ existing store`` rows: the same 1 000 photos added to a store that already exists (made by the warm-up
  from the seed photos, copied before the clock starts), fp32 and int8; here the store carries its int8
  model and the runtime starts from the cached IR without TensorFlow (embed's ``_cached_runtime``): the
  start-up a converted (or quantized) model cached in advance can give.
* an ONNX Runtime fp32 script as a competent user writes it (``ort-embed`` below): the same network exported
  once with tf2onnx (frozen graph, opset 17, float input; kept in --work), ``ThreadPoolExecutor(cores)``
  decoding with Pillow exactly as tl_embed's ``decode_bytes`` (draft + EXIF + bilinear resize to 224, checked
  pixel-identical), preprocessing ``x / 127.5 - 1``, batches of 32, ``InferenceSession`` with
  ``intra_op_num_threads = cores`` and ORT's default graph optimisations.

Measured per contender: wall time of the whole command (process start to exit: start-up included); end-to-end
img/s once running (tl-embed: the rate ``embed`` prints, ``embedded / embed_seconds``, decode + inference +
store commits, from the first decode to the last commit; ORT script: its own clock from the first decode to the
last batch's output); start-up = wall - n / end-to-end (everything outside the embedding loop, exit included).
Model only: each runtime in its own process on ``--model-images`` photos decoded beforehand, batches of 32,
3 passes, median (OpenVINO: the store's runtime (``runtime_for``) fed through ``stream`` as embed feeds it,
uint8 in; ORT: ``session.run`` on batches already preprocessed to float32).  Checks: the ORT rows against the
fp32 store's rows (cosine, min over the photos), and the int8 store against fp32 (informative).

Then the issue's goals, for each of our rows: ours / ORT end to end >= 2x, ours end to end / our model-only
>= 80%, ours wall img/s / ORT wall img/s >= 1.8x.  Logs and stores go to --work (run/ is replaced each run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SIZE = 224
BATCH = 32
SEEDS = 132  # the warm-up / existing-store folder: 100 calibration + 32 check photos for int8
MODEL_REPEATS = 3
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
GOALS = {"e2e": 2.0, "own": 0.8, "wall": 1.8}
PEER = "ORT fp32 script"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------- the ONNX Runtime contender (own process)
def peer_decode(path: str, size: int = SIZE) -> np.ndarray:
    """tl_embed's decode_bytes as a user would write it with Pillow: JPEG draft, EXIF rotation, bilinear resize."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.format in ("JPEG", "MPO") and min(img.size) >= 2 * size:
            img.draft("RGB", (size, size))
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def preprocess(batch: np.ndarray) -> np.ndarray:
    """MobileNetV2's preprocess_input: uint8 RGB -> [-1, 1]."""
    return batch.astype(np.float32) / 127.5 - 1.0


def ort_session(model: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # graph optimisations: ORT's default (all)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_embed(argv: list[str]) -> None:
    """``ort-embed MODEL.onnx FILES.txt OUT.npy``: the competent user's script; prints its own timing as JSON."""
    model, listing, out = argv
    files = Path(listing).read_text().splitlines()
    threads = cores()
    session = ort_session(model, threads)
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    chunks: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    with ThreadPoolExecutor(threads) as pool:
        for pixels in pool.map(peer_decode, files):
            batch.append(pixels)
            if len(batch) == BATCH:
                chunks.append(session.run(None, {name: preprocess(np.stack(batch))})[0])
                batch = []
        if batch:
            chunks.append(session.run(None, {name: preprocess(np.stack(batch))})[0])
    seconds = time.perf_counter() - t0
    np.save(out, np.concatenate(chunks))
    print(json.dumps({"images": len(files), "embed_seconds": seconds}))


# ----------------------------------------------------------------- helpers run in their own process
def export_onnx(argv: list[str]) -> None:
    """``export-onnx OUT.onnx``: Keras MobileNetV2 (imagenet, no top, avg pooling), float input, via tf2onnx."""
    import logging

    import keras
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    for name in ("tensorflow", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    net = keras.applications.MobileNetV2(weights="imagenet", include_top=False, pooling="avg",
                                         input_shape=(SIZE, SIZE, 3))
    fn = tf.function(lambda x: net(x, training=False),
                     input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="input")])
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())  # as tl_embed's own ONNX export
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
                                              output_names=[t.name for t in frozen.outputs], opset=17)
    Path(argv[0]).write_bytes(proto.SerializeToString())


def model_only(argv: list[str]) -> None:
    """``model-only openvino STORE PIXELS.npy`` or ``model-only ort MODEL.onnx PIXELS.npy``: img/s per pass, JSON."""
    kind, source, pixels_file = argv
    pixels = np.load(pixels_file)
    batches = [pixels[i:i + BATCH] for i in range(0, len(pixels), BATCH)]
    if kind == "ort":
        session = ort_session(source, cores())
        name = session.get_inputs()[0].name
        inputs = [preprocess(b) for b in batches]  # model only: preprocessing done before the clock

        def one_pass() -> None:
            for x in inputs:
                session.run(None, {name: x})
    else:
        from tl_embed import EmbeddingStore
        from tl_embed.embedding import carried
        from tl_embed.embedding.query import runtime_for
        from tl_embed.embedding.runtime import stream

        with EmbeddingStore.open(source) as s:
            spec = s.spec
        carried.install(spec, carried.read_files(Path(source) / carried.FOLDER), "store")
        run = runtime_for(spec)

        def one_pass() -> None:
            for _ in stream(run, ((None, b) for b in batches)):
                pass

    one_pass()  # warm-up: first requests, memory
    rates = []
    for _ in range(MODEL_REPEATS):
        t = time.perf_counter()
        one_pass()
        rates.append(len(pixels) / (time.perf_counter() - t))
    print(json.dumps({"rates": rates}))


WORKERS: dict[str, Callable[[list[str]], None]] = {"ort-embed": ort_embed, "export-onnx": export_onnx,
                                                   "model-only": model_only}


# ----------------------------------------------------------------- the driver
def cpu_flags() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return "flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS)


class Driver:
    def __init__(self, work: Path, log: Callable[[str], None]):
        self.work, self.log = work, log
        self.run_dir = work / "run"
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True)
        home = self.run_dir / "keras_home"
        (home / "models").mkdir(parents=True)
        for f in (SHARED / "weights").iterdir():
            if f.suffix in (".h5", ".json"):
                (home / "models" / f.name).symlink_to(f.resolve())
        self.env = {**os.environ, "KERAS_HOME": str(home), "TL_EMBED_CACHE": str(self.run_dir / "cache"),
                    "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(HERE.parent)}
        script = Path(sys.executable).with_name("tl-embed")
        self.tl_embed = [str(script)] if script.exists() else [sys.executable, "-m", "tl_embed.cli"]

    def call(self, tag: str, argv: list[str]) -> tuple[float, str]:
        """Run ``argv`` in a fresh process; (wall seconds from start to exit, stdout). Output kept in logs/."""
        t = time.perf_counter()
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        (self.logs / f"{tag}.txt").write_text(f"$ {' '.join(argv)}\n# rc {out.returncode}, {wall:.2f} s\n"
                                              f"{out.stdout}\n--- stderr\n{out.stderr}")
        if out.returncode != 0:
            sys.exit(f"{tag} failed (rc {out.returncode}); see {self.logs / tag}.txt:\n{out.stderr[-2000:]}")
        return wall, out.stdout

    def embed(self, tag: str, folder: Path, store: Path, precision: str | None = None) -> dict:
        argv = [*self.tl_embed, "embed", str(folder), "--out", str(store), "-q"]
        wall, out = self.call(tag, argv + (["--precision", precision] if precision else []))
        m = re.search(r"(\d+) embedded \(([\d.]+) images/s", out)
        if m is None:
            sys.exit(f"{tag}: no rate in embed's output: {out}")
        fid = re.search(r"int8 vs fp32 on [^.]*\.\d+, lowest \d\.\d+", out)
        return {"images": int(m.group(1)), "e2e": float(m.group(2)), "wall": wall, "fidelity": fid and fid.group(0)}

    def worker(self, tag: str, name: str, *args: str) -> tuple[float, dict]:
        wall, out = self.call(tag, [sys.executable, str(Path(__file__).resolve()), name, *args])
        return wall, json.loads(out.strip().splitlines()[-1])


def store_rows(store: Path, names: list[str]) -> np.ndarray:
    """The store's vectors for the files named ``names`` (by file name), in that order."""
    from tl_embed import EmbeddingStore

    with EmbeddingStore.open(store) as s:
        where = {Path(p).name: i for i, p in enumerate(s.paths)}
        return np.asarray(s.embeddings, np.float32)[[where[n] for n in names]]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def onnx_model(drv: Driver) -> Path:
    """The exported ONNX model, kept in --work by the weights' sha256 (exported once, like a cached conversion)."""
    from tl_embed.embedding.backbones import sha256_file

    weights = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    path = drv.work / f"mobilenet_v2-{sha256_file(weights)[:12]}.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        drv.call("export-onnx", [sys.executable, str(Path(__file__).resolve()), "export-onnx", str(tmp)])
        tmp.rename(path)
        drv.log(f"exported {path.name} with tf2onnx")
    return path


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    sys.path.insert(0, str(HERE))
    from embed_throughput import collect_jpegs, link_folder
    from machine import describe_cpu

    from tl_embed.embedding.images import load_image

    t_start = time.perf_counter()
    log(describe_cpu())
    log(cpu_flags())
    log(f"date {time.strftime('%Y-%m-%d %H:%M')}; load average before {os.getloadavg()[0]:.2f}")
    shutil.rmtree(args.work / "run", ignore_errors=True)
    drv = Driver(args.work, log)
    n = args.n
    files = collect_jpegs(n + SEEDS)
    photos, seeds = files[:n], files[n:]
    (drv.run_dir / "photos").mkdir()
    folder = link_folder(photos, drv.run_dir / "photos")
    upd = drv.run_dir / "update"
    upd.mkdir()
    for i, f in enumerate(seeds):
        (upd / f"seed_{i:03d}{f.suffix.lower()}").symlink_to(f.resolve())
    names = sorted(p.name for p in folder.iterdir())
    listing = drv.run_dir / "photos.txt"
    listing.write_text("\n".join(str(folder / nm) for nm in names))
    seed_listing = drv.run_dir / "seeds.txt"
    seed_listing.write_text("\n".join(str(p) for p in sorted(upd.iterdir())))

    # pixels: tl_embed's decode for the model-only rates, the peer decode checked against it, decode rate
    for f in files:
        f.read_bytes()  # every contender reads the photos from the page cache
    threads = cores()
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        decoded = list(pool.map(lambda nm: load_image(folder / nm, SIZE).pixels, names))
    decode_rate = n / (time.perf_counter() - t)
    pixels = np.stack(decoded[:args.model_images])
    pixels_file = drv.run_dir / "pixels.npy"
    np.save(pixels_file, pixels)
    diff = max(int(np.abs(peer_decode(str(folder / nm)).astype(np.int16) - p).max())
               for nm, p in zip(names[:args.model_images], pixels, strict=True))
    log(f"decoding (tl_embed's load_image) on {threads} threads: {decode_rate:.0f} img/s; the ORT script's decode "
        f"against it on {len(pixels)} photos: max |diff| {diff}")
    del decoded

    # warm-ups: the IR converted and cached, the seed stores (fp32, int8) made, the ONNX export, ORT's libs
    w = {"fp32": drv.embed("warmup-fp32", upd, drv.run_dir / "seed-fp32.tle"),
         "int8": drv.embed("warmup-int8", upd, drv.run_dir / "seed-int8.tle", "int8")}
    log(f"warm-up: {SEEDS} seed photos embedded fp32 in {w['fp32']['wall']:.1f} s (IR converted and cached), int8 "
        f"in {w['int8']['wall']:.1f} s (quantized; the store carries its model)")
    onnx = onnx_model(drv)
    drv.worker("warmup-ort", "ort-embed", str(onnx), str(seed_listing), str(drv.run_dir / "warmup-ort.npy"))
    for nm in names:
        (upd / nm).symlink_to((folder / nm).resolve())  # the existing-store rows add these 1 000

    def fresh(precision: str | None) -> Callable[[int], dict]:
        def go(r: int) -> dict:
            store = drv.run_dir / f"new-{precision or 'fp32'}-{r}.tle"
            return {**drv.embed(f"new-{precision or 'fp32'}-{r}", folder, store, precision), "store": store}
        return go

    def existing(precision: str) -> Callable[[int], dict]:
        def go(r: int) -> dict:
            store = drv.run_dir / f"existing-{precision}-{r}.tle"
            shutil.copytree(drv.run_dir / f"seed-{precision}.tle", store, symlinks=True)
            return {**drv.embed(f"existing-{precision}-{r}", upd, store), "store": store}
        return go

    def ort(r: int) -> dict:
        out = drv.run_dir / f"ort-{r}.npy"
        wall, rep = drv.worker(f"ort-{r}", "ort-embed", str(onnx), str(listing), str(out))
        return {"images": rep["images"], "e2e": rep["images"] / rep["embed_seconds"], "wall": wall, "out": out}

    contenders = {PEER: ort, "tl-embed fp32": fresh(None), "tl-embed int8": fresh("int8"),
                  "tl-embed fp32, existing store": existing("fp32"), "tl-embed int8, existing store": existing("int8")}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    for r in range(args.repeats):
        for key, go in contenders.items():
            results[key].append(go(r))
            x = results[key][-1]
            log(f"round {r + 1}: {key:<31} wall {x['wall']:6.2f} s, end to end {x['e2e']:6.1f} img/s"
                + (f"; {x['fidelity']}" if x.get("fidelity") else ""))
            if x["images"] != n:
                sys.exit(f"{key} embedded {x['images']} images, not {n}")

    model = {"openvino fp32": drv.worker("model-openvino-fp32", "model-only", "openvino",
                                         str(results["tl-embed fp32"][0]["store"]), str(pixels_file))[1],
             "openvino int8": drv.worker("model-openvino-int8", "model-only", "openvino",
                                         str(results["tl-embed int8"][0]["store"]), str(pixels_file))[1],
             "ort fp32": drv.worker("model-ort", "model-only", "ort", str(onnx), str(pixels_file))[1]}
    rate = {k: statistics.median(v["rates"]) for k, v in model.items()}
    log(f"model only, {len(pixels)} photos decoded beforehand, batches of {BATCH}, {MODEL_REPEATS} passes, img/s: "
        + "; ".join(f"{k} median {rate[k]:.1f} (" + " ".join(f"{x:.1f}" for x in v["rates"]) + ")"
                    for k, v in model.items()))

    fp32_rows = store_rows(results["tl-embed fp32"][0]["store"], names)
    checks = {"ORT script vs tl-embed fp32 store": min_cosine(np.load(results[PEER][0]["out"]), fp32_rows),
              "tl-embed fp32 existing-store rows vs new store": min_cosine(
                  store_rows(results["tl-embed fp32, existing store"][0]["store"], names), fp32_rows),
              "tl-embed int8 new store vs fp32 (informative)": min_cosine(
                  store_rows(results["tl-embed int8"][0]["store"], names), fp32_rows)}
    log("min cosine over the photos: " + "; ".join(f"{k} {v:.6f}" for k, v in checks.items()))

    own_model = {PEER: rate["ort fp32"], "tl-embed fp32": rate["openvino fp32"],
                 "tl-embed int8": rate["openvino int8"], "tl-embed fp32, existing store": rate["openvino fp32"],
                 "tl-embed int8, existing store": rate["openvino int8"]}
    rows = {}
    for key, xs in results.items():
        e2e = statistics.median(x["e2e"] for x in xs)
        wall = statistics.median(x["wall"] for x in xs)
        rows[key] = {"e2e": e2e, "wall_s": wall, "wall": n / wall, "startup": wall - n / e2e, "model": own_model[key]}
    ref = rows[PEER]
    log(f"\nMobileNetV2, {n} JPEGs, batches of {BATCH}, {threads} cores, median of {args.repeats} run(s); "
        "start-up = wall - n / end-to-end")
    log("| contender | end to end img/s | wall s | wall img/s incl. start-up | start-up s | model only img/s "
        "| ours / ORT end to end | ours end to end / own model only | ours wall / ORT wall |")
    log("|---|---|---|---|---|---|---|---|---|")
    for key, x in rows.items():
        goal = ("| - | - | - |" if key == PEER else
                f"| {x['e2e'] / ref['e2e']:.2f}x | {x['e2e'] / x['model']:.0%} | {x['wall'] / ref['wall']:.2f}x |")
        log(f"| {key} | {x['e2e']:.1f} | {x['wall_s']:.2f} | {x['wall']:.1f} | {x['startup']:.2f} | {x['model']:.1f} "
            + goal)
    log(f"goals: ours / ORT end to end >= {GOALS['e2e']}x, ours end to end / own model only >= {GOALS['own']:.0%}, "
        f"ours wall / ORT wall >= {GOALS['wall']}x")
    for key, x in rows.items():
        if key == PEER:
            continue
        met = [x["e2e"] / ref["e2e"] >= GOALS["e2e"], x["e2e"] / x["model"] >= GOALS["own"],
               x["wall"] / ref["wall"] >= GOALS["wall"]]
        log(f"{key}: " + ", ".join(f"{what} {'met' if ok else 'not met'}" for what, ok in
                                    zip(("end to end", "own model only", "wall"), met, strict=True)))
    bound = 1 / (1 / decode_rate + 1 / rate["openvino fp32"])
    log(f"decode and model sharing the cores bound end to end at about 1 / (1/{decode_rate:.0f} + "
        f"1/{rate['openvino fp32']:.0f}) = {bound:.0f} img/s fp32 ({bound / rate['openvino fp32']:.0%} of its model "
        f"only), {1 / (1 / decode_rate + 1 / rate['openvino int8']):.0f} img/s int8")
    log(f"load average after {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t_start:.0f} s")
    out = {"n": n, "repeats": args.repeats, "rows": rows, "model_only": model, "checks": checks,
           "decode_rate": decode_rate, "runs": {k: [{kk: vv for kk, vv in x.items() if kk not in ("store", "out")}
                                                   for x in xs] for k, xs in results.items()}}
    (args.work / "results.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS:
        WORKERS[sys.argv[1]](sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="JPEGs embedded by every contender")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the end-to-end runs (median)")
    ap.add_argument("--model-images", type=int, default=320, help="photos for the model-only rates")
    ap.add_argument("--work", type=Path, default=Path("/work/.bench-work/peers"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / f"embed_peers-{time.strftime('%Y%m%d-%H%M%S')}.log", "w") as logfile:
        def log(line: str) -> None:
            print(line, flush=True)
            logfile.write(line + "\n")
            logfile.flush()

        run_benchmark(args, log)


if __name__ == "__main__":
    main()
