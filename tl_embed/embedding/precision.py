"""The precision a backbone computes in: ``fp32`` (the reference), ``bf16`` or ``int8``.

* ``bf16``: the fp32 model, compiled with OpenVINO's ``INFERENCE_PRECISION_HINT`` bf16 — only where the
  CPU has native bf16 (AVX512_BF16 or AMX; OpenVINO reports ``BF16`` among its capabilities).  Elsewhere
  OpenVINO would quietly run fp32, so embedding into a bf16 store there is refused; a query of a bf16
  store on such a CPU is embedded in fp32 with a notice (close to, not the same as, the store's vectors).
* ``int8``: the fp32 model quantized after training by NNCF on a sample of the images being embedded
  (:mod:`.quantize`).  The quantized model depends on that sample, so it cannot be rebuilt from the
  spec: the store carries it (:mod:`.carried`), and its sha256 is part of the spec.

The precision is a field of :class:`~.backbones.BackboneSpec`, so stores, indexes and heads record it and
:func:`~.backbones.check_compatible` refuses to mix precisions.  Every model is compiled with an explicit
hint: a CPU with native bf16 otherwise runs bf16 by default and results drift from fp32 unannounced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..errors import TlEmbedError
from .backbones import PRECISIONS

CHOICES = ("auto", *PRECISIONS)
AUTO = "fp32"  # what ``auto`` picks: benchmarks/precision.py measured no reduced precision within bounds


def check_precision(name: str) -> str:
    """The precision ``name`` asks for (``auto`` resolved), or one line saying which exist."""
    key = name.strip().lower()
    if key == "auto":
        return AUTO
    if key not in PRECISIONS:
        raise TlEmbedError(f"unknown precision {name!r}; choose one of {', '.join(CHOICES)} "
                           "(a store, index or model made by a newer tl_embed needs an upgrade)")
    return key


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 natively on this machine."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def require_runnable(precision: str) -> None:
    """Refuse, before any work, to embed into a store whose precision this machine cannot compute."""
    if precision == "bf16" and not cpu_has_bf16():
        raise TlEmbedError("--precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX), and this one "
                           "has neither (OpenVINO would silently run fp32); use --precision fp32 or int8")


def compile_hint(precision: str, notify: Callable[[str], None] | None = None) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for a model of ``precision``.

    int8 models run their quantized layers in int8 and the rest in fp32.  A bf16 store queried on a CPU
    without bf16 runs fp32, and ``notify`` says so.
    """
    if precision != "bf16":
        return "f32"
    if cpu_has_bf16():
        return "bf16"
    if notify is not None:
        notify("this CPU has no native bf16: embedding with fp32, close to but not exactly the bf16 "
               "the store was made with")
    return "f32"
