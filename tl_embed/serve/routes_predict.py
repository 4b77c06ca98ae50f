"""``POST /predict``: every loaded head's top labels for an upload, a stored image or a vector."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter

from .query import QueryDep
from .schema import QUERY_ERRORS, PredictReply, query_body_schema
from .service import HeadsDep, ServiceDep


def router(dim: int, metric: str) -> APIRouter:
    """Built per app: the description of the query body names the index's vector length and metric."""
    routes = APIRouter()

    @routes.post("/predict", openapi_extra={"requestBody": query_body_schema(dim, metric)},
                 summary="labels from each loaded head", response_model=None,
                 responses={200: {"model": PredictReply}, **QUERY_ERRORS})
    async def predict(heads: HeadsDep, q: QueryDep, service: ServiceDep) -> dict:
        """Top-``k`` labels with probabilities from every head; ``unknown`` when the top probability is
        below the service's ``--min-confidence``.  Takes the same query forms as ``/search``."""
        out = []
        for name, head in heads:
            pred = (await to_thread.run_sync(head.top, q.vector[None, :], q.k, service.min_confidence))[0]
            out.append({"head": name, "label": pred.label, "confidence": round(pred.confidence, 4),
                        "top": [{"label": c, "probability": round(p, 4)} for c, p in pred.top]})
        return {"query": q.source, "min_confidence": service.min_confidence, "predictions": out}

    return routes
