"""The service's door: an optional bearer token on every route, and a cap on request bodies.

Written as plain ASGI middleware so an oversized upload is refused before anything buffers it: a
``Content-Length`` over the cap is answered 413 at once, and a chunked body is counted as it streams
(:class:`BodyTooLarge`, turned into a 413 by the app's error handler).

A browser cannot send a bearer header when it loads the page, so ``GET /?token=...`` sets the token
as a same-site, HTTP-only cookie and redirects to ``/``; the page's own requests then carry it.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

COOKIE = "tl_embed_token"


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the limit of {limit:,} bytes")


class Guard:
    """ASGI middleware: token check (when ``token`` is set) and request body limit."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            if scope["path"] == "/" and query is not None and self._ok(query):
                return await _redirect_with_cookie(send, query)
            if not self._authorised(headers):
                return await _error(send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                    "(or open /?token=TOKEN in a browser)", [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error(send, 413, str(BodyTooLarge(self.max_body)))
        return await self.app(scope, self._counting(receive), send)

    def _ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _authorised(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._ok(auth[7:].strip()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is simply no token
            return False
        return COOKIE in cookie and self._ok(cookie[COOKIE].value)

    def _counting(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return counted


async def _error(send, status: int, message: str, extra: list | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


async def _redirect_with_cookie(send, token: str) -> None:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode("latin-1")), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
