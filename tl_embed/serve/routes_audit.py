"""``GET /audit`` and ``GET /audit/{section}``: a store's audit findings, when ``serve --audit`` loaded one."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from .audit import SECTIONS, AuditView
from .errors import ApiError
from .schema import AuditPage, AuditSummary, error_responses
from .service import ServiceDep

PAGE_MAX = 200  # findings one request may ask for

Section = Enum("Section", {key.replace("-", "_"): key for key in SECTIONS}, type=str)

router = APIRouter()


async def loaded_audit(service: ServiceDep) -> AuditView:
    """The audit, or 404 when none is loaded."""
    if service.audit is None:
        raise ApiError(404, "no audit is loaded: write one with `tl-embed audit STORE --format json --out "
                            "AUDIT.json` and start the service with --audit AUDIT.json")
    return service.audit


AuditDep = Annotated[AuditView, Depends(loaded_audit)]


@router.get("/audit", summary="what the loaded audit found, in short", response_model=None,
            responses={200: {"model": AuditSummary}, **error_responses(404)})
def audit_summary(audit: AuditDep) -> dict:
    """The audited store, the audit's settings and notes, the dataset's shape, and each section's count."""
    return audit.summary()


@router.get("/audit/{section}", summary="one section of the audit's findings, most suspicious first",
            response_model=None, responses={200: {"model": AuditPage}, **error_responses(404, 422)})
def audit_section(audit: AuditDep, section: Section,
                  offset: int = Query(0, ge=0, le=2**31, description="findings to skip"),
                  limit: int = Query(50, ge=1, le=PAGE_MAX, description="findings to answer")) -> dict:
    """Likely wrong labels, near-duplicates across splits or with different labels, or outliers, a page at
    a time: each finding's image (id, path, label, thumbnail), score and facts, and its evidence."""
    return audit.page(section.value, offset, limit)
