"""Embedding throughput, side by side in one process, on the same real JPEGs.

(a) the tutorials' per-image loop: load_img -> preprocess_input -> model.predict, one image at a time
(b) batched model.predict with sequential PIL decoding (batches of 32)
(c) `tl-embed embed` (embed_folder) with each runtime, end to end from JPEG into a fresh store
(d) the model-only ceiling of each runtime on pre-decoded uint8 tensors

Prints images/s, the ratios (c)/(a), (c)/(b), (c)/(d), and each runtime's embedding cosine vs Keras,
then the physical limit: the model's FLOPs per image x the best (d) against the CPU's fp32 peak
(cores x FLOP/cycle x clock; the FLOP/cycle assumed from the CPU flags is printed, --peak-gflops overrides).
Random weights (weights=none): speed does not depend on the weight values.

    python benchmarks/embed_throughput.py [--models mobilenet_v2 efficientnet_b0 resnet50] [--n 1000]
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

from tl_embed.cpus import cpu_count

HERE = Path(__file__).resolve().parent
DATASETS = HERE.parent.parent / "shared" / "datasets"


def collect_jpegs(n: int) -> list[Path]:
    """The first ``n`` JPEGs of the shared sets with real, varied photo sizes."""
    files: list[Path] = []
    for name in ("hymenoptera", "pets3", "flowers12", "flowers5"):
        files += sorted(p for p in (DATASETS / name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if len(files) < n:
        sys.exit(f"need {n} JPEGs under {DATASETS}, found {len(files)}")
    return files[:n]


def link_folder(files: list[Path], dst: Path) -> Path:
    for i, f in enumerate(files):
        (dst / f"{i:05d}{f.suffix.lower()}").symlink_to(f.resolve())
    return dst


def tutorial_loop(model, module, files, size) -> float:
    """(a) load_img -> img_to_array -> preprocess_input -> model.predict, per image."""
    import keras

    t = time.perf_counter()
    for f in files:
        x = keras.utils.img_to_array(keras.utils.load_img(f, target_size=(size, size)))
        model.predict(module.preprocess_input(x[None]), verbose=0)
    return len(files) / (time.perf_counter() - t)


def batched_predict(model, module, files, size, batch=32) -> float:
    """(b) sequential PIL decoding, model.predict one batch at a time."""
    from PIL import Image

    t = time.perf_counter()
    for i in range(0, len(files), batch):
        xs = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                         dtype=np.float32) for f in files[i:i + batch]]
        model.predict(module.preprocess_input(np.stack(xs)), verbose=0)
    return len(files) / (time.perf_counter() - t)


def model_only(run, pixels: np.ndarray, batch=64, repeats=3) -> float:
    """(d) the runtime alone on pre-decoded tensors, batches streamed as embed does (best of ``repeats``)."""
    from tl_embed.embedding.runtime import stream

    run(pixels[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in stream(run, ((None, pixels[i:i + batch]) for i in range(0, len(pixels), batch))):
            pass
        best = min(best, time.perf_counter() - t)
    return len(pixels) / best


def decode_rate(files: list[Path], size: int) -> float:
    """Images/s one core decodes (read, sha256, JPEG draft decode, resize): what embed needs besides the model."""
    from tl_embed.embedding.images import load_image

    t = time.perf_counter()
    for f in files:
        load_image(f, size)
    return len(files) / (time.perf_counter() - t)


def model_flops(model) -> float:
    """Multiply-adds x 2 per image in the convolutions and dense layers (the rest is noise)."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        out = layer.output.shape
        kernel = layer.kernel.shape  # Conv2D (kh, kw, in/groups, out); Depthwise (kh, kw, in, mult)
        if kind == "Dense":
            total += kernel[0] * kernel[1]
        else:
            total += out[1] * out[2] * int(np.prod(kernel[:3])) * (out[3] if kind == "Conv2D" else kernel[3])
    return 2.0 * total


def cpu_peak_gflops() -> tuple[float, str]:
    """fp32 peak from /proc/cpuinfo: cores x FMA lanes x 2 FMA units x 2 FLOP x base clock."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    mhz = next((float(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")), 0.0)
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * 2
    cores = cpu_count()
    return cores * per_cycle * mhz / 1000, (f"{cores} cores x {per_cycle} FLOP/cycle ({lanes}-lane FMA, "
                                            f"2 units assumed) x {mhz / 1000:.2f} GHz")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bench_model(name: str, files: list[Path], folder: Path, runtimes: list[str], n_tutorial: int,
                peak_gflops: tuple[float, str] | None) -> None:
    import keras

    from tl_embed import EmbeddingStore, embed_folder
    from tl_embed.embedding.backbones import get_backbone, load_backbone
    from tl_embed.embedding.images import load_image
    from tl_embed.embedding.runtime import make_runtime

    bb = get_backbone(name)
    module = getattr(keras.applications, bb.module)
    plain = getattr(keras.applications, bb.keras_name)(
        weights=None, include_top=False, pooling="avg", input_shape=(bb.input_size,) * 2 + (3,))
    a = tutorial_loop(plain, module, files[:n_tutorial], bb.input_size)
    b = batched_predict(plain, module, files, bb.input_size)
    print(f"\n== {name} ({bb.input_size}px, {len(files)} JPEGs, {cpu_count()} cores) ==")
    print(f"(a) tutorial per-image loop          {a:8.1f} img/s   (first {n_tutorial} images)")
    print(f"(b) batched predict, sequential PIL  {b:8.1f} img/s")

    backbone = load_backbone(name, weights="none")
    pixels = np.stack([load_image(f, bb.input_size).pixels for f in files[:256]])
    reference = None
    best_d = 0.0
    decode = decode_rate(files, bb.input_size)
    cores = cpu_count()
    for rt in runtimes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.tle"
            rep = embed_folder(folder, out, model=name, weights="none", runtime=rt, progress=False,
                               loader=lambda *_a, **_k: backbone)
            c = rep.embedded / rep.embed_seconds
            with EmbeddingStore.open(out) as s:
                emb = np.array(s.embeddings)
        run = make_runtime(backbone, rt)
        d = model_only(run, pixels)
        del run  # its threads would compete with the next runtime's
        best_d = max(best_d, d)
        reference = emb if reference is None else reference
        cos = cosine_rows(emb, reference)
        print(f"(c) tl-embed embed --runtime {rt:<8}{c:8.1f} img/s   (d) model only {d:7.1f} img/s   "
              f"(c)/(a) {c / a:5.1f}x  (c)/(b) {c / b:4.1f}x  (c)/(d) {c / d:4.0%}  "
              f"min cosine vs {runtimes[0]} {cos:.5f}  ({rep.seconds:.1f} s wall incl. conversion)")
    bound = cores / (cores / decode + 1 / best_d)  # decode and the fastest model share the cores
    print(f"decoding alone: {decode:.0f} img/s on one core; with decoding sharing the {cores} cores, the "
          f"fastest model bounds end-to-end at {bound:.1f} img/s = {bound / best_d:.0%} of (d)")
    gflop = model_flops(backbone.model) / 1e9
    peak, how = peak_gflops or cpu_peak_gflops()
    print(f"physical limit: {gflop:.2f} GFLOP/image x {best_d:.1f} img/s = {gflop * best_d:.0f} GFLOP/s, "
          f"{gflop * best_d / peak:.0%} of the fp32 peak {peak:.0f} GFLOP/s ({how}); "
          f"at peak the model alone would run {peak / gflop:.0f} img/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0", "resnet50"])
    ap.add_argument("--runtimes", nargs="+", default=None, help="default: keras + every available one")
    ap.add_argument("--n", type=int, default=1000, help="number of JPEGs")
    ap.add_argument("--n-tutorial", type=int, default=200, help="images for the slow per-image loop")
    ap.add_argument("--peak-gflops", type=float, default=None, help="this CPU's fp32 peak, if known better")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tl_embed.embedding.runtime import available_runtimes

    runtimes = args.runtimes or available_runtimes()
    files = collect_jpegs(args.n)
    tmp = Path(tempfile.mkdtemp())
    try:
        folder = link_folder(files, tmp)
        for name in args.models:
            peak = (args.peak_gflops, "given") if args.peak_gflops else None
            bench_model(name, files, folder, runtimes, args.n_tutorial, peak)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
