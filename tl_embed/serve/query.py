"""The query /search and /predict share, as a dependency: an upload (multipart), a stored image or a vector (JSON).

/search also takes ``qe`` (query expansion); /predict refuses it, as its API description says.

Decoding runs through the same guards as ``tl-embed embed`` (bombs, truncated files) with a lower pixel
cap, in a bounded number of threads, and each embedding has a deadline, so one request can neither crash
nor hang a worker.  The body is read here, not by FastAPI, so that every refusal is ours, in our words.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from anyio import to_thread
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, model_validator
from starlette.datastructures import UploadFile

from ..embedding.images import ImageDecodeError, decode_bytes
from .catalog import MAX_K, MAX_QE
from .errors import ApiError, validation_text
from .service import Service, ServiceDep

FLOAT32_MAX = float(np.finfo(np.float32).max)  # a query vector's numbers are float32
UPLOAD_PIXELS = 50_000_000  # an upload's header may claim at most this; more is refused as a bomb
EMBED_TIMEOUT = 30.0  # seconds; a request never waits longer for its embedding
K_PATTERN = r"^[1-9][0-9]{0,8}$"  # a form's k: ASCII digits, no sign, no leading zero
QE_PATTERN = r"^(0|[1-9][0-9]{0,8})$"  # a form's qe: the same, or 0


class JsonQuery(BaseModel):
    """A query by stored image (``id`` or ``path``) or by embedding (``vector``), as JSON."""

    model_config = ConfigDict(extra="forbid")
    # strict: true is not id 1, "7" and 7.0 are not 7; a JSON number is a float, a string or bool is not
    id: StrictInt | None = None
    path: str | None = None
    vector: list[StrictFloat] | None = None
    k: StrictInt = 10  # its range is checked by parse_k, in our words
    label: str | None = None
    qe: StrictInt = 0  # /search only; its range is checked by parse_qe

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
    qe: int = 0  # /search: expand the query with this many top results


async def started() -> float:
    """When the request's handling began: declared before the query, so ``took_ms`` counts its parsing,
    an upload's decoding and embedding included."""
    return time.perf_counter()


Started = Annotated[float, Depends(started)]


async def parse_query(request: Request, service: ServiceDep) -> ParsedQuery:
    """The query of a /predict request, by its content type; 415 for any other."""
    return await _parse(request, service, search=False)


async def parse_search_query(request: Request, service: ServiceDep) -> ParsedQuery:
    """The query of a /search request: a /predict query that may also give ``qe``."""
    return await _parse(request, service, search=True)


async def _parse(request: Request, service: Service, search: bool) -> ParsedQuery:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _from_form(request, service, search)
    if ctype == "application/json":
        return await _from_json(request, service, search)
    raise ApiError(415, "send multipart/form-data with an 'image' file field, or JSON with id, path or vector")


QueryDep = Annotated[ParsedQuery, Depends(parse_query)]
SearchQueryDep = Annotated[ParsedQuery, Depends(parse_search_query)]


async def _from_form(request: Request, service: Service, search: bool) -> ParsedQuery:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ValueError as e:  # python-multipart's parse errors; starlette before 0.37 let them through
        raise ApiError(400, f"malformed multipart body: {e}") from None
    unknown = sorted(set(form.keys()) - {"image", "k", "label", *(["qe"] if search else [])})
    if unknown:
        optional = "k, label and qe" if search else "k and label"
        raise ApiError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}: send the image as the "
                            f"multipart file field 'image', optionally with {optional}")
    repeated = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1)
    if repeated:
        raise ApiError(422, f"form field(s) {', '.join(map(repr, repeated))} given more than once")
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "send the image as the multipart file field 'image'")
    data = await upload.read()
    vector, width, height = await embed_upload(data, service)
    source = {"kind": "upload", "filename": upload.filename, "width": width, "height": height}
    label = form.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        raise ApiError(422, "label must be a non-empty text field")
    return ParsedQuery(vector, source, parse_k(form.get("k", "10")), label, qe=parse_qe(form.get("qe", "0")))


async def _from_json(request: Request, service: Service, search: bool) -> ParsedQuery:
    catalog = service.catalog
    try:
        body = JsonQuery.model_validate_json(await request.body())
    except ValidationError as e:
        raise ApiError(422, validation_text(e.errors())) from None
    if not search and "qe" in body.model_fields_set:
        raise ApiError(422, "qe (query expansion) is a /search field; /predict does not take it")
    k, qe = parse_k(body.k), parse_qe(body.qe)
    if body.label == "":
        raise ApiError(422, "label must not be empty")
    if body.vector is not None:
        given = np.asarray(body.vector, np.float64)
        if given.shape != (catalog.index.spec.dim,) or not (np.abs(given) <= FLOAT32_MAX).all():
            raise ApiError(422, f"vector must be {catalog.index.spec.dim} finite float32 numbers")
        vector = given.astype(np.float32)
        if catalog.metric == "cosine" and not vector.any():
            raise ApiError(422, "vector is all zeros: it has no direction to compare by cosine")
        return ParsedQuery(vector, {"kind": "vector"}, k, body.label, qe=qe)
    ident = catalog.id_for(body.id, body.path)
    return ParsedQuery(catalog.vector(ident), {"kind": "stored", **catalog.describe(ident)}, k,
                       body.label, exclude=ident, qe=qe)


async def embed_upload(data: bytes, service: Service) -> tuple[np.ndarray, int, int]:
    """Decode (bounded threads, bomb and truncation guards) and embed through the batcher, with a deadline."""
    if not data:
        raise ApiError(422, "the uploaded file is empty")
    size = service.catalog.index.spec.input_size
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


def parse_k(value) -> int:
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


def parse_qe(value) -> int:
    """/search's qe, from a form (digits only, as for k) or JSON: 0 (off) to MAX_QE."""
    if isinstance(value, str) and re.fullmatch(QE_PATTERN, value):
        qe = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        qe = value
    else:
        raise ApiError(422, f"qe must be a whole number, not {value!r}")
    if not 0 <= qe <= MAX_QE:
        raise ApiError(422, f"qe must be between 0 (off) and {MAX_QE}, not {qe}")
    return qe
