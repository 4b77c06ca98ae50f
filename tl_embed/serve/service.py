"""What every request reads: the :class:`Service` (catalog, heads, runtime, batchers), loaded once.

Routes get it through FastAPI dependencies (:data:`ServiceDep`, :data:`CatalogDep`, :data:`HeadsDep`)
rather than closure variables, so a router module holds only its routes and can be read on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from anyio import CapacityLimiter
from fastapi import Depends, Request

from ..embedding.backbones import check_compatible
from ..embedding.runtime import Runtime
from ..heads.head import Head
from .audit import AuditView
from .batching import Batcher
from .catalog import Catalog
from .errors import ApiError


@dataclass
class Service:
    """Everything the routes read; built once by :func:`load_service`, shared by all requests."""

    catalog: Catalog
    runtime: Runtime
    heads: list[tuple[str, Head]] = field(default_factory=list)
    min_confidence: float = 0.0
    max_batch: int = 8
    max_wait: float = 0.002
    batcher: Batcher | None = None  # images -> embeddings
    searcher: Batcher | None = None  # query vectors -> neighbours, one index call per batch
    decoders: CapacityLimiter | None = None
    audit: AuditView | None = None  # findings of `tl-embed audit` on the index's images (serve --audit)

    def start(self) -> None:
        self.batcher = Batcher(self.runtime, self.max_batch, self.max_wait)
        self.searcher = Batcher(self.catalog.search_batch, 2 * self.max_batch, self.max_wait)

    def stop(self) -> None:
        for b in (self.batcher, self.searcher):
            if b is not None:
                b.close()


def load_service(index: str | os.PathLike, heads: list[str] = (), runtime: str = "auto",
                 min_confidence: float = 0.0, max_batch: int = 8, max_wait: float = 0.002,
                 trust_pickle: bool = False, audit: str | os.PathLike | None = None) -> Service:
    """Open the index, its store (read-only), the heads and an audit's JSON report; refuse heads made with
    another backbone and an audit of other images."""
    from ..embedding.query import runtime_for

    catalog = Catalog(index)
    loaded = []
    for path in heads:
        head = Head.load(path, trust_pickle)
        check_compatible(head.spec, catalog.index.spec, f"head {path}")
        loaded.append((Path(path).stem, head))
    view = None if audit is None else AuditView(audit, catalog)
    return Service(catalog, runtime_for(catalog.index.spec, runtime), loaded, min_confidence, max_batch, max_wait,
                   audit=view)


async def get_service(request: Request) -> Service:
    """The app's one :class:`Service` (``create_app`` puts it in ``app.state``); async, so no thread hop."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_catalog(service: ServiceDep) -> Catalog:
    return service.catalog


CatalogDep = Annotated[Catalog, Depends(get_catalog)]


async def loaded_heads(service: ServiceDep) -> list[tuple[str, Head]]:
    """The heads, or 404 when none is loaded: declared before the query, so it is refused before parsing."""
    if not service.heads:
        raise ApiError(404, "no head is loaded: start the service with --head MODEL.tlh")
    return service.heads


HeadsDep = Annotated[list[tuple[str, Head]], Depends(loaded_heads)]
