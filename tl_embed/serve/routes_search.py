"""``POST /search``: the nearest stored images to an upload, a stored image or a vector."""

from __future__ import annotations

import asyncio
import time

from anyio import to_thread
from fastapi import APIRouter

from ..search.index import without_self
from .query import SearchQueryDep, Started
from .schema import QUERY_ERRORS, query_body_schema, score_name, search_reply_model
from .service import ServiceDep


def router(dim: int, metric: str) -> APIRouter:
    """Built per app: the description names the index's vector length and its metric's score."""
    routes = APIRouter()

    @routes.post("/search", openapi_extra={"requestBody": query_body_schema(dim, metric, search=True)},
                 summary="nearest stored images", response_model=None,
                 responses={200: {"model": search_reply_model(score_name(metric))}, **QUERY_ERRORS})
    async def search(t0: Started, q: SearchQueryDep, service: ServiceDep) -> dict:
        """Neighbours of an uploaded image (multipart ``image``), a stored image (JSON ``id`` or ``path``)
        or an embedding (JSON ``vector``); ``k`` of them, optionally only those labelled ``label``; ``qe``
        expands the query with its top results first (query expansion)."""
        catalog = service.catalog
        if q.label is not None:
            found = await to_thread.run_sync(catalog.labelled, q.vector, q.label, q.k + 1, q.qe, q.exclude)
        elif q.qe:
            found = await to_thread.run_sync(catalog.expanded, q.vector, q.qe, q.exclude)
        else:
            found = await asyncio.wrap_future(service.searcher.submit(q.vector))
        hits = catalog.neighbours(without_self(found, q.exclude), q.k)
        score = score_name(catalog.metric)
        return {"query": q.source, "metric": catalog.metric, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "neighbours": [{"rank": r, "id": h.id, "path": h.path, "label": h.label, score: round(h.score, 6),
                                "image": f"/images/{h.id}", "thumbnail": f"/images/{h.id}?size=256"}
                               for r, h in enumerate(hits, 1)]}

    return routes
