"""``GET /healthz`` (liveness) and ``GET /info`` (what is loaded, and how batching is going)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import __version__
from .schema import HealthReply, InfoReply
from .service import ServiceDep

router = APIRouter()


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="liveness", response_model=None, responses={200: {"model": HealthReply}})
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/info", summary="what is loaded", response_model=None, responses={200: {"model": InfoReply}})
def info(service: ServiceDep) -> dict:
    """Backbone, counts, index type and its measured recall, heads, batching statistics, the audit loaded."""
    catalog = service.catalog
    idx = catalog.index
    b, sb = service.batcher, service.searcher
    return {
        "version": __version__,
        "backbone": idx.spec.describe(), "spec": idx.spec.to_dict(), "runtime": service.runtime.name,
        "index": {"path": str(idx.path), "type": idx.meta["factory"], "metric": catalog.metric,
                  "vectors": len(idx), "recall_at_10": idx.meta.get("recall_at_10"),
                  "recall_queries": idx.meta.get("recall_queries"),
                  "search_params": idx.meta.get("search_params", {}),
                  "whiten": idx.meta.get("whiten"), "dba": idx.meta.get("dba")},
        "store": {"path": str(catalog.store_path), "images": len(catalog), "labels": catalog.label_counts},
        "heads": [{"name": n, "head": h.head, "classes": h.classes} for n, h in service.heads],
        "min_confidence": service.min_confidence,
        "audit": None if service.audit is None else
        {"path": str(service.audit.path), "findings": {k: len(v) for k, v in service.audit.sections.items()}},
        "batching": {"max_batch": service.max_batch, "max_wait_ms": 1000 * service.max_wait,
                     "batches": b.batches if b else 0, "images": b.images if b else 0,
                     "search_batches": sb.batches if sb else 0, "searches": sb.images if sb else 0},
    }
