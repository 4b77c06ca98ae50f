"""What ``tl-embed index`` prints about an index: one paragraph, with warnings where its recall falls short."""

from __future__ import annotations

from pathlib import Path

from ..wording import count
from .choose import advice


def describe(path: Path, meta: dict, n: int, backbone: str, vectors: str) -> str:
    """Type, metric, size, backbone, vector options, measured recall, memory, latency and build time, then
    warnings, of the index at ``path`` with ``meta`` and ``n`` vectors."""
    m = meta
    params = ", ".join(f"{k}={v}" for k, v in m.get("search_params", {}).items())
    qps = f", {m['qps']:.0f} queries/s batched" if m.get("qps") else ""
    how = "held-out" if m.get("recall_measure") == "held-out" else "leave-one-out"
    return (f"{path}: {m['factory']}{' + re-rank' if m.get('rerank') else ''} ({m['metric']}"
            f"{', ' + params if params else ''}) over {n} vectors from {backbone}"
            f"{', ' + vectors if vectors else ''}; "
            f"recall@10 {m['recall_at_10']:.3f} vs exact on {how} {count(m['recall_queries'], 'query')}, "
            f"{m['memory_bytes'] / 1e6:.1f} MB, {m['latency_ms']:.2f} ms per single query{qps}; "
            f"built in {m['build_seconds']:.1f} s" + notes(m, n))


def notes(meta: dict, n: int) -> str:
    """Warnings: the target was missed (and what to change), or the measure predates an update."""
    out = ""
    target = meta.get("target_recall")
    if target is not None and meta["recall_at_10"] < target:
        out += (f". WARNING: recall@10 stays below the target {target:.2f} even at the widest search; "
                + advice(meta["factory"], bool(meta.get("rerank"))))
    measured = meta.get("measured_vectors")
    if measured is not None and measured < 0.9 * n:
        out += f". Recall was measured at the last full build, on {measured} vectors: rebuild to measure it again"
    return out
