"""What ``/openapi.json`` says the service answers and takes; the routes build their JSON themselves.

The replies are models only for the description (a schemathesis test checks it against the server),
and the query body is written out by hand because the routes read it themselves (see ``query.py``).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from .catalog import MAX_K, MAX_QE
from .query import FLOAT32_MAX


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
    audit: dict[str, Any] | None


def search_reply_model(score_name: str) -> type[BaseModel]:
    """/search's answer; each neighbour's score is named for the metric (similarity or distance)."""
    neighbour = create_model("Neighbour", __base__=NeighbourBase, **{score_name: (float, ...)})
    return create_model("SearchReply", __base__=_Reply, query=(dict[str, Any], ...), metric=(str, ...),
                        took_ms=(float, ...), neighbours=(list[neighbour], ...))


def score_name(metric: str) -> str:
    """A neighbour's score is a similarity for cosine, a distance otherwise."""
    return "similarity" if metric == "cosine" else "distance"


class AuditImage(_Reply):
    id: int | None  # None: the image is not in the served index
    path: str  # relative to the store's image root
    label: str | None
    thumbnail: str | None


class AuditEvidence(AuditImage):
    split: str | None
    similarity: float  # cosine to the finding's image


class AuditFinding(AuditImage):
    rank: int
    split: str | None
    score: float  # label issues: suspicion; duplicates: similarity; outliers: robust z-score
    suggested: str | None  # label issues: the likely label; outliers: the label most neighbours carry
    confidence: float | None  # label issues: out-of-fold probability of the suggested label
    distance: float | None  # outliers: mean cosine distance to the neighbours
    evidence: list[AuditEvidence]  # the images to compare it with: neighbours, or the duplicate


class AuditPage(_Reply):
    section: str
    title: str
    total: int
    offset: int
    findings: list[AuditFinding]


class AuditSection(_Reply):
    key: str
    title: str
    what: str
    count: int


class AuditSummary(_Reply):
    path: str
    store: str
    root: str
    backbone: str
    settings: dict[str, Any]
    notes: list[str]
    shape: dict[str, Any]
    not_served: int  # flagged images the served index does not hold
    sections: list[AuditSection]


class ErrorReply(BaseModel):
    """Every error the service answers: one line saying what went wrong and what to do."""

    error: str


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route answers, all with the one error shape."""
    return {status: {"model": ErrorReply, "description": HTTPStatus(status).phrase} for status in statuses}


QUERY_ERRORS = error_responses(400, 404, 413, 415, 422, 503)  # what /search and /predict may answer


def query_body_schema(dim: int, metric: str, search: bool = False) -> dict:
    """The request body of /search and /predict as the server takes it: a multipart upload, or JSON
    with exactly one of id, path or vector (a vector of ``dim`` float32 numbers; for cosine not all 0).
    ``search``: /search's, which also takes ``qe`` (query expansion)."""
    vector: dict[str, Any] = {"type": "array", "minItems": dim, "maxItems": dim,
                              "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}}
    if metric == "cosine":
        vector["not"] = {"items": {"const": 0}}
    k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
    label = {"type": "string", "minLength": 1}
    qe = {"type": "integer", "minimum": 0, "maximum": MAX_QE, "default": 0,
          "description": "query expansion: search again with the query merged with its top qe results (0: off)"}
    json_query = {"type": "object", "additionalProperties": False,
                  "properties": {"id": {"type": "integer", "minimum": 0}, "path": {"type": "string", "minLength": 1},
                                 "vector": vector, "k": k, "label": label, **({"qe": qe} if search else {})},
                  "oneOf": [{"required": ["id"]}, {"required": ["path"]}, {"required": ["vector"]}]}
    # a form carries text only: a number sent as k or label arrives as its digits, and is taken as such
    form_k = {"type": ["integer", "string"], "minimum": 1, "maximum": MAX_K, "default": 10,
              "pattern": f"^([1-9][0-9]{{0,{len(str(MAX_K)) - 2}}}|{MAX_K})$"}  # MAX_K is a power of ten
    form_label = {"type": ["string", "number", "integer", "boolean", "null"], "minLength": 1,
                  "description": "the label, as text"}
    form_qe = {**qe, "type": ["integer", "string"],
               "pattern": f"^(0|[1-9][0-9]{{0,{len(str(MAX_QE)) - 2}}}|{MAX_QE})$"}  # MAX_QE is a power of ten
    upload = {"type": "object", "required": ["image"], "additionalProperties": False,
              "properties": {"image": {"type": "string", "format": "binary", "contentMediaType": "image/*"},
                             "k": form_k, "label": form_label, **({"qe": form_qe} if search else {})}}
    return {"required": True, "content": {"multipart/form-data": {"schema": upload},
                                          "application/json": {"schema": json_query}}}
