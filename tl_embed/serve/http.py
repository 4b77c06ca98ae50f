"""uvicorn's httptools protocol with a bound on a request's head (request line and headers).

uvicorn reads headers without any limit: one request with a 100 MB header keeps the event loop
parsing for seconds, so every other client waits, token or not.  Counting the bytes that arrive before the
head is complete lets us answer 431 and close the connection once it passes :data:`MAX_HEAD_BYTES`,
before reading further, as nginx and most servers do.  Bodies are bounded separately (the Guard).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # far above any browser's or client's headers (cookies included)
_END = b"\r\n\r\n"


class BoundedHeadProtocol(HttpToolsProtocol):
    """Refuses a request whose head exceeds :data:`MAX_HEAD_BYTES` with 431 and closes the connection."""

    def connection_made(self, transport) -> None:
        self._head_bytes: int | None = 0  # bytes of the current request's head so far; None inside a body
        self._tail = b""  # the last bytes seen, so a blank line split across two reads is still found
        self._refused = False
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered 431 and closing: nothing more is read
            return
        if self._head_bytes is not None:
            seen = self._tail + data
            end = seen.find(_END)
            self._head_bytes += len(data) if end < 0 else max(0, end + len(_END) - len(self._tail))
            self._tail = seen[-(len(_END) - 1):]
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()
                return
            if end >= 0:
                self._head_bytes = None
        super().data_received(data)

    def on_message_complete(self) -> None:
        self._head_bytes, self._tail = 0, b""  # keep-alive: the next request's head starts
        super().on_message_complete()

    def _refuse(self) -> None:
        body = json.dumps({"error": f"request headers are larger than the limit of {MAX_HEAD_BYTES:,} bytes"})
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body.encode()))
        self.transport.close()
        self._refused = True
