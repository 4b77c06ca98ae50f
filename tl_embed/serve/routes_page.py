"""The browser page: ``GET /``, its icon, and the static files it loads (not in the API description)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    """The page links its SVG icon, but browsers and tools also ask here: the same icon, not a 404."""
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                        headers={"cache-control": "public, max-age=86400"})


def static_files() -> StaticFiles:
    """The page's scripts and styles, mounted at ``/static`` by ``create_app`` after every route."""
    return StaticFiles(directory=STATIC)
