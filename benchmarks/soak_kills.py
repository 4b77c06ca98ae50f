"""Soak: kill -9 `tl-embed embed` at random moments, again and again, then compare with an uninterrupted run.

    python benchmarks/soak_kills.py --kills 25 --images 300

Each round starts `embed` on the same folder into the same store and SIGKILLs it after a random delay
(inside model loading, mid-batch, mid-commit or mid-compaction; the delays are spread over the whole
length of a run).  After the last kill one run finishes the job.  The store must then hold every image
exactly once with the vectors of an uninterrupted run into a fresh store.  Prints
``N kills, L lost, D duplicated, store identical to an uninterrupted run`` (or what differs) and exits
non-zero when anything was lost, duplicated or different.  A small tiny-model backbone is built on
the fly, so no weights are needed; the store, not the model, is under test.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_cpu  # noqa: E402

from tl_embed import EmbeddingStore  # noqa: E402


@dataclass
class SoakResult:
    kills: int
    lost: int
    duplicated: int
    mismatched: int
    invalid_after_kill: int  # times the store did not open right after a kill

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.mismatched or self.invalid_after_kill)

    def text(self) -> str:
        verdict = "store identical to an uninterrupted run" if self.ok else (
            f"{self.mismatched} vectors differ, {self.invalid_after_kill} invalid stores after a kill")
        return f"{self.kills} kills, {self.lost} lost, {self.duplicated} duplicated, {verdict}"


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.png")
    return root


def make_tiny_model(path: Path) -> Path:
    """A 32 px, 16-d Keras model with fixed weights: loads in a second, same vectors in every process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, name="features")(x)
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    return path


def embed_command(images: Path, out: Path, model: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "tl_embed.cli", "embed", str(images), "--out", str(out), "--model", str(model),
            "--layer", "features", "--batch-size", str(batch_size), "-q"]


def run_once(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=900)
    return time.perf_counter() - t


def vectors(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """path -> vector, and the number of manifest rows (to count duplicates)."""
    with EmbeddingStore.open(path) as s:
        return {p: np.array(v) for p, v in zip(s.paths, s.embeddings, strict=True)}, len(s)


def soak(work: Path, kills: int, n_images: int, batch_size: int = 8, seed: int = 0,
         log=print) -> SoakResult:
    rng = random.Random(seed)
    images = make_images(work / "images", n_images)
    model = make_tiny_model(work / "tiny.keras")
    reference = work / "reference.tle"
    full = run_once(embed_command(images, reference, model, batch_size))
    log(f"uninterrupted run: {n_images} images in {full:.1f} s")
    store = work / "soaked.tle"
    cmd = embed_command(images, store, model, batch_size)
    invalid = 0
    for k in range(kills):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.2, full)  # anywhere from start-up to the final compaction
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if (store / "manifest.sqlite").exists():
            try:
                vectors(store)
            except Exception as e:  # noqa: BLE001 - counted and reported
                invalid += 1
                log(f"kill {k + 1}: store invalid: {type(e).__name__}: {e}")
        if proc.returncode == 0:  # the run finished before the kill: start over from an empty store
            import shutil

            shutil.rmtree(store)
    run_once(cmd)
    want, _ = vectors(reference)
    got, n_rows = vectors(store)
    lost = len(set(want) - set(got))
    duplicated = n_rows - len(got) + len(set(got) - set(want))
    mismatched = sum(not np.allclose(got[p], want[p], rtol=1e-5, atol=1e-6) for p in set(got) & set(want))
    return SoakResult(kills, lost, duplicated, mismatched, invalid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=25)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(describe_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TL_EMBED_CACHE", str(Path(tmp) / "cache"))
        result = soak(Path(tmp), args.kills, args.images, args.batch_size, args.seed)
    print(result.text())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
