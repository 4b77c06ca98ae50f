"""Global descriptors of a backbone's last feature map, from the image-retrieval literature.

* ``avg``, ``max``: Keras's global average / max pooling (``max`` is MAC).
* ``gem``: generalised mean, ``(mean over the map of x^p)^(1/p)`` with p = 3 (Radenović, Tolias & Chum,
  "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2019): between average (p = 1) and
  max (p -> inf) pooling, it weights the strongest activations, which is what matches objects.
* ``rmac``: regional maximum activations (Tolias, Sicre & Jégou, ICLR 2016): MACs of square regions at 3
  scales laid over the map with about 40% overlap, each L2-normalised, summed.  Regions follow the
  authors' grid as cirtorch's ``rmac`` lays it out (the global MAC, then the levels l = 1..3).

Each is built into the Keras graph before conversion, so OpenVINO computes it with the backbone: one
inference per image whatever the descriptor.  The choice is recorded in the spec's ``pooling``, like
the backbone, and enforced on every query.

Multi-scale (``scales``, e.g. 1 and √2, from the same paper): the image is decoded once at the largest
scale, the graph resizes it to each smaller one, runs the backbone on every scale and combines their
descriptors as cirtorch's ``extract_ms`` does.  Recorded in the spec's ``scales``; it costs one backbone
pass per scale, each in proportion to its area (1 + 2 = 3x for 1,1.414).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import TlEmbedError

GEM_P = 3.0  # the literature's p for off-the-shelf CNN features (Radenović et al.)
EPS = 1e-6  # cirtorch's clamp before the power, and its guard in the L2 normalisations
RMAC_LEVELS = 3
RMAC_OVERLAP = 0.4
SCALE_RANGE = (0.25, 4.0)  # of the backbone's native input size
MAX_SCALES = 4


def gem(x: Any, p: float = GEM_P) -> Any:
    """(N, H, W, C) -> (N, C) generalised mean of the non-negative activations."""
    from keras import ops

    return ops.power(ops.mean(ops.power(ops.maximum(x, EPS), p), axis=(1, 2)), 1.0 / p)


def rmac_regions(h: int, w: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """(top, left, size) of every R-MAC region of an ``h`` x ``w`` map, the whole map first."""
    side = min(h, w)
    extra_w = extra_h = 0
    if h != w:  # more regions along the long side, the count whose overlap is nearest 40%
        steps = [s for s in range(2, 8)]
        b = [(max(h, w) - side) / (s - 1) for s in steps]
        best = min(range(len(steps)), key=lambda i: abs((side ** 2 - side * b[i]) / side ** 2 - RMAC_OVERLAP))
        if h < w:
            extra_w = best + 1
        else:
            extra_h = best + 1
    regions = [(0, 0, side if h == w else -1)]  # -1: the whole (possibly oblong) map
    for level in range(1, levels + 1):
        size = math.floor(2 * side / (level + 1))
        if size == 0:
            continue
        half = math.floor(size / 2 - 1)
        starts_w = _starts(w, size, half, level + extra_w)
        starts_h = _starts(h, size, half, level + extra_h)
        regions += [(top, left, size) for top in starts_h for left in starts_w]
    return regions


def _starts(length: int, size: int, half: int, n: int) -> list[int]:
    b = 0.0 if n == 1 else (length - size) / (n - 1)
    return [int(math.floor(half + i * b) - half) for i in range(n)]


def rmac(x: Any, levels: int = RMAC_LEVELS) -> Any:
    """(N, H, W, C) with static H, W -> (N, C): the sum of the L2-normalised MACs of the R-MAC regions."""
    from keras import ops

    h, w = int(x.shape[1]), int(x.shape[2])
    total = None
    for top, left, size in rmac_regions(h, w, levels):
        region = x if size == -1 else x[:, top:top + size, left:left + size, :]
        v = ops.max(region, axis=(1, 2))
        v = v / (ops.sqrt(ops.sum(v * v, axis=-1, keepdims=True)) + EPS)
        total = v if total is None else total + v
    return total


def pool(x: Any, pooling: str) -> Any:
    """The ``pooling`` descriptor of the symbolic feature map ``x``: built-in layers and Keras ops only, so
    a saved model (an export, the Ray engine's keras runtime) loads without custom objects."""
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D()(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D()(x)
    return gem(x) if pooling == "gem" else rmac(x)


def check_scales(scales: str) -> str:
    """``"1.414,1"`` -> the canonical text the spec records (``"1,1.414"``: sorted, each once); one line if invalid."""
    try:
        values = sorted({float(v) for v in str(scales).split(",")})
    except ValueError:
        values = []
    if not values or len(values) > MAX_SCALES or not all(SCALE_RANGE[0] <= v <= SCALE_RANGE[1] for v in values):
        raise TlEmbedError(f"--scales takes up to {MAX_SCALES} comma-separated numbers between {SCALE_RANGE[0]:g} "
                           f"and {SCALE_RANGE[1]:g} (the literature's: 1,1.414), not {scales!r}")
    return ",".join(f"{v:g}" for v in values)


def scale_sizes(input_size: int, scales: str) -> list[int]:
    """The pixel size of each scale of a backbone whose native input is ``input_size``, smallest first."""
    return [max(32, round(input_size * float(v))) for v in scales.split(",")]


def multiscale(pixels: Any, sizes: list[int], describe: Callable[[Any], Any], pooling: str) -> Any:
    """(N, S, S, 3) pixels at the largest of ``sizes`` -> one descriptor of the image at every size.

    As cirtorch's ``extract_ms``: each scale's descriptor L2-normalised, then their generalised mean with
    the pooling's own exponent (GeM's p; 1, a plain mean, for the others).  Smaller scales are resized
    from the pixels in the graph (bilinear), so one decode serves all of them.
    """
    from keras import layers, ops

    p = GEM_P if pooling == "gem" else 1.0
    total = None
    for size in sizes:
        x = pixels if size == sizes[-1] else layers.Resizing(size, size, interpolation="bilinear")(pixels)
        d = describe(x)
        d = d / (ops.sqrt(ops.sum(d * d, axis=-1, keepdims=True)) + EPS)
        d = d if p == 1.0 else ops.power(ops.maximum(d, EPS), p)
        total = d if total is None else total + d
    mean = total / len(sizes)
    return mean if p == 1.0 else ops.power(mean, 1.0 / p)
