"""Embedding throughput, side by side in one process, on the same real JPEGs.

(a) the tutorials' per-image loop: load_img -> preprocess_input -> model.predict, one image at a time
(b) batched model.predict with sequential PIL decoding (batches of 32)
(c) `tl-embed embed` (embed_folder) with each runtime, end to end from JPEG into a fresh store
(d) the model-only ceiling of each runtime on pre-decoded uint8 tensors

Prints images/s, the ratios (c)/(a), (c)/(b), (c)/(d), and each runtime's embedding cosine vs Keras.
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
    """(d) the runtime alone on pre-decoded tensors (best of ``repeats`` passes)."""
    run(pixels[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(pixels), batch):
            run(pixels[i:i + batch])
        best = min(best, time.perf_counter() - t)
    return len(pixels) / best


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bench_model(name: str, files: list[Path], folder: Path, runtimes: list[str], n_tutorial: int) -> None:
    import keras

    from tl_embed.backbones import get_backbone, load_backbone
    from tl_embed.embed import embed_folder
    from tl_embed.images import load_image
    from tl_embed.runtime import make_runtime
    from tl_embed.store import EmbeddingStore

    bb = get_backbone(name)
    module = getattr(keras.applications, bb.module)
    plain = getattr(keras.applications, bb.keras_name)(
        weights=None, include_top=False, pooling="avg", input_shape=(bb.input_size,) * 2 + (3,))
    a = tutorial_loop(plain, module, files[:n_tutorial], bb.input_size)
    b = batched_predict(plain, module, files, bb.input_size)
    print(f"\n== {name} ({bb.input_size}px, {len(files)} JPEGs, {os.cpu_count()} cores) ==")
    print(f"(a) tutorial per-image loop          {a:8.1f} img/s   (first {n_tutorial} images)")
    print(f"(b) batched predict, sequential PIL  {b:8.1f} img/s")

    backbone = load_backbone(name, weights="none")
    pixels = np.stack([load_image(f, bb.input_size).pixels for f in files[:256]])
    reference = None
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
        reference = emb if reference is None else reference
        cos = cosine_rows(emb, reference)
        print(f"(c) tl-embed embed --runtime {rt:<8}{c:8.1f} img/s   (d) model only {d:7.1f} img/s   "
              f"(c)/(a) {c / a:5.1f}x  (c)/(b) {c / b:4.1f}x  (c)/(d) {c / d:4.0%}  "
              f"min cosine vs {runtimes[0]} {cos:.5f}  ({rep.seconds:.1f} s wall incl. conversion)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0", "resnet50"])
    ap.add_argument("--runtimes", nargs="+", default=None, help="default: keras + every available one")
    ap.add_argument("--n", type=int, default=1000, help="number of JPEGs")
    ap.add_argument("--n-tutorial", type=int, default=200, help="images for the slow per-image loop")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tl_embed.runtime import available_runtimes

    runtimes = args.runtimes or available_runtimes()
    files = collect_jpegs(args.n)
    tmp = Path(tempfile.mkdtemp())
    try:
        folder = link_folder(files, tmp)
        for name in args.models:
            bench_model(name, files, folder, runtimes, args.n_tutorial)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
