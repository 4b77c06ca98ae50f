"""int8 post-training quantization with NNCF, calibrated on the user's own images, and how close it stays.

NNCF (``pip install "tl_embed[int8]"``) quantizes the converted fp32 OpenVINO model on a random sample of
the images being embedded: no labels, no training.  A few dozen other images of the same folder are then
embedded both ways, and the cosine of each image's int8 and fp32 embeddings is what ``embed`` reports:
the user sees what int8 costs on their photos, not on ours.

NNCF's settings were chosen by measurement on MobileNetV2 and the shared photo sets (benchmarks/precision.py):
100 calibration images measured the same as 300 and 30; full bias correction (NNCF's docs warn that small
depthwise nets need it) kept flowers5's cosine median at 0.97 where the fast one left 0.86; the overflow fix
(7-bit weights) avoids the int16 saturation of CPUs without VNNI, and cost no speed on this one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..cpus import cpu_count
from ..errors import TlEmbedError
from .decode import decode_in_order
from .images import ImageDecodeError
from .scan import ImageFile

CALIBRATION_IMAGES = 100
CHECK_IMAGES = 32  # embedded in both precisions to tell the user how close int8 stays
SEED = 0


@dataclass(frozen=True)
class Fidelity:
    """Cosine similarity between each checked image's int8 and fp32 embeddings."""

    images: int
    median: float
    lowest: float

    def text(self) -> str:
        return (f"int8 vs fp32 on {self.images} of your images: cosine median {self.median:.4f}, "
                f"lowest {self.lowest:.4f}")


def split_sample(files: Sequence[ImageFile], seed: int = SEED) -> tuple[list[ImageFile], list[ImageFile]]:
    """(calibration, check) files drawn at random; disjoint unless the folder is too small for both."""
    order = np.random.default_rng(seed).permutation(len(files))
    check = [files[i] for i in order[:CHECK_IMAGES]]
    rest = order[CHECK_IMAGES:] if len(order) >= 2 * CHECK_IMAGES else order
    return [files[i] for i in rest[:CALIBRATION_IMAGES]], check


def decode_pixels(files: Sequence[ImageFile], size: int) -> np.ndarray:
    """The decodable ones of ``files`` as one (N, S, S, 3) uint8 batch (broken ones are skipped here and
    recorded by the embedding pass)."""
    pixels = [r.pixels for _, r in decode_in_order(list(files), size, cpu_count(), 2 * cpu_count())
              if not isinstance(r, ImageDecodeError)]
    return np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)


def quantize(model, calibration: np.ndarray, progress: bool = True):
    """The int8 model of the fp32 OpenVINO ``model``, its activations calibrated on ``calibration`` images.

    NNCF's progress bars go to stderr with ours (``progress``) or nowhere: stdout carries results only.
    """
    try:
        import nncf
    except ImportError:
        raise TlEmbedError('--precision int8 needs NNCF: pip install "tl_embed[int8]"') from None
    if len(calibration) == 0:
        raise TlEmbedError("--precision int8 needs images to calibrate on, and none of the sample decoded")
    nncf.set_log_level(logging.ERROR)  # its progress bars and notes are not ours to print
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
        return nncf.quantize(model, dataset, subset_size=len(calibration), preset=nncf.QuantizationPreset.PERFORMANCE,
                             fast_bias_correction=False,
                             advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))


def fidelity(int8: np.ndarray, fp32: np.ndarray) -> Fidelity:
    """How close the int8 embeddings of some images stay to their fp32 ones."""
    a = int8 / np.maximum(np.linalg.norm(int8, axis=1, keepdims=True), 1e-12)
    b = fp32 / np.maximum(np.linalg.norm(fp32, axis=1, keepdims=True), 1e-12)
    cos = np.sum(a * b, axis=1)
    return Fidelity(len(cos), float(np.median(cos)), float(cos.min()))
