"""One JSON shape for every error the service answers, ``{"error": "..."}``, whoever raised it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TlEmbedError
from .catalog import NotFound
from .guard import BodyTooLarge


class ApiError(Exception):
    """A refusal with its status; the message is the reply's ``error``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def validation_text(errors) -> str:
    """Pydantic's errors as one line, each prefixed with the field it is about."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def add_error_handlers(app: FastAPI) -> None:
    """Our errors, lookups, oversized bodies, user errors, validation and FastAPI's own 404/405s alike."""

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
        return reply(422, validation_text(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return reply(e.status_code, str(e.detail), getattr(e, "headers", None))
