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
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass

import httptools

from ..pool import PoolView

#: Set (to anything but "" or "0") to serve with the Python versions of what
#: mps.http._speedups does in C, as where it could not be built.
NO_SPEEDUPS_ENV = "MPS_NO_SPEEDUPS"
try:    # the parser's callbacks and more in C (src/_mpshttp.c), where it was built
    from . import _speedups as speedups
    BUILT = True
except ImportError:
    BUILT = False
#: The C versions serve (else the Python ones, which mirror them).
SPEEDUPS = BUILT and os.environ.get(NO_SPEEDUPS_ENV, "0") in ("", "0")
#: A Content-Length longer than this (leading zeros aside) is over any max_body.
_LENGTH_DIGITS = 19
_TOO_LONG = (1 << 63) - 1


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


class NotImplementedMethod(HTTPError):
    """CONNECT: mps is an origin server, and WSGI cannot tunnel."""

    status, reason = 501, "Not Implemented"


class VersionNotSupported(HTTPError):
    """Neither HTTP/1.0 nor HTTP/1.1 (llhttp also reads 0.9 and 2.0 request
    lines; a 0.9 client could not even read our status line)."""

    status, reason = 505, "HTTP Version Not Supported"


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
#: A busy keep-alive client sends its next request as soon as it has read a
#: response.  The connection counts as idle (and may be closed for a waiting
#: connection or a leaving child) only after this long without it: closing
#: at once would race that request, and the client would meet a reset on
#: nearly every request boundary while the pool is short.
TURNAROUND_S = 0.01
#: Bytes of chunked framing (size line, CRLFs, a short extension) allowed per
#: chunk, beside one head's worth (head_bytes) for trailer fields.
_FRAMING_PER_CHUNK = 64


#: The body of a request that has none yet: shared and always empty (a
#: request that gets body bytes gets a deque of its own in on_body).
_NO_BODY: collections.deque[bytes] = collections.deque(maxlen=0)


class Request:
    """One parsed request: its head, and its body as it arrives
    (speedups.Request is the same in C).

    Fields that most requests never change are class defaults, set on the
    instance only when they do: a request costs two stores, not eighteen."""

    method = b""
    url = b""
    version = "HTTP/1.1"
    keep_alive = False
    content_length = -1             # -1: none given
    chunked = False
    expect_continue = False
    body = _NO_BODY
    body_size = 0                   # decoded body bytes received so far
    complete = False                # the whole message has been parsed
    fields = 0                      # header fields, then trailer fields
    host = False                    # a Host field was seen
    chunks = 0
    framing = 0                     # bytes read beside the decoded body

    def __init__(self, started: float) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = started      # its first byte (the first request: the connection)

    def line(self) -> bytes:
        """Method and path, bounded: what the status shows for a busy child."""
        return self.method + b" " + self.url[:120]


if BUILT:    # (also when not serving: tests compare both versions)
    speedups.configure(BadRequest, URITooLong, HeadersTooLarge, PayloadTooLarge,
                       NotImplementedCoding, NotImplementedMethod, VersionNotSupported, _NO_BODY)
#: The C connection loop parses with httptools' llhttp called directly
#: (speedups.llhttp: where httptools bundles an llhttp whose layout
#: src/_mpshttp.c knows; else Python serves every connection).
LLHTTP = BUILT and speedups.llhttp(sys.modules[httptools.HttpRequestParser.__module__].__file__)

#: Longest one response write may wait for a client that does not read.
SEND_TIMEOUT_S = 30.0


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Send everything, never blocking longer than SEND_TIMEOUT_S on a
    client that does not read (ClientGone then, as for a reset)."""
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    except OSError:
        raise ClientGone() from None
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    deadline = time.monotonic() + SEND_TIMEOUT_S
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise ClientGone()
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            continue
        except OSError:
            raise ClientGone() from None


class Sink:
    """What httptools calls as it parses one connection's bytes: the requests
    it makes, checked against the limits (speedups.Sink is the same in C).
    Bad input is raised as an HTTPError from the callback."""

    def __init__(self, request_line: int, fields: int, field_size: int, max_body: int,
                 opened: float, ready: collections.deque[Request]) -> None:
        self.request_line = request_line
        self.fields = fields
        self.field_size = field_size
        self.max_body = max_body
        #: The first head's clock starts when the connection does (see Reader).
        self.opened = opened
        self.ready = ready                      # heads complete, not yet served
        self.parsing: Request | None = None     # head not complete yet
        self.last: Request | None = None        # the latest message begun
        self.head_bytes = 0                     # bytes of the head being parsed
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        started = time.monotonic() if self.last is not None else self.opened
        self.parsing = self.last = Request(started)
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        if len(self.parsing.url) > self.request_line:
            raise URITooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        trailer = req is None       # a trailer field, after a chunked body
        if req is None:
            req = self.last
            assert req is not None
        req.fields += 1
        if req.fields > self.fields:
            raise HeadersTooLarge()
        if len(name) + len(value) > self.field_size:
            raise HeadersTooLarge()
        if trailer or b"_" in name:
            # Trailers: WSGI has no place for them.  "_": would alias "-"
            # in HTTP_* (a spoofing route).  Both dropped.
            return
        low = name.lower()
        if low == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if any(c != b"chunked" for c in codings):
                raise NotImplementedCoding()
            req.chunked = True
        elif low == b"host":
            if req.host:        # which one would the app believe? (RFC 9112 3.2)
                raise BadRequest()
            req.host = True
        elif low == b"content-length":
            # llhttp checked its digits.  int() refuses more than 4300 (and
            # what PYTHONINTMAXSTRDIGITS says): past 19 it is simply too long.
            digits = value.strip().lstrip(b"0") or b"0"
            try:
                req.content_length = \
                    min(int(digits), _TOO_LONG) if len(digits) <= _LENGTH_DIGITS else _TOO_LONG
            except ValueError:
                raise BadRequest() from None
        elif low == b"expect" and value.strip().lower() == b"100-continue":
            req.expect_continue = True
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        parser = self.parser
        assert parser is not None
        req.method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise VersionNotSupported()
        if req.method == b"CONNECT":
            raise NotImplementedMethod()
        if req.url == b"*" and req.method != b"OPTIONS":
            raise BadRequest()      # the asterisk-form is OPTIONS's alone (RFC 9112 3.2.4)
        req.version = "HTTP/" + version
        if version == "1.1" and not req.host:
            raise BadRequest()      # a 1.1 request without Host MUST get 400 (RFC 9112 3.2)
        if version == "1.0":
            req.expect_continue = False     # no 1xx to a 1.0 client (RFC 9110 10.1.1)
        req.keep_alive = parser.should_keep_alive()
        if req.content_length > self.max_body:
            raise PayloadTooLarge()
        self.parsing = None
        self.ready.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.last
        assert req is not None
        req.body_size += len(body)
        if req.body_size > self.max_body:
            raise PayloadTooLarge()
        if req.body is _NO_BODY:
            req.body = collections.deque()
        req.body.append(body)

    def on_message_complete(self) -> None:
        assert self.last is not None
        self.last.complete = True

    def on_chunk_header(self) -> None:
        assert self.last is not None
        self.last.chunks += 1


class Reader:
    """The requests of one connection, parsed as their bytes arrive."""

    # Class defaults, set on the instance when they change.
    error: HTTPError | None = None      # stops parsing; raised in turn
    serving: Request | None = None      # handed to the app, body maybe arriving
    eof = False
    upgraded = False
    timed = False       # SO_RCVTIMEO set for the turnaround read (arm_turnaround)

    def __init__(self, sock: socket.socket, limits: Limits, pool: PoolView,
                 buf: memoryview) -> None:
        self.sock = sock
        self.limits = limits
        self.pool = pool
        self.buf = buf                  # the child's one read buffer
        self.ready: collections.deque[Request] = collections.deque()
        #: The first head's clock starts when the connection does: a client
        #: that connects and sends nothing (or only CRLFs, which begin no
        #: message) holds its child no longer than one that trickles.
        self.sink = (speedups.Sink if SPEEDUPS else Sink)(
            limits.request_line, limits.fields, limits.field_size, limits.max_body,
            time.monotonic(), self.ready)
        self.parser = httptools.HttpRequestParser(self.sink)
        self.sink.parser = self.parser

    def close(self) -> None:
        """Break the parser <-> sink cycle (else only the collector frees it)."""
        self.sink.parser = None

    def send_interim(self, data: bytes) -> None:
        """An interim response (100 Continue), for wsgi.input."""
        send_all(self.sock, data)

    # ------------------------------------------------ reading

    def next_request(self, first: bool) -> Request | None:
        """The next request whose head is complete; None when the connection
        should end quietly (closed by the client, idle past keepalive_timeout,
        or given up for a connection that waits for a child)."""
        if not self.ready and (first or self.sink.parsing is None and self.error is None
                               and not self.eof and not self.upgraded):
            # The usual case, with one read before any deadline is worked
            # out.  A new connection's request is nearly always there already
            # (TCP_DEFER_ACCEPT, or a client that writes as it connects).
            # Right after a response, a busy keep-alive client's next request
            # comes at once: one blocking recv bounded by TURNAROUND_S
            # (SO_RCVTIMEO, set once per connection), no poll per request;
            # nothing within TURNAROUND_S, and the connection is idle.
            try:
                if first:
                    n = self.sock.recv_into(self.buf, 0, socket.MSG_DONTWAIT)
                else:
                    if not self.timed:
                        self.arm_turnaround()
                    n = self.sock.recv_into(self.buf)
                self.take(n)
            except BlockingIOError:
                pass
            except (ConnectionResetError, TimeoutError):
                raise ClientGone() from None
            if self.ready:
                self.serving = self.ready.popleft()
                return self.serving
        # One keep-alive wait per request: bytes that begin no message (CRLFs)
        # do not restart it.
        idle_deadline = time.monotonic() + self.limits.keepalive_timeout
        while not self.ready:
            if self.error is not None:
                raise self.error
            if self.eof or self.upgraded:
                if self.sink.parsing is not None:
                    raise ClientGone()      # half a head, then EOF: nobody to answer
                return None
            if self.sink.parsing is None and not first:
                if not self.wait_for_request(idle_deadline):
                    return None
            self.fill(self.head_deadline())
        self.serving = self.ready.popleft()
        return self.serving

    def head_started(self) -> float | None:
        """When the head being waited for started: its first byte, or for a
        connection's first head the connection itself.  None between
        requests (keep-alive has its own wait) and while a body arrives."""
        if self.sink.parsing is not None:
            return self.sink.parsing.started
        return self.sink.opened if self.sink.last is None else None

    def head_deadline(self) -> float:
        started = self.head_started()
        return (time.monotonic() if started is None else started) + self.limits.header_timeout

    def arm_turnaround(self) -> None:
        """Bound the blocking recv that waits for a kept-alive connection's
        next request (see next_request) by TURNAROUND_S."""
        self.timed = True
        seconds, micros = divmod(round(TURNAROUND_S * 1e6), 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", seconds, micros))

    def wait_for_request(self, deadline: float) -> bool:
        """Between requests on a kept-alive connection, idle (past
        the turnaround read), before the next one's first byte: parked until
        ``deadline`` (keepalive_timeout), and let go at once when the pool
        needs its child or it is leaving.  False: end the connection quietly."""
        fd = self.sock.fileno()
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
        self.take(self.recv(deadline))

    def take(self, n: int) -> None:
        """Parse the ``n`` bytes just read into the buffer (0: end of stream)."""
        if n == 0:
            self.eof = True
            return
        sink = self.sink
        last = sink.last
        in_body = sink.parsing is None and last is not None and not last.complete
        decoded = last.body_size if last is not None else 0
        if self.error is None:
            try:
                self.parser.feed_data(self.buf[:n])
            except httptools.HttpParserUpgrade:
                self.upgraded = True    # Upgrade/CONNECT: served as a plain request, then closed
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                self.fail(cause if isinstance(cause, HTTPError) else BadRequest())
            except httptools.HttpParserError:
                self.fail(BadRequest())
        if in_body:
            assert last is not None
            # httptools keeps a trailer field whole until it ends, so an
            # endless one would grow without bound: framing is limited.
            last.framing += n - (last.body_size - decoded)
            if not last.complete and \
                    last.framing > self.limits.head_bytes + _FRAMING_PER_CHUNK * last.chunks:
                self.fail(HeadersTooLarge())
        elif sink.parsing is not None:
            sink.head_bytes += n
            if sink.head_bytes > self.limits.head_bytes:
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
            # Under pool pressure a head that has been trickling in (or not
            # begun) for SHED_AFTER_S is given up (slowloris): the child
            # serves others.
            started = self.head_started()
            if started is not None and now - started >= SHED_AFTER_S and self.pool.wanted():
                raise RequestTimeout()
            wait = deadline - now
            if started is not None:
                wait = min(wait, 0.1)   # look at the pool again soon
            if poller.poll(wait * 1000):
                return

    def fail(self, exc: HTTPError) -> None:
        """Bad input stops parsing.  It concerns the request being served
        only if that one's body was still arriving: then it is raised now;
        else it is raised in turn, once every earlier request is answered.
        The first error is the one answered (a 413 found in a head is not
        turned into a 431 by the body bytes that came in the same read)."""
        if self.error is None:
            self.error = exc
        serving = self.serving
        if serving is not None and not serving.complete and self.sink.last is serving:
            raise self.error

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
