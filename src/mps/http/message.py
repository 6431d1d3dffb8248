"""Reading requests off one connection: httptools (llhttp) in strict mode.

The parser calls small ``on_*`` methods that fill one :class:`Request` per
message (uvicorn's shape).  Limits are checked where the bytes are read;
each kind of bad input is one exception class carrying its status.  A
request's head is complete before the app runs; its body is read on demand
(:mod:`.body`).  Pipelined requests are parsed as their bytes arrive and
answered in order; the connection reads only when the request being served
needs more, so what is parsed ahead is bounded by one read buffer.
"""
from __future__ import annotations

import collections
import select
import socket
import time
from dataclasses import dataclass

import httptools

from ..pool import PoolView


class HTTPError(Exception):
    """Bad input: answered with ``status`` and the connection closed."""

    status = 400
    reason = "Bad Request"


class BadRequest(HTTPError):
    pass


class RequestTimeout(HTTPError):
    status, reason = 408, "Request Timeout"


class PayloadTooLarge(HTTPError):
    status, reason = 413, "Content Too Large"


class URITooLong(HTTPError):
    status, reason = 414, "URI Too Long"


class HeadersTooLarge(HTTPError):
    status, reason = 431, "Request Header Fields Too Large"


class NotImplementedCoding(HTTPError):
    status, reason = 501, "Not Implemented"


class ClientGone(Exception):
    """The client closed or reset the connection: nobody to answer."""


@dataclass(frozen=True)
class Limits:
    """The request limits and deadlines (settings ``limit_request_*``,
    ``max_body``, ``header_timeout``, ``body_timeout``, ``body_min_rate``,
    ``keepalive_timeout``)."""

    request_line: int = 8190
    fields: int = 100
    field_size: int = 8190
    max_body: int = 16 << 20
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    body_min_rate: int = 500
    keepalive_timeout: float = 5.0

    @property
    def head_bytes(self) -> int:
        """Most bytes a request head may take before it is refused (431)."""
        return self.request_line + 2 + self.fields * (self.field_size + 4) + 2


#: A parked keep-alive connection that saw the listener readable while idle
#: children exist polls only its own socket this long before looking again:
#: an idle child takes the new connection, and nobody spins on it meanwhile.
_LISTENER_QUIET_S = 0.01
#: Under pool pressure, a connection that has not sent a whole request head
#: this long after it started is answered 408 and closed (slowloris).
SHED_AFTER_S = 1.0


class Request:
    """One parsed request: its head, and its body as it arrives."""

    __slots__ = ("method", "url", "headers", "version", "keep_alive", "content_length",
                 "chunked", "expect_continue", "upgrade", "body", "body_size", "complete",
                 "started", "fields", "field_bytes")

    def __init__(self, started: float) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.version = "HTTP/1.1"
        self.keep_alive = False
        self.content_length = -1        # -1: none given
        self.chunked = False
        self.expect_continue = False
        self.upgrade = False
        self.body: collections.deque[bytes] = collections.deque()
        self.body_size = 0              # decoded body bytes received so far
        self.complete = False           # the whole message has been parsed
        self.started = started          # time.monotonic() of its first byte
        self.fields = 0
        self.field_bytes = 0

    def line(self) -> bytes:
        """Method and path, bounded: what the status shows for a busy child."""
        return self.method + b" " + self.url[:120]


class Reader:
    """The requests of one connection, parsed as their bytes arrive."""

    def __init__(self, sock: socket.socket, limits: Limits, pool: PoolView,
                 buf: memoryview) -> None:
        self.sock = sock
        self.limits = limits
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.buf = buf                  # the child's one read buffer
        self.ready: collections.deque[Request] = collections.deque()
        self.parsing: Request | None = None   # head not complete yet
        self.last: Request | None = None      # the latest message begun
        self.head_bytes = 0             # bytes of the head being parsed
        self.error: HTTPError | None = None     # stops parsing; raised in turn
        self.serving: Request | None = None     # handed to the app, body maybe arriving
        self.eof = False
        self.upgraded = False

    # ------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.parsing = self.last = Request(time.monotonic())
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        if len(self.parsing.url) > self.limits.request_line:
            raise URITooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.fields += 1
        if req.fields > self.limits.fields:
            raise HeadersTooLarge()
        if len(name) + len(value) > self.limits.field_size:
            raise HeadersTooLarge()
        if b"_" in name:
            return      # would alias "-" in HTTP_* (a spoofing route): dropped
        low = name.lower()
        if low == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if any(c != b"chunked" for c in codings):
                raise NotImplementedCoding()
            req.chunked = True
        elif low == b"expect" and value.strip().lower() == b"100-continue":
            req.expect_continue = True
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        parser = self.parser
        req.method = parser.get_method()
        req.version = "HTTP/" + parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        for name, value in req.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                req.content_length = int(value)     # llhttp checked it is one number
                if req.content_length > self.limits.max_body:
                    raise PayloadTooLarge()
                break
        self.parsing = None
        self.ready.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.last
        assert req is not None
        req.body_size += len(body)
        if req.body_size > self.limits.max_body:
            raise PayloadTooLarge()
        req.body.append(body)

    def on_message_complete(self) -> None:
        assert self.last is not None
        self.last.complete = True

    # ------------------------------------------------ reading

    def next_request(self, first: bool) -> Request | None:
        """The next request whose head is complete; None when the connection
        should end quietly (closed by the client, idle past keepalive_timeout,
        or given up for a connection that waits for a child)."""
        while not self.ready:
            if self.error is not None:
                raise self.error
            if self.eof or self.upgraded:
                if self.parsing is not None:
                    raise ClientGone()      # half a head, then EOF: nobody to answer
                return None
            if self.parsing is None and not self.wait_for_request(first):
                return None
            self.fill(self.head_deadline())
        self.serving = self.ready.popleft()
        return self.serving

    def head_deadline(self) -> float:
        started = self.parsing.started if self.parsing is not None else time.monotonic()
        return started + self.limits.header_timeout

    def wait_for_request(self, first: bool) -> bool:
        """Before a request's first byte.  A new connection gets
        header_timeout (its data is usually there already); a kept-alive one
        is parked for up to keepalive_timeout, and let go at once when the
        pool needs its child.  False: end the connection quietly."""
        if first:
            return True
        fd = self.sock.fileno()
        deadline = time.monotonic() + self.limits.keepalive_timeout
        watch = self.pool.fds
        quiet_until = 0.0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        for extra in watch:
            poller.register(extra, select.POLLIN)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return False
            if self.pool.leaving() or self.pool.wanted():
                return False
            if now < quiet_until:
                wait = min(deadline, quiet_until) - now
                events = select.poll()
                events.register(fd, select.POLLIN)
                ready = events.poll(wait * 1000)
            else:
                ready = poller.poll((deadline - now) * 1000)
            if any(f == fd for f, _ in ready):
                return True
            if ready:   # the pool's fds: ask the pool, then stay quiet a moment
                quiet_until = time.monotonic() + _LISTENER_QUIET_S

    def fill(self, deadline: float) -> None:
        """Read once (waiting until ``deadline``) and parse what came."""
        n = self.recv(deadline)
        if n == 0:
            self.eof = True
            return
        self.feed(self.buf[:n])
        if self.parsing is not None:
            self.head_bytes += n
            if self.head_bytes > self.limits.head_bytes:
                self.fail(HeadersTooLarge())

    def recv(self, deadline: float) -> int:
        sock, buf = self.sock, self.buf
        while True:
            try:
                return sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except (ConnectionResetError, TimeoutError):
                raise ClientGone() from None
            self.wait_readable(deadline)

    def wait_readable(self, deadline: float) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise RequestTimeout()
            # Under pool pressure a head that has been trickling in for
            # SHED_AFTER_S is given up (slowloris): the child serves others.
            if self.parsing is not None and now - self.parsing.started >= SHED_AFTER_S \
                    and self.pool.wanted():
                raise RequestTimeout()
            wait = deadline - now
            if self.parsing is not None:
                wait = min(wait, 0.1)   # look at the pool again soon
            if poller.poll(wait * 1000):
                return

    def feed(self, data: memoryview) -> None:
        if self.error is not None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True    # Upgrade/CONNECT: served as a plain request, then closed
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self.fail(cause if isinstance(cause, HTTPError) else BadRequest())
        except httptools.HttpParserError:
            self.fail(BadRequest())

    def fail(self, exc: HTTPError) -> None:
        """Bad input stops parsing.  It concerns the request being served
        only if that one's body was still arriving: then it is raised now;
        else it is raised in turn, once every earlier request is answered."""
        self.error = exc
        serving = self.serving
        if serving is not None and not serving.complete and self.last is serving:
            raise exc

    # ------------------------------------------------ the body

    def read_body(self, req: Request, deadline: float) -> None:
        """Read more of ``req``'s body (called by wsgi.input when it runs dry)."""
        if req.complete:
            return
        if self.error is not None:
            raise self.error    # set while this body was arriving (see fail)
        if self.eof:
            raise ClientGone()
        self.fill(deadline)
        if self.eof and not req.complete:
            raise ClientGone()
