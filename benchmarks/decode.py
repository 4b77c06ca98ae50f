"""JPEG decode + resize to the model's input size: tl_embed's reference decode against faster options.

Issue 20 ("Decode keeps up"): with inference 2-3x cheaper, decoding becomes most of embed's cost. Two photo
sets, the same for every contender: the mix (by default 200 JPEGs from each of the five classification sets
under ../shared/datasets, evenly spaced in name order) and the large set (every JPEG of those sets whose
short side is at least twice the input size: the photos where scaled decoding applies). Each contender turns
a file into a size x size RGB uint8 array as ``load_image`` does (read, sha256, decode, EXIF orientation,
bilinear resize without crop):

  reference        tl_embed.embedding.images.load_image itself: Pillow, draft 1/2, 1/4 or 1/8 when the short
                   side is >= 2x size, bilinear resize with reducing_gap=3 (Image.reduce first when >= 3x)
  pillow+reduce    the reference's draft, then Image.reduce by the whole factor left (w // size, h // size),
                   then the bilinear resize
  simplejpeg       simplejpeg at the reference's draft scale, then the reference's resize
  simplejpeg-fine  simplejpeg at the smallest n/8 scale keeping both sides >= size (min_height/min_width)
  turbojpeg        PyTurboJPEG (scaling_factor) at the reference's draft scale, then the reference's resize
  turbojpeg-fine   PyTurboJPEG at the smallest n/8 scale keeping both sides >= size

The fast paths read the header with Pillow (format, mode, pixel limit, EXIF orientation: the checks
load_image makes) and hand anything but an RGB or grayscale JPEG, or a file their decoder refuses, to the
reference.

Printed per photo set and contender: ms per photo on 1 thread; img/s on 2 threads (a thread pool fed in
order with 128 files of lookahead, as tl_embed.embedding.decode.decode_in_order does for embed) and on 2
processes (pixels sent back to the parent); each the median of --repeats rounds that interleave the
contenders, with the range, and the speed ratio to the reference of the same round (median). Then the
pixels against the reference decode of the same file (|diff| in 0-255 units over every value: max, mean,
99th percentile; photos identical) and the cosine between genuine ImageNet MobileNetV2 embeddings
(tl_embed's Keras runtime, weights through a temporary KERAS_HOME) of the reference's and the contender's
pixels, on --n-cosine photos of the mix and on every large photo.

Needs simplejpeg and PyTurboJPEG besides tl_embed's dependencies (PyTurboJPEG 2 needs libjpeg-turbo 3; with
Debian 12's libturbojpeg0, 2.1.5, use PyTurboJPEG<2); a contender whose package is missing is skipped.
Time it alone on the machine:

    flock /tmp/tl-bench.lock python benchmarks/decode.py [--n 1000] [--size 224] [--repeats 3] [--n-cosine 200]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_cpu  # noqa: E402
from tta import keras_home  # noqa: E402

from tl_embed.embedding.decode import decode_in_order  # noqa: E402
from tl_embed.embedding.images import (  # noqa: E402
    _TRANSPOSE,
    MAX_PIXELS,
    PIL_FORMATS,
    decode_bytes,
    exif_orientation,
    load_image,
    read_regular_file,
    to_rgb,
    upright,
)
from tl_embed.embedding.scan import ImageFile  # noqa: E402

SHARED = ROOT.parent / "shared"
SETS = ("flowers5", "flowers12", "hymenoptera", "pets3", "sign_digits")
LOOKAHEAD = 128  # embed's: 2 x its batch of 64
WORKERS = 2

Decoder = Callable[[bytes, int], np.ndarray]  # encoded bytes, size -> (size, size, 3) uint8


# ---------------------------------------------------------------------------------------------- contenders

def draft_scale(w: int, h: int, size: int) -> int:
    """The reference's JPEG draft scale (Pillow's choice: 8, 4, 2 or 1), 1 below 2x size."""
    if min(w, h) < 2 * size:
        return 1
    s = min(w // size, h // size)
    return next(k for k in (8, 4, 2, 1) if s >= k)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of an RGB or grayscale JPEG within the pixel limit; else None."""
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.width * img.height > MAX_PIXELS:
                return None
            return img.width, img.height, exif_orientation(img)
    except Exception:  # whatever is wrong with the file, the reference says it
        return None


def finish(arr: np.ndarray, orientation: int, size: int) -> np.ndarray:
    """The reference's steps after decoding: EXIF orientation, then the bilinear resize."""
    img = Image.fromarray(arr)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def fast_path(decode: Callable[[bytes, int, int, int], np.ndarray]) -> Decoder:
    """A decoder of RGB/grayscale JPEGs (``decode(data, w, h, size)`` -> RGB array) with the reference's
    header checks and finishing steps; everything else goes to the reference."""

    def run(data: bytes, size: int) -> np.ndarray:
        header = jpeg_header(data)
        if header is not None:
            w, h, orientation = header
            try:
                arr = decode(data, w, h, size)
            except Exception:  # a file the fast decoder refuses: the reference decides
                arr = None
            if arr is not None:
                return finish(arr, orientation, size)
        return decode_bytes(data, size)[0]

    return run


def pillow_reduce(data: bytes, size: int) -> np.ndarray:
    """The reference's decode, with Image.reduce by the whole factor left before the bilinear resize."""
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
        w, h = img.size
        if img.format == "JPEG" and min(w, h) >= 2 * size:
            img.draft("RGB", (size, size))
        img.load()
        rgb = to_rgb(upright(img))
    fx, fy = max(rgb.width // size, 1), max(rgb.height // size, 1)
    if fx > 1 or fy > 1:
        rgb = rgb.reduce((fx, fy))
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def simplejpeg_draft(data: bytes, w: int, h: int, size: int) -> np.ndarray:
    import simplejpeg

    s = draft_scale(w, h, size)
    return simplejpeg.decode_jpeg(data, colorspace="rgb", min_factor=s, min_height=-(-h // s),
                                  min_width=-(-w // s))


def simplejpeg_fine(data: bytes, w: int, h: int, size: int) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="rgb", min_height=size, min_width=size)


@functools.cache
def turbo():
    """One PyTurboJPEG instance per process (it opens a fresh libjpeg-turbo handle per call)."""
    import turbojpeg

    return turbojpeg.TurboJPEG()


def turbojpeg_draft(data: bytes, w: int, h: int, size: int) -> np.ndarray:
    import turbojpeg

    s = draft_scale(w, h, size)
    return turbo().decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(1, s) if s > 1 else None)


def turbojpeg_fine(data: bytes, w: int, h: int, size: int) -> np.ndarray:
    import turbojpeg

    def scaled(dim: int, f: tuple[int, int]) -> int:
        return -(-dim * f[0] // f[1])  # libjpeg-turbo's TJSCALED

    fits = [f for f in turbo().scaling_factors
            if f[0] <= f[1] and scaled(w, f) >= min(size, w) and scaled(h, f) >= min(size, h)]
    best = min(fits, key=lambda f: f[0] / f[1])
    return turbo().decode(data, pixel_format=turbojpeg.TJPF_RGB,
                          scaling_factor=best if best[0] != best[1] else None)


def available_decoders() -> dict[str, Decoder | None]:
    """Contender name -> decoder of bytes; None for the reference (load_image itself). Missing packages skip."""
    found: dict[str, Decoder | None] = {"reference": None, "pillow+reduce": pillow_reduce}
    try:
        import simplejpeg  # noqa: F401

        found["simplejpeg"] = fast_path(simplejpeg_draft)
        found["simplejpeg-fine"] = fast_path(simplejpeg_fine)
    except ImportError:
        print("simplejpeg not installed: skipped")
    try:
        turbo()
        found["turbojpeg"] = fast_path(turbojpeg_draft)
        found["turbojpeg-fine"] = fast_path(turbojpeg_fine)
    except (ImportError, OSError, RuntimeError) as e:
        print(f"PyTurboJPEG unusable ({type(e).__name__}: {str(e).splitlines()[0]}): skipped")
    return found


DECODERS: dict[str, Decoder | None] = {}  # filled in main(); forked worker processes inherit it


def load(name: str, path: Path, size: int) -> np.ndarray:
    """What embed's decode thread does per file, with contender ``name``: read, sha256, decode, resize."""
    decoder = DECODERS[name]
    if decoder is None:
        return load_image(path, size).pixels
    data = read_regular_file(path)
    hashlib.sha256(data).hexdigest()
    return decoder(data, size)


def _load_args(args: tuple[str, Path, int]) -> np.ndarray:
    return load(*args)


# ---------------------------------------------------------------------------------------------- photos

def jpegs(name: str) -> list[Path]:
    return sorted(p for p in (SHARED / "datasets" / name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def short_side(path: Path) -> int:
    with Image.open(path) as img:
        return min(img.size)


def collect(n: int, size: int) -> tuple[list[Path], list[Path]]:
    """(the mix: n JPEGs spread evenly over the five sets, the large set: every JPEG with short side >= 2x size)."""
    mix: list[Path] = []
    large: list[Path] = []
    for i, name in enumerate(SETS):
        files = jpegs(name)
        if not files:
            sys.exit(f"no JPEGs under {SHARED / 'datasets' / name}")
        want = min(n // len(SETS) + (i < n % len(SETS)), len(files))
        mix += [files[j] for j in np.linspace(0, len(files) - 1, want).round().astype(int)]
        large += [f for f in files if short_side(f) >= 2 * size]
    return mix, large


# ---------------------------------------------------------------------------------------------- timing

def one_thread(name: str, files: list[Path], size: int) -> float:
    t = time.perf_counter()
    for f in files:
        load(name, f, size)
    return time.perf_counter() - t


def threads(name: str, files: list[Path], size: int) -> float:
    """A pool of WORKERS threads fed in order, LOOKAHEAD ahead: decode_in_order's structure."""
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque[Future] = deque()
        for f in files:
            pending.append(pool.submit(load, name, f, size))
            if len(pending) >= LOOKAHEAD:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    return time.perf_counter() - t


def processes(name: str, files: list[Path], size: int, pool: ProcessPoolExecutor) -> float:
    """WORKERS processes (already started), in order, the pixels pickled back to this process."""
    t = time.perf_counter()
    for _ in pool.map(_load_args, [(name, f, size) for f in files], chunksize=8):
        pass
    return time.perf_counter() - t


def decode_in_order_rate(files: list[Path], size: int) -> float:
    """img/s of tl_embed's own decode_in_order (the reference through embed's pool), as a check of threads()."""
    todo = [ImageFile(str(f), f, None, None, 0, 0) for f in files]
    t = time.perf_counter()
    for _ in decode_in_order(todo, size, WORKERS, LOOKAHEAD):
        pass
    return len(files) / (time.perf_counter() - t)


@dataclass
class Timings:
    single: list[float] = field(default_factory=list)  # seconds per round
    threads: list[float] = field(default_factory=list)
    processes: list[float] = field(default_factory=list)


def time_all(names: list[str], files: list[Path], size: int, repeats: int) -> dict[str, Timings]:
    out = {name: Timings() for name in names}
    with ProcessPoolExecutor(max_workers=WORKERS) as pool:
        for name in names:  # warm the workers: imports, page cache, PyTurboJPEG's library
            processes(name, files[:32], size, pool)
        for r in range(repeats):
            for name in names:
                out[name].single.append(one_thread(name, files, size))
                out[name].threads.append(threads(name, files, size))
                out[name].processes.append(processes(name, files, size, pool))
            print(f"  round {r + 1}/{repeats} done", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- closeness

@dataclass
class Closeness:
    hist: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # |diff| counts
    identical: int = 0
    photos: int = 0
    cosines: np.ndarray | None = None

    def add(self, ref: np.ndarray, other: np.ndarray) -> None:
        d = np.abs(ref.astype(np.int16) - other.astype(np.int16)).ravel()
        self.hist += np.bincount(d, minlength=256)
        self.identical += int(not d.any())
        self.photos += 1

    def stats(self) -> tuple[int, float, int]:
        """(max, mean, 99th percentile) of |diff|."""
        nz = np.nonzero(self.hist)[0]
        total = self.hist.sum()
        mean = float((self.hist * np.arange(256)).sum() / total)
        p99 = int(np.searchsorted(np.cumsum(self.hist), math.ceil(0.99 * total)))
        return int(nz[-1]), mean, p99


def embedder() -> Callable[[np.ndarray], np.ndarray]:
    """MobileNetV2, ImageNet weights, average pooling, through tl_embed's Keras runtime: uint8 -> rows."""
    from tl_embed.embedding.backbones import load_backbone
    from tl_embed.embedding.runtime import KerasRuntime

    run = KerasRuntime(load_backbone("mobilenet_v2", weights="imagenet"), threads=WORKERS)

    def embed(pixels: np.ndarray) -> np.ndarray:
        rows = np.concatenate([run(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return embed


def closeness(names: list[str], files: list[Path], size: int, cos_idx: list[int],
              embed: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, Closeness]:
    ref = [load("reference", f, size) for f in files]
    ref_emb = embed(np.stack([ref[i] for i in cos_idx])) if embed else None
    out = {}
    for name in names[1:]:
        c = Closeness()
        kept = {}
        for i, f in enumerate(files):
            px = load(name, f, size)
            c.add(ref[i], px)
            kept[i] = px
        if embed is not None:
            c.cosines = (embed(np.stack([kept[i] for i in cos_idx])) * ref_emb).sum(1)
        out[name] = c
    return out


# ---------------------------------------------------------------------------------------------- report

def spread(values: list[float], digits: int = 1) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(title: str, files: list[Path], t: dict[str, Timings], close: dict[str, Closeness],
           n_cos: int) -> list[dict]:
    n = len(files)
    ref = t["reference"]
    print(f"\n### {title}: {n} photos\n")
    print("| contender | 1 thread ms/photo | vs ref | 2 threads img/s | vs ref | 2 processes img/s | vs ref | "
          f"abs diff max / mean / p99 | identical | cosine min / median ({n_cos}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, tm in t.items():
        ms = [s / n * 1e3 for s in tm.single]
        thr = [n / s for s in tm.threads]
        prc = [n / s for s in tm.processes]
        ratio = [statistics.median(a / b for a, b in zip(getattr(ref, k), getattr(tm, k), strict=True))
                 for k in ("single", "threads", "processes")]
        row = {"contender": name, "ms_per_photo": ms, "threads_img_s": thr, "processes_img_s": prc,
               "speedup_single_threads_processes": ratio}
        if name == "reference":
            pix, ident, cos = "-", "-", "-"
        else:
            c = close[name]
            mx, mean, p99 = c.stats()
            pix, ident = f"{mx} / {mean:.3f} / {p99}", f"{c.identical}/{c.photos}"
            cos = "-" if c.cosines is None else f"{c.cosines.min():.5f} / {np.median(c.cosines):.5f}"
            row.update(diff_max=mx, diff_mean=mean, diff_p99=p99, identical=c.identical,
                       cos_min=None if c.cosines is None else float(c.cosines.min()),
                       cos_median=None if c.cosines is None else float(np.median(c.cosines)))
        print(f"| {name} | {spread(ms, 2)} | {ratio[0]:.2f}x | {spread(thr)} | {ratio[1]:.2f}x | {spread(prc)} | "
              f"{ratio[2]:.2f}x | {pix} | {ident} | {cos} |")
        rows.append(row)
    return rows


def components(files: list[Path], size: int, repeats: int) -> None:
    """Where the reference's time goes, 1 thread: reading + sha256, Pillow's header + EXIF, decoding alone."""

    def read_hash(f: Path) -> None:
        hashlib.sha256(read_regular_file(f)).hexdigest()

    def header(f: Path) -> None:
        jpeg_header(read_regular_file(f))

    def decode_only(f: Path) -> None:
        with Image.open(io.BytesIO(read_regular_file(f)), formats=PIL_FORMATS) as img:
            if img.format == "JPEG" and min(img.size) >= 2 * size:
                img.draft("RGB", (size, size))
            img.load()

    for label, fn in (("read + sha256", read_hash),
                      ("read + Pillow header + EXIF (the fast paths' check)", header),
                      ("read + Pillow decode at the draft scale, no resize", decode_only)):
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for f in files:
                fn(f)
            runs.append((time.perf_counter() - t) / len(files) * 1e3)
        print(f"  {label}: {spread(runs, 3)} ms/photo, 1 thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="photos in the mix (spread over the five sets)")
    ap.add_argument("--size", type=int, default=224, help="the model's input size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-cosine", type=int, default=200, help="photos of the mix embedded (0: no embeddings)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    print(describe_cpu())
    import PIL
    from PIL import features

    versions = [f"Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})"]
    for mod in ("simplejpeg", "turbojpeg"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    print(", ".join(versions))
    DECODERS.update(available_decoders())
    names = list(DECODERS)
    mix, large = collect(args.n, args.size)
    print(f"mix: {len(mix)} JPEGs ({', '.join(SETS)}); large (short side >= {2 * args.size} px): {len(large)}")

    results: dict[str, dict] = {}
    timings: dict[str, dict[str, Timings]] = {}
    for label, files in (("mix", mix), ("large", large)):
        print(f"\ntiming {label} ({len(files)} photos, {args.repeats} rounds) ...", flush=True)
        timings[label] = time_all(names, files, args.size, args.repeats)
        own = [decode_in_order_rate(files, args.size) for _ in range(args.repeats)]
        print(f"  reference through tl_embed's decode_in_order ({WORKERS} threads): {spread(own)} img/s")
        components(files, args.size, args.repeats)

    embed = None
    if args.n_cosine > 0:
        keras_home()
        embed = embedder()
    for label, files in (("mix", mix), ("large", large)):
        cos_idx = (np.linspace(0, len(files) - 1, min(args.n_cosine, len(files))).round().astype(int).tolist()
                   if label == "mix" else list(range(len(files))))
        close = closeness(names, files, args.size, cos_idx, embed)
        results[label] = {"photos": len(files),
                          "rows": report(label, files, timings[label], close, len(cos_idx) if embed else 0)}
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe_cpu(), "versions": versions, "size": args.size,
                                         "repeats": args.repeats, **results}, indent=1))


if __name__ == "__main__":
    main()
