"""How many cores this process may use: shared by the runtimes, the head search and the service."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core host sees 64 cores in its affinity mask; its quota
    (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` in v1) says 2.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by this process's cgroup quota, or None when there is none (or no cgroup fs)."""
    for rel in _own_cgroups():
        v2 = root / rel / "cpu.max"
        v1 = root / "cpu" / rel
        try:
            if v2.is_file():
                quota, period = v2.read_text().split()[:2]
                if quota != "max":
                    return int(quota) / int(period)
            elif (v1 / "cpu.cfs_quota_us").is_file():
                quota = int((v1 / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    return quota / int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


def _own_cgroups() -> list[str]:
    """This process's cgroup paths (relative), innermost first, ending with the root ("")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return [""]
    paths: list[str] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
            rel = parts[2].strip("/")
            while rel:
                paths.append(rel)
                rel = rel.rpartition("/")[0]
    return [*dict.fromkeys(paths), ""]
