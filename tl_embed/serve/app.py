"""The HTTP service: FastAPI routers over a :class:`Service` (catalog, heads, runtime, batchers) loaded once.

``create_app`` puts the service in ``app.state`` (routes get it through dependencies, ``service.py``),
includes the routers (``routes_*.py``) and wraps the app in the :class:`Guard` (token, body limit), which
stays plain ASGI middleware: it must answer before routing, for every path, and before a body is read.
Every bad input is a 4xx with ``{"error": "..."}`` (``errors.py``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from anyio import CapacityLimiter
from fastapi import FastAPI

from .. import __version__
from ..cpus import cpu_count
from . import routes_audit, routes_images, routes_page, routes_predict, routes_search, routes_status
from .errors import add_error_handlers
from .guard import Guard
from .service import Service, load_service

__all__ = ["Service", "create_app", "load_service"]


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The batchers start with the app and stop with it."""
    service: Service = app.state.service
    service.start()
    service.decoders = CapacityLimiter(2 * cpu_count())  # bounds the memory of decoding in parallel
    try:
        yield
    finally:
        service.stop()


def create_app(service: Service, token: str | None = None, max_upload: int = 20_000_000) -> Guard:
    """The ASGI app (FastAPI behind the :class:`Guard`); the batcher starts with the app and stops with it."""
    app = FastAPI(title="tl-embed", version=__version__, lifespan=lifespan,
                  description="Similarity search and classification over a tl-embed index.")
    app.state.service = service
    add_error_handlers(app)
    dim, metric = service.catalog.index.spec.dim, service.catalog.metric
    app.include_router(routes_search.router(dim, metric))  # this order is the API description's
    app.include_router(routes_predict.router(dim, metric))
    app.include_router(routes_images.router)
    app.include_router(routes_audit.router)
    app.include_router(routes_status.router)
    app.include_router(routes_page.router)
    app.mount("/static", routes_page.static_files(), name="static")
    return Guard(app, token, max_upload)
