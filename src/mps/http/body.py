"""``wsgi.input``: one request's body, read on demand and bounded to it.

llhttp has already decoded the framing (Content-Length or chunked), so one
reader serves both; reading past the body returns b"" (the environ says
``wsgi.input_terminated``).  The first read of a request that asked for
``Expect: 100-continue`` sends the interim response -- unless the final
response has begun, where a 100 would land inside it; a body that stops
arriving (slower than ``body_min_rate`` bytes a second after a grace of
``body_timeout``) ends the request with 408.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from .message import HTTPError, Reader, Request

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Most unread body bytes read and thrown away to keep a connection alive.
_DISCARD_MAX = 64 * 1024


class Input:
    """The file-like ``wsgi.input`` (PEP 3333: read, readline, readlines, iter)."""

    # Class defaults, set on the instance when they change (one per request).
    _buffer = b""
    _withheld = False       # the final response began first: no 100 ever
    _started = 0.0
    #: Bad input met while reading (413, 408, 400), kept in case the app
    #: swallows it (a framework's catch-all): the response says it anyway.
    failed: HTTPError | None = None

    def __init__(self, reader: Reader, request: Request, send: Callable[[bytes], None]) -> None:
        self._reader = reader
        self._request = request
        self._send = send
        self._expecting = request.expect_continue     # a 100 Continue is owed

    # What the reader still holds for us, then more from the socket.
    def _more(self) -> bytes:
        req = self._request
        if not req.body:
            if req.complete:
                return b""
            if self._expecting:
                self._expecting = False
                self._send(CONTINUE)
            limits = self._reader.limits
            if not self._started:
                self._started = time.monotonic()
            deadline = self._started + limits.body_timeout + req.body_size / limits.body_min_rate
            while not req.body and not req.complete:
                try:
                    self._reader.read_body(req, deadline)
                except HTTPError as exc:
                    self.failed = exc
                    raise
            if not req.body:
                return b""
        return req.body.popleft()

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buffer]
            self._buffer = b""
            while chunk := self._more():
                parts.append(chunk)
            return b"".join(parts)
        while len(self._buffer) < size:
            chunk = self._more()
            if not chunk:
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                cut = end + 1
                break
            if 0 <= limit <= len(self._buffer):
                cut = limit
                break
            chunk = self._more()
            if not chunk:
                cut = len(self._buffer)
                break
            self._buffer += chunk
        if 0 <= limit < cut:
            cut = limit
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def response_begins(self) -> bool:
        """The final response's head is about to be sent: from now on no 100
        Continue may be (it would land inside the response).  True when the
        connection can still outlive the response, so the head need not say
        ``Connection: close``: the body is all read, or what is left of it
        will be read and thrown away by :meth:`discard`.  (RFC 9110 §10.1.1:
        a server that answers before reading the body says whether it
        closes; a client told nothing may send the body or not.)"""
        req = self._request
        if self._expecting:
            self._expecting = False
            self._withheld = not req.complete
        if req.complete:
            return True
        if self._withheld or req.chunked:
            return False
        return req.content_length - req.body_size <= _DISCARD_MAX

    def discard(self) -> bool:
        """After the response: consume what is left of the body, so the next
        request on the connection starts at its first byte.  False when the
        connection cannot be reused: a 100 Continue owed or withheld (the
        client may or may not send the body) or more left than is worth
        reading."""
        self._buffer = b""
        req = self._request
        req.body.clear()
        if req.complete:
            return True
        if self._expecting or self._withheld:
            return False
        if req.content_length - req.body_size > _DISCARD_MAX or \
                (req.content_length < 0 and req.chunked):
            return False
        while self._more():
            req.body.clear()
        return True
