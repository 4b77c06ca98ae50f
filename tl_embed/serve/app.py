"""The HTTP service: FastAPI routes over a :class:`Service` (catalog, heads, runtime, batcher) loaded once.

Every bad input is a 4xx with ``{"error": "..."}``: decoding runs through the same guards as
``tl-embed embed`` (bombs, truncated files) with a lower pixel cap, in a bounded number of threads, and
each embedding has a deadline, so one request can neither crash nor hang a worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, Query, Request
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, create_model, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..cpus import cpu_count
from ..embedding.backbones import check_compatible
from ..embedding.images import ImageDecodeError, decode_bytes
from ..embedding.runtime import Runtime
from ..errors import TlEmbedError
from ..heads.head import Head
from ..search.index import without_self
from .batching import Batcher
from .catalog import MAX_K, THUMBNAIL_MAX, Catalog, NotFound
from .guard import BodyTooLarge, Guard

STATIC = Path(__file__).with_name("static")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a query vector's numbers are float32
UPLOAD_PIXELS = 50_000_000  # an upload's header may claim at most this; more is refused as a bomb
EMBED_TIMEOUT = 30.0  # seconds; a request never waits longer for its embedding


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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

    def start(self) -> None:
        self.batcher = Batcher(self.runtime, self.max_batch, self.max_wait)
        self.searcher = Batcher(self.catalog.search_batch, 2 * self.max_batch, self.max_wait)

    def stop(self) -> None:
        for b in (self.batcher, self.searcher):
            if b is not None:
                b.close()


def load_service(index: str | os.PathLike, heads: list[str] = (), runtime: str = "auto",
                 min_confidence: float = 0.0, max_batch: int = 8, max_wait: float = 0.002,
                 trust_pickle: bool = False) -> Service:
    """Open the index, its store (read-only) and the heads; refuse heads made with another backbone."""
    from ..embedding.query import runtime_for

    catalog = Catalog(index)
    loaded = []
    for path in heads:
        head = Head.load(path, trust_pickle)
        check_compatible(head.spec, catalog.index.spec, f"head {path}")
        loaded.append((Path(path).stem, head))
    return Service(catalog, runtime_for(catalog.index.spec, runtime), loaded, min_confidence, max_batch, max_wait)


class JsonQuery(BaseModel):
    """A query by stored image (``id`` or ``path``) or by embedding (``vector``), as JSON."""

    model_config = ConfigDict(extra="forbid")
    # strict: true is not id 1, "7" and 7.0 are not 7; a JSON number is a float, a string or bool is not
    id: StrictInt | None = None
    path: str | None = None
    vector: list[StrictFloat] | None = None
    k: StrictInt = 10  # its range is checked by _k, in our words
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def no_nulls(cls, data: Any) -> Any:
        """A field is given or left out, never null (the API description says so)."""
        if isinstance(data, dict):
            nulls = sorted(str(k) for k, v in data.items() if v is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)} must not be null: leave out what you do not give")
        return data

    @model_validator(mode="after")
    def one_source(self) -> JsonQuery:
        given = [n for n in ("id", "path", "vector") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of id, path or vector")
        return self


@dataclass
class ParsedQuery:
    vector: np.ndarray
    source: dict[str, Any]
    k: int
    label: str | None
    exclude: int | None = None  # a stored image is not its own neighbour


def create_app(service: Service, token: str | None = None, max_upload: int = 20_000_000) -> Guard:
    """The ASGI app (FastAPI behind the :class:`Guard`); the batcher starts with the app and stops with it."""

    async def lifespan(_app):
        service.start()
        service.decoders = CapacityLimiter(2 * cpu_count())  # bounds the memory of decoding in parallel
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="tl-embed", version=__version__, lifespan=lifespan,
                  description="Similarity search and classification over a tl-embed index.")
    _add_error_handlers(app)
    catalog = service.catalog
    score_name = "similarity" if catalog.metric == "cosine" else "distance"

    async def parse(request: Request) -> ParsedQuery:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except ValueError as e:  # python-multipart's parse errors; starlette before 0.37 let them through
                raise ApiError(400, f"malformed multipart body: {e}") from None
            unknown = sorted(set(form.keys()) - {"image", "k", "label"})
            if unknown:
                raise ApiError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}: send the image as the "
                                    "multipart file field 'image', optionally with k and label")
            repeated = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1)
            if repeated:
                raise ApiError(422, f"form field(s) {', '.join(map(repr, repeated))} given more than once")
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "send the image as the multipart file field 'image'")
            data = await upload.read()
            vector, width, height = await embed_upload(data)
            source = {"kind": "upload", "filename": upload.filename, "width": width, "height": height}
            label = form.get("label")
            if label is not None and (not isinstance(label, str) or not label):
                raise ApiError(422, "label must be a non-empty text field")
            return ParsedQuery(vector, source, _k(form.get("k", "10")), label)
        if ctype == "application/json":
            try:
                body = JsonQuery.model_validate_json(await request.body())
            except ValidationError as e:
                raise ApiError(422, _validation_text(e.errors())) from None
            k = _k(body.k)
            if body.label == "":
                raise ApiError(422, "label must not be empty")
            if body.vector is not None:
                given = np.asarray(body.vector, np.float64)
                if given.shape != (catalog.index.spec.dim,) or not (np.abs(given) <= FLOAT32_MAX).all():
                    raise ApiError(422, f"vector must be {catalog.index.spec.dim} finite float32 numbers")
                vector = given.astype(np.float32)
                if catalog.metric == "cosine" and not vector.any():
                    raise ApiError(422, "vector is all zeros: it has no direction to compare by cosine")
                return ParsedQuery(vector, {"kind": "vector"}, k, body.label)
            ident = catalog.id_for(body.id, body.path)
            return ParsedQuery(catalog.vector(ident), {"kind": "stored", **catalog.describe(ident)}, k,
                               body.label, exclude=ident)
        raise ApiError(415, "send multipart/form-data with an 'image' file field, or JSON with id, path or vector")

    async def embed_upload(data: bytes) -> tuple[np.ndarray, int, int]:
        if not data:
            raise ApiError(422, "the uploaded file is empty")
        size = catalog.index.spec.input_size
        try:
            pixels, width, height = await to_thread.run_sync(decode_bytes, data, size, UPLOAD_PIXELS,
                                                             limiter=service.decoders)
        except ImageDecodeError as e:
            status = 415 if e.reason.startswith("not a recognised") else (
                413 if e.reason.startswith("too large") else 422)
            raise ApiError(status, f"cannot use the upload as an image: {e.reason}") from None
        try:
            vector = await asyncio.wait_for(asyncio.wrap_future(service.batcher.submit(pixels)), EMBED_TIMEOUT)
        except asyncio.TimeoutError:
            raise ApiError(503, "the model is overloaded: no embedding within "
                                f"{EMBED_TIMEOUT:.0f} s; try again") from None
        return vector, width, height

    request_body = query_body_schema(catalog.index.spec.dim, catalog.metric)
    query_errors = error_responses(400, 404, 413, 415, 422, 503)

    @app.post("/search", openapi_extra={"requestBody": request_body}, summary="nearest stored images",
              response_model=None, responses={200: {"model": search_reply_model(score_name)}, **query_errors})
    async def search(request: Request) -> dict:
        """Neighbours of an uploaded image (multipart ``image``), a stored image (JSON ``id`` or ``path``)
        or an embedding (JSON ``vector``); ``k`` of them, optionally only those labelled ``label``."""
        t0 = time.perf_counter()
        q = await parse(request)
        if q.label is None:
            found = await asyncio.wrap_future(service.searcher.submit(q.vector))
        else:
            found = await to_thread.run_sync(catalog.labelled, q.vector, q.label, q.k + 1)
        hits = catalog.neighbours(without_self(found, q.exclude), q.k)
        return {"query": q.source, "metric": catalog.metric, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "neighbours": [{"rank": r, "id": h.id, "path": h.path, "label": h.label, score_name: round(h.score, 6),
                                "image": f"/images/{h.id}", "thumbnail": f"/images/{h.id}?size=256"}
                               for r, h in enumerate(hits, 1)]}

    @app.post("/predict", openapi_extra={"requestBody": request_body}, summary="labels from each loaded head",
              response_model=None, responses={200: {"model": PredictReply}, **query_errors})
    async def predict(request: Request) -> dict:
        """Top-``k`` labels with probabilities from every head; ``unknown`` when the top probability is
        below the service's ``--min-confidence``.  Takes the same query forms as ``/search``."""
        if not service.heads:
            raise ApiError(404, "no head is loaded: start the service with --head MODEL.tlh")
        q = await parse(request)
        out = []
        for name, head in service.heads:
            proba = (await to_thread.run_sync(head.predict_proba, q.vector[None, :]))[0]
            order = np.argsort(-proba)[:min(q.k, len(head.classes))]
            top = [{"label": head.classes[j], "probability": round(float(proba[j]), 4)} for j in order]
            confident = top[0]["probability"] >= service.min_confidence
            out.append({"head": name, "label": top[0]["label"] if confident else "unknown",
                        "confidence": top[0]["probability"], "top": top})
        return {"query": q.source, "min_confidence": service.min_confidence, "predictions": out}

    @app.head("/images/{image_id}", include_in_schema=False)
    @app.get("/images/{image_id}", summary="a stored image, or its thumbnail", response_class=Response,
             responses={200: {"description": "the image file as stored (any of the formats embed reads), or a "
                                             "JPEG thumbnail", "content": {"image/*": {}}},
                        **error_responses(404, 422)})
    def image(image_id: str = FastApiPath(pattern=r"^[0-9]{1,18}$", description="the image's id: digits only"),
              size: int | None = Query(None, ge=16, le=THUMBNAIL_MAX, description="longer side of a JPEG thumbnail")):
        """Only images the store holds, by id; ``size`` gives a JPEG thumbnail instead of the file."""
        image_id = int(image_id)  # ASCII digits only: "+1", "1_0" and full-width digits are not ids
        cache = {"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"}
        if size is None:
            return FileResponse(catalog.image_file(image_id), headers=cache)
        return Response(catalog.thumbnail(image_id, size), media_type="image/jpeg", headers=cache)

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", summary="liveness", response_model=None, responses={200: {"model": HealthReply}})
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/info", summary="what is loaded", response_model=None, responses={200: {"model": InfoReply}})
    def info() -> dict:
        """Backbone, counts, index type and its measured recall, heads, batching statistics."""
        idx = catalog.index
        b, sb = service.batcher, service.searcher
        return {
            "version": __version__,
            "backbone": idx.spec.describe(), "spec": idx.spec.to_dict(), "runtime": service.runtime.name,
            "index": {"path": str(idx.path), "type": idx.meta["factory"], "metric": catalog.metric,
                      "vectors": len(idx), "recall_at_10": idx.meta.get("recall_at_10"),
                      "recall_queries": idx.meta.get("recall_queries"),
                      "search_params": idx.meta.get("search_params", {})},
            "store": {"path": str(catalog.store_path), "images": len(catalog), "labels": catalog.label_counts},
            "heads": [{"name": n, "head": h.head, "classes": h.classes} for n, h in service.heads],
            "min_confidence": service.min_confidence,
            "batching": {"max_batch": service.max_batch, "max_wait_ms": 1000 * service.max_wait,
                         "batches": b.batches if b else 0, "images": b.images if b else 0,
                         "search_batches": sb.batches if sb else 0, "searches": sb.images if sb else 0},
        }

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        """The page links its SVG icon, but browsers and tools also ask here: the same icon, not a 404."""
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                            headers={"cache-control": "public, max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, token, max_upload)


class _Reply(BaseModel):
    """What a route answers, for the API description (the routes build the JSON themselves)."""

    model_config = ConfigDict(extra="forbid")


class NeighbourBase(_Reply):
    rank: int
    id: int
    path: str  # relative to the store's image root
    label: str | None
    image: str
    thumbnail: str


class LabelProbability(_Reply):
    label: str
    probability: float


class Prediction(_Reply):
    head: str
    label: str  # "unknown" below --min-confidence
    confidence: float
    top: list[LabelProbability]


class PredictReply(_Reply):
    query: dict[str, Any]
    min_confidence: float
    predictions: list[Prediction]


class HealthReply(_Reply):
    status: str


class InfoReply(_Reply):
    version: str
    backbone: str
    spec: dict[str, Any]
    runtime: str
    index: dict[str, Any]
    store: dict[str, Any]
    heads: list[dict[str, Any]]
    min_confidence: float
    batching: dict[str, Any]


def search_reply_model(score_name: str) -> type[BaseModel]:
    """/search's answer; each neighbour's score is named for the metric (similarity or distance)."""
    neighbour = create_model("Neighbour", __base__=NeighbourBase, **{score_name: (float, ...)})
    return create_model("SearchReply", __base__=_Reply, query=(dict[str, Any], ...), metric=(str, ...),
                        took_ms=(float, ...), neighbours=(list[neighbour], ...))


class ErrorReply(BaseModel):
    """Every error the service answers: one line saying what went wrong and what to do."""

    error: str


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route answers, all with the one error shape."""
    return {status: {"model": ErrorReply, "description": HTTPStatus(status).phrase} for status in statuses}


def query_body_schema(dim: int, metric: str) -> dict:
    """The request body of /search and /predict as the server takes it: a multipart upload, or JSON
    with exactly one of id, path or vector (a vector of ``dim`` float32 numbers; for cosine not all 0)."""
    vector: dict[str, Any] = {"type": "array", "minItems": dim, "maxItems": dim,
                              "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}}
    if metric == "cosine":
        vector["not"] = {"items": {"const": 0}}
    k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
    label = {"type": "string", "minLength": 1}
    json_query = {"type": "object", "additionalProperties": False,
                  "properties": {"id": {"type": "integer", "minimum": 0}, "path": {"type": "string", "minLength": 1},
                                 "vector": vector, "k": k, "label": label},
                  "oneOf": [{"required": ["id"]}, {"required": ["path"]}, {"required": ["vector"]}]}
    # a form carries text only: a number sent as k or label arrives as its digits, and is taken as such
    form_k = {"type": ["integer", "string"], "minimum": 1, "maximum": MAX_K, "default": 10,
              "pattern": f"^([1-9][0-9]{{0,{len(str(MAX_K)) - 2}}}|{MAX_K})$"}  # MAX_K is a power of ten
    form_label = {"type": ["string", "number", "integer", "boolean", "null"], "minLength": 1,
                  "description": "the label, as text"}
    upload = {"type": "object", "required": ["image"], "additionalProperties": False,
              "properties": {"image": {"type": "string", "format": "binary", "contentMediaType": "image/*"},
                             "k": form_k, "label": form_label}}
    return {"required": True, "content": {"multipart/form-data": {"schema": upload},
                                          "application/json": {"schema": json_query}}}


K_PATTERN = r"^[1-9][0-9]{0,8}$"  # a form's k: ASCII digits, no sign, no leading zero


def _k(value) -> int:
    """A form's k: ASCII digits only (int() would also take "+10", "1_0", " 10" and full-width digits)."""
    if isinstance(value, str) and re.fullmatch(K_PATTERN, value):
        k = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    else:
        raise ApiError(422, f"k must be a whole number, not {value!r}")
    if not 1 <= k <= MAX_K:
        raise ApiError(422, f"k must be between 1 and {MAX_K}, not {k}")
    return k


def _validation_text(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every error: ``{"error": "..."}``."""

    def reply(status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return reply(e.status, str(e))

    @app.exception_handler(NotFound)
    async def not_found(_request, e: NotFound):
        return reply(404, str(e))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request, e: BodyTooLarge):
        return reply(413, str(e))

    @app.exception_handler(TlEmbedError)
    async def user_error(_request, e: TlEmbedError):
        return reply(422, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        return reply(422, _validation_text(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return reply(e.status_code, str(e.detail), getattr(e, "headers", None))
