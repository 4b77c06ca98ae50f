"""What machine a benchmark ran on: printed first by every benchmark, since img/s differ between CPUs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def describe_cpu() -> str:
    """One line: model, usable cores, and the SIMD flags that decide inference speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = " ".join(f for f in FLAGS_OF_INTEREST if f in flags) or "none of " + "/".join(FLAGS_OF_INTEREST)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"CPU: {model}; {cores} usable cores; flags: {simd}"
