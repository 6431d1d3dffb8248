"""WSGI (PEP 3333) over HTTP/1.1: the environ, the response, keep-alive.

:class:`WSGIHandler` is a ``handle(conn, addr)`` like any other: the worker
calls it once per accepted connection and it serves that connection's
requests in order.  Keep-alive is explicit state, decided before each
response is written (so a closing response says ``Connection: close``):

* the client asked for it (HTTP/1.1 default, ``Connection: keep-alive`` on
  1.0), fewer than ``keepalive_requests`` were served, the body can be
  framed (a length, or chunked on 1.1), and
* the pool can spare this child: it is not leaving, and if it has held the
  child for KEEPALIVE_SLICE_S while a new connection waits with no idle
  child, it lets go at this request boundary.  A connection parked idle
  between requests lets go at once (see :meth:`.message.Reader.wait_for_request`).
"""
from __future__ import annotations

import logging
import os
import re
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from ..logs import printable
from ..pool import Alone, PoolView
from ..proxy import Allowed
from . import accesslog
from .body import Input
from .message import (BUILT, LLHTTP, SEND_TIMEOUT_S, SPEEDUPS, ClientGone, HTTPError, Limits,
                      Reader, Request, send_all)

if BUILT:
    from . import _speedups as speedups

log = logging.getLogger("mps")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

#: Under pool pressure a busy keep-alive connection keeps its child this long
#: before it lets go at a request boundary: long enough that a busy client's
#: requests are not each a new connection, short enough that a client
#: waiting in the listen queue gets a child within a few slices.
KEEPALIVE_SLICE_S = 0.1
#: warm_up(): connections served in the master before it forks; CPython
#: specialises a function's bytecode from its 8th call on (3.11).
WARM_UP_CONNECTIONS = 12
SERVER = b"mps"
#: conclude(): the app has not run yet.
_NOT_RUN = object()

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\r\n\0]")
_STATUS = re.compile(r"[1-9][0-9][0-9] [^\r\n\0]*\Z")
_NO_BODY = {204, 304}
#: Most (status, headers) combinations and built heads remembered per child.
_HEADS_MAX = 256
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade"})


class HeaderError(Exception):
    """The app handed start_response something that cannot be sent."""


@dataclass(frozen=True)
class Options:
    """What the HTTP layer takes from the settings."""

    limits: Limits = field(default_factory=Limits)
    keepalive_requests: int = 1000
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    access_log: str | None = None
    access_log_format: str = accesslog.COMBINED


class Clock:
    """The ``Date`` header, formatted at most once a second."""

    def __init__(self) -> None:
        self.until = 0.0        # the header is good until this time.time()
        self.header = b""

    def date(self) -> bytes:
        now = time.time()
        if now >= self.until or now < self.until - 1:     # (or the clock was set back)
            second = int(now)
            self.until = second + 1.0
            self.header = b"Date: " + http_date(second) + b"\r\n"
        return self.header


_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct",
           b"Nov", b"Dec")


def http_date(seconds: float) -> bytes:
    """IMF-fixdate (RFC 9110 5.6.7), whatever the locale: "Sun, 06 Nov 1994 08:49:37 GMT".
    (email.utils.formatdate would cost the master the whole email package.)"""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min,
        t.tm_sec)


class ErrorStream:
    """``wsgi.errors``: what the app writes goes to the mps log, a line at a time."""

    def __init__(self) -> None:
        self.partial = ""

    def write(self, text: str) -> None:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            log.error("app: %s", line)

    def writelines(self, seq: Iterable[str]) -> None:
        for text in seq:
            self.write(text)

    def flush(self) -> None:
        if self.partial:
            log.error("app: %s", self.partial)
            self.partial = ""


class FileWrapper:
    """``wsgi.file_wrapper``: a file the server may send with ``os.sendfile``."""

    def __init__(self, filelike: IO[bytes], blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        closer = getattr(filelike, "close", None)
        if closer is not None:
            self.close = closer

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return bytes(data)
        raise StopIteration

    def fileno(self) -> int | None:
        try:
            fd = self.filelike.fileno()
            os.fstat(fd)
            return fd
        except (AttributeError, OSError, ValueError):
            return None


class Response:
    """One response: ``start_response``, ``write``, and its framing."""

    # What every response starts with: class defaults, set on the instance
    # only when they change (a response costs six stores, not fourteen).
    status: str | None = None
    code = 0
    headers: Sequence[tuple[str, str]] = ()     # start_response's list, once called
    head_sent = False
    chunked = False
    length = -1             # Content-Length the app declared, -1 none
    sent = 0                # body bytes sent
    body_allowed = True

    def __init__(self, conn: socket.socket, request: Request, body: Input, clock: Clock,
                 keep: bool, heads: dict[Any, Any] | None) -> None:
        #: The handler's memo of checked (status, headers) and built heads,
        #: for the Python versions; None: mps.http._speedups does the work.
        self.heads = heads
        self.conn = conn
        self.request = request
        self.input = body
        self.clock = clock
        self.keep = keep

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None     # no cycle through the traceback
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if self.heads is None:
            if not speedups.valid(status, headers):
                self.check(status, headers)     # raises, saying what is wrong
                raise HeaderError(f"start_response({status!r}, {headers!r}) refused")
        else:
            self.remember(status, headers)
        self.status = status
        self.code = int(status[:3])
        self.headers = headers
        return self.write

    def remember(self, status: str, headers: list[tuple[str, str]]) -> None:
        """The Python check of start_response's arguments, memoized."""
        assert self.heads is not None
        try:
            # Apps send the same few (status, headers) again and again: once
            # checked, a combination is known good (the strings are compared,
            # not just their identity, so nothing unchecked slips through).
            key = (status, *headers)
            known = key in self.heads
        except TypeError:       # an unhashable header: the checks below say why
            key, known = None, False
        if not known:
            self.check(status, headers)
            if key is not None:
                if len(self.heads) >= _HEADS_MAX:
                    self.heads.clear()
                self.heads[key] = None

    @staticmethod
    def check(status: object, headers: object) -> None:
        """What start_response must refuse: HeaderError names it."""
        if not isinstance(status, str) or not _STATUS.match(status):
            raise HeaderError(f"bad status line {status!r}")
        if not isinstance(headers, list):
            raise HeaderError("headers must be a list of (name, value) tuples")
        for item in headers:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], str)):
                raise HeaderError(f"bad header {item!r}: want a (str, str) tuple")
            name, value = item
            if not _TOKEN.match(name) or _BAD_VALUE.search(value):
                raise HeaderError(f"header {name!r} has a character that cannot be sent "
                                  "(CR, LF, NUL, or a name that is not a token)")

    def head(self, known_length: int) -> bytes:
        """The status line and headers, with the framing decided here."""
        req = self.request
        if self.status is None:
            raise AssertionError("the app returned without calling start_response")
        if self.input.failed is not None:
            # The app caught the bad input its body read raised (Flask turns
            # any exception into its own 500): the client gets its status.
            raise self.input.failed
        if not (req.complete and not req.expect_continue) and not self.input.response_begins():
            self.keep = False       # the body is not read and will not be: say so
        if self.heads is None:
            try:
                head, self.length, self.keep, self.chunked, self.body_allowed = speedups.head(
                    self.status, self.code, self.headers, known_length, req.method == b"HEAD",
                    req.version == "HTTP/1.1", self.keep, self.clock.date())
            except ValueError as exc:   # a bad Content-Length, or beyond latin-1
                raise HeaderError(str(exc)) from None
            return head
        key = ("head", self.status, *self.headers, known_length, req.method == b"HEAD",
               req.version, self.keep)
        built = self.heads.get(key)
        if built is None:
            built = self.build_head(known_length)
            if len(self.heads) >= _HEADS_MAX:
                self.heads.clear()
            self.heads[key] = built
        (before, dated, after, self.length, self.keep, self.chunked,
         self.body_allowed) = built
        return before + self.clock.date() + after if dated else before + after

    def build_head(self, known_length: int) -> tuple[bytes, bool, bytes, int, bool, bool, bool]:
        """The head's bytes around the Date line, and the framing it decided."""
        req = self.request
        assert self.status is not None
        # Again: the app may have changed its header list since start_response.
        self.check(self.status, self.headers)
        lines = [b"HTTP/1.1 ", self.status.encode("latin-1"), b"\r\n"]
        date = server = True        # ours, unless the app gave its own
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                # One, and digits only: int() also takes "-5", "+5" and "1_0",
                # which would be sent as they are while the body is framed
                # by another reading (or chunked beside them).
                if not (value.isascii() and value.isdigit()) or len(value) > 18 \
                        or self.length >= 0:
                    raise HeaderError(f"Content-Length {value!r} is not one length")
                self.length = int(value)
            elif low in _HOP_BY_HOP:
                if low == "connection" and "close" in value.lower():
                    self.keep = False
                continue    # the server frames the message itself
            elif low == "date":
                date = False    # one Date only (RFC 9110 6.6.1)
            elif low == "server":
                server = False
            lines += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        self.body_allowed = not (self.code in _NO_BODY or self.code < 200 or req.method == b"HEAD")
        if self.length < 0 and self.code not in _NO_BODY and self.code >= 200:
            if known_length >= 0:
                self.length = known_length
                if req.method != b"HEAD" or known_length > 0:
                    lines.append(b"Content-Length: %d\r\n" % known_length)
            elif not self.body_allowed:
                pass
            elif req.version == "HTTP/1.1":
                self.chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep = False
        if not self.keep:
            lines.append(b"Connection: close\r\n")
        elif req.version == "HTTP/1.0":
            lines.append(b"Connection: keep-alive\r\n")
        before = b"".join(lines)
        after = (b"Server: " + SERVER + b"\r\n\r\n") if server else b"\r\n"
        return (before, date, after, self.length, self.keep, self.chunked,
                self.body_allowed)

    def write(self, data: bytes) -> None:
        """The ``write()`` of start_response, and every chunk of the iterable."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"the app wrote {type(data).__name__}, not bytes")
        if not self.head_sent:
            self.send_head(-1, bytes(data))
            return
        self.send_body(data)

    def send_head(self, known_length: int, first: bytes = b"") -> None:
        head = self.head(known_length)
        self.head_sent = True
        if first and self.body_allowed:
            send_all(self.conn, head + self.frame(first))
        else:
            send_all(self.conn, head)

    def frame(self, data: bytes | bytearray | memoryview) -> bytes:
        """Count ``data`` against the declared length, chunk it if chunked."""
        size = len(data)
        if self.length >= 0 and self.sent + size > self.length:
            size = self.length - self.sent     # never more than was declared
            data = data[:size]
            self.keep = False
        self.sent += size
        if self.chunked:
            return b"%x\r\n" % size + bytes(data) + b"\r\n" if size else b""
        return bytes(data)

    def send_body(self, data: bytes | bytearray | memoryview) -> None:
        if not data or not self.body_allowed:
            return
        framed = self.frame(data)
        if framed:
            send_all(self.conn, framed)

    def finish(self) -> None:
        if not self.head_sent:
            self.send_head(0 if self.body_allowed else -1)
        if self.chunked:
            send_all(self.conn, b"0\r\n\r\n")
        elif self.body_allowed and 0 <= self.length != self.sent:
            self.keep = False       # the app sent less than it declared: framing lost

    def send_file(self, fd: int) -> bool:
        """Send a file_wrapper's file with os.sendfile; False when it cannot be."""
        if self.chunked or not self.body_allowed:
            return False
        try:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            size = os.fstat(fd).st_size - offset
        except OSError:
            return False
        if not self.head_sent:
            self.send_head(size)
        if not self.body_allowed:
            return True     # HEAD, 204, 304: the head (with the file's length) is all
        left = size if self.length < 0 else min(size, self.length - self.sent)
        conn = self.conn
        conn.setblocking(False)
        poller = select.poll()
        poller.register(conn, select.POLLOUT)
        try:
            while left > 0:
                try:
                    n = os.sendfile(conn.fileno(), fd, offset, left)
                except BlockingIOError:
                    if not poller.poll(SEND_TIMEOUT_S * 1000):
                        raise ClientGone() from None
                    continue
                except OSError:
                    raise ClientGone() from None
                if n == 0:
                    break       # the file shrank under us
                offset += n
                left -= n
                self.sent += n
        finally:
            conn.setblocking(True)
        return True


class WSGIHandler:
    """Serves a WSGI app on each connection the worker hands it."""

    #: HTTP clients speak first: the master may hold a connection in the
    #: kernel until its request arrives (TCP_DEFER_ACCEPT), for this long.
    client_speaks_first: float = 0.0

    def __init__(self, app: WSGIApp, options: Options | None = None) -> None:
        self.app = app
        self.options = options or Options()
        self.limits = self.options.limits
        self.trusted = Allowed(",".join(self.options.forwarded_allow_ips))
        self.pool: PoolView = Alone()
        self.clock = Clock()
        #: mps.http._speedups serves (None), else the Python versions' memo
        #: (see Response.remember and head).
        self.heads: dict[Any, Any] | None = None if SPEEDUPS else {}
        self.errors = ErrorStream()
        self.buf = memoryview(bytearray(65536))
        self.keys: dict[bytes, str] = {}
        self.server: tuple[str, str] | None = None
        self.access: accesslog.AccessLog | None = None
        self.base: dict[str, Any] = {
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": self.errors,
            "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.input_terminated": True, "wsgi.file_wrapper": FileWrapper, "SCRIPT_NAME": "",
        }
        #: The common request served in C (speedups.Responder, see conclude
        #: for what it hands back); None: all in Python, as without the
        #: speedups or with an access log (its timing and environ copy).
        self.fast: Callable[..., Any] | None = None
        self.responder: Any = None
        if SPEEDUPS and not self.options.access_log:
            self.responder = speedups.Responder(
                app, self.base, self.keys, Input, self.promote, send_all, ClientGone,
                HeaderError, Response.check, self.forwarded)
            self.fast = self.responder.respond

    @classmethod
    def from_settings(cls, app: WSGIApp, settings: Any) -> WSGIHandler:
        """The handler for ``app`` with the HTTP settings of mps.config.Settings."""
        limits = Limits(
            request_line=settings.limit_request_line, fields=settings.limit_request_fields,
            field_size=settings.limit_request_field_size,
            max_body=settings.max_body or 2**62, header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate,
            # A child parked on an idle connection is busy to the master: keep
            # the park well inside `timeout`, which would kill it.
            keepalive_timeout=min(settings.keepalive_timeout, settings.timeout / 2)
            if settings.timeout > 0 else settings.keepalive_timeout)
        options = Options(
            limits=limits,
            keepalive_requests=settings.keepalive_requests if settings.keepalive_timeout else 1,
            forwarded_allow_ips=tuple(settings.forwarded_allow_ips.split(",")),
            access_log=settings.access_log, access_log_format=settings.access_log_format)
        handler = cls(app, options)
        handler.client_speaks_first = settings.header_timeout
        return handler

    def mps_warm_up(self) -> int:
        """In the master, once, before it forks: a few keep-alive connections
        over socketpairs, served by a throwaway handler of the same options
        (the same path: C or Python) and a two-byte app of its own -- never
        the user's app, the board or the access log (which only bind(), in a
        child, opens).  CPython specialises bytecode in place and caches
        attribute lookups as it runs; done here, in pages every child shares,
        that work is not copied into each child on its first connections
        (0.13-0.15 MiB less private memory per child after a keep-alive
        load).  Returns the number of responses the clone sent."""
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]

        clone = WSGIHandler(app, self.options)
        talk = (b"GET /warm?up=1 HTTP/1.1\r\nHost: mps\r\nAccept: */*\r\n\r\n" * 2
                + b"GET /warm HTTP/1.1\r\nHost: mps\r\nConnection: close\r\n\r\n")
        answered = 0
        for _ in range(WARM_UP_CONNECTIONS):
            ours, theirs = socket.socketpair()
            with theirs:
                with ours:
                    theirs.sendall(talk)
                    theirs.shutdown(socket.SHUT_WR)     # then end of input: nothing waits
                    clone(ours, "")
                got = b""
                while chunk := theirs.recv(65536):
                    got += chunk
                answered += got.count(b"HTTP/1.1 200 OK\r\n")
        clone.fast = clone.responder = None     # (a cycle: gone now, not frozen)
        return answered

    def bind(self, pool: PoolView) -> None:
        """In the child, once, before it serves: the pool seam, the access log."""
        self.pool = pool
        if self.options.access_log:
            self.access = accesslog.AccessLog(self.options.access_log,
                                              self.options.access_log_format)

    def direct(self, entry: tuple[int, ...], board: Any) -> Callable[[bool], Any] | None:
        """In the child, once: the C connection loop's call (Responder.serve_one),
        which accepts with ``entry`` (``board``.accept_entry; the board keeps
        its memory alive and makes a socket object when Python needs one) and
        serves the one-connection-per-request shape in C, handing every other
        connection to __call__ (with ``preread``); None where Python serves
        them all.  It marks each request on the board itself (as the pool's
        begin_request, which on the C board is that call)."""
        if self.fast is None or not LLHTTP:
            return None
        lim = self.limits
        self.responder.attach(entry, board, self.buf,
                              (lim.request_line, lim.fields, lim.field_size, lim.max_body),
                              board.socket_for, self)
        serve_one: Callable[[bool], Any] = self.responder.serve_one
        return serve_one

    def finish(self, req: Request, out: tuple[Any, ...]) -> None:
        """The rest of a request the C loop began and handed over after the
        app ran (as __call__ does with what Responder.respond hands back)."""
        try:
            self.conclude(req, *out)
        except HTTPError as exc:    # (a plain request has no body to go wrong)
            self.refuse(out[0].conn, None, exc)
        except ClientGone:
            pass

    # ------------------------------------------------------ a connection

    def __call__(self, conn: socket.socket, addr: Any, preread: int = 0) -> None:
        """Serve ``conn``; ``preread``: its first bytes are in the child's
        buffer already (read by the C loop, which handed the connection over)."""
        reader = Reader(conn, self.limits, self.pool, self.buf)
        if preread:
            reader.take(preread)
        peer = self.peer(conn, addr)
        began = reader.sink.opened     # (the connection's start, read once)
        served = 0
        pool, fast = self.pool, self.fast
        try:
            while True:
                req = reader.next_request(served == 0)
                if req is None:
                    return
                served += 1
                pool.begin_request(req.method, req.url)
                keep = (req.keep_alive and not reader.upgraded
                        and served < self.options.keepalive_requests and not pool.leaving())
                if keep and time.monotonic() - began >= KEEPALIVE_SLICE_S and pool.wanted():
                    keep = False
                if fast is not None:
                    out = fast(conn, reader, req, peer, keep)
                    if out is True:
                        continue
                    if out is False:
                        return
                    if out is not None:     # the app ran: Python goes on from there
                        going = self.conclude(req, *out)
                        out = None      # (not held through a keep-alive wait)
                        if not going:
                            return
                        continue
                if not self.respond(conn, addr, peer, reader, req, keep):
                    return
        except HTTPError as exc:
            self.refuse(conn, addr, exc)
        except ClientGone:
            pass
        finally:
            reader.close()

    def respond(self, conn: socket.socket, addr: Any, peer: tuple[str, ...], reader: Reader,
                req: Request, keep: bool) -> bool:
        """Run the app for one request; True when the connection goes on."""
        started = time.monotonic() if self.access is not None else 0.0
        body = Input(reader, req, reader.send_interim)
        resp = Response(conn, req, body, self.clock, keep, self.heads)
        environ = self.environ(req, peer, body)
        # The access log shows the request as it came, not as the app left
        # the environ (a mount moves PATH_INFO to SCRIPT_NAME, ProxyFix
        # rewrites REMOTE_ADDR): a copy, made only when there is a log.
        logged = environ
        if self.access is not None:
            logged = environ.copy()
            logged[accesslog.TARGET] = req.url.decode("latin-1")
        return self.conclude(req, resp, body, environ, _NOT_RUN, None, logged, started)

    def conclude(self, req: Request, resp: Response, body: Input, environ: dict[str, Any],
                 result: Any, error: BaseException | None,
                 logged: dict[str, Any] | None = None, started: float = 0.0) -> bool:
        """Run the app (unless ``result`` is what it returned, or ``error``
        what it raised: the C Responder ran it) and send its response; True
        when the connection goes on."""
        if logged is None:
            logged = environ
        conn = resp.conn
        try:
            if error is not None:
                try:
                    raise error
                finally:
                    error = None    # no cycle through the traceback
            if result is _NOT_RUN:
                result = self.app(environ, resp.start_response)
            self.send_result(resp, result)
        except ClientGone:
            self.log_access(logged, resp, started)
            raise
        except HTTPError:
            # Bad input met while the app read the body.
            self.log_access(logged, resp, started)
            if resp.head_sent:
                return False    # its status line would land inside this response
            raise
        except Exception:
            # The request line from the parser, escaped: the environ may have
            # been changed by the app, and a decoded path may hold newlines.
            log.exception("app failed on %s", printable(req.line().decode("latin-1")))
            if resp.head_sent:
                return False            # half a response: only closing can tell
            resp = Response(conn, req, body, self.clock, False, self.heads)
            resp.start_response("500 Internal Server Error",
                                [("Content-Type", "text/plain"), ("Content-Length", "26")])
            resp.write(b"500 Internal Server Error\n")
        if self.access is not None:
            self.log_access(logged, resp, started)
        if not resp.keep:
            return False
        if req.complete and not req.body:
            return True     # nothing of the body left to read (discard's fast case)
        try:
            return body.discard()
        except HTTPError:
            return False    # the rest of the body is bad: this response was the last

    def send_result(self, resp: Response, result: Iterable[bytes]) -> None:
        """The app's iterable, sent; its close() always called."""
        try:
            # A list body first: the commonest (a file_wrapper is never one).
            if isinstance(result, (list, tuple)) and not resp.head_sent:
                self.send_whole(resp, result)
                return
            if isinstance(result, FileWrapper):
                fd = result.fileno()
                if fd is not None and resp.status is not None and resp.send_file(fd):
                    resp.finish()
                    return
            for chunk in result:
                if chunk:
                    resp.write(chunk)
                elif not resp.head_sent and resp.status is not None:
                    pass    # an empty chunk before the first: keep waiting
            resp.finish()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def send_whole(self, resp: Response, parts: Sequence[bytes]) -> None:
        """A list body (the common case): its length is known, so it gets a
        Content-Length and goes out with the head in one send."""
        if len(parts) == 1 and type(parts[0]) is bytes:
            data = parts[0]     # the commonest of all: one bytes
        else:
            for part in parts:
                if not isinstance(part, (bytes, bytearray)):
                    raise TypeError(f"the app returned {type(part).__name__}, not bytes")
            data = b"".join(parts)
        size = len(data)
        head = resp.head(size)
        resp.head_sent = True
        if not resp.body_allowed or not size:
            send_all(resp.conn, head)
        elif resp.length == size and not resp.chunked:
            resp.sent = size    # frame()'s count, where it would change nothing else
            send_all(resp.conn, head + data)
            return      # finish() has nothing to add: all declared was sent
        else:
            send_all(resp.conn, head + resp.frame(data))
        resp.finish()

    def promote(self, conn: socket.socket, req: Request, body: Input, keep: bool,
                status: str | None, headers: list[tuple[str, str]] | None,
                done: tuple[int, int, bool, bool] | None = None) -> Response:
        """The Response that takes over an exchange the C Responder began
        (its start_response was given ``status`` and ``headers``, checked).
        ``done``: C sent the response, and this one is for a write() or a
        start_response the app kept and called late: (length, sent, keep,
        body_allowed) as a Response that sent it would hold them."""
        resp = Response(conn, req, body, self.clock, keep, self.heads)
        if status is not None and headers is not None:
            resp.status, resp.code, resp.headers = status, int(status[:3]), headers
        if done is not None:
            resp.head_sent = True
            resp.length, resp.sent, resp.keep, resp.body_allowed = done
        return resp

    def refuse(self, conn: socket.socket, addr: Any, exc: HTTPError) -> None:
        """Bad input: its status, a one-line body, and the connection closed."""
        body = b"%d %s\n" % (exc.status, exc.reason.encode())
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n" % (exc.status, exc.reason.encode(), len(body)))
        try:
            send_all(conn, head + self.clock.date() + b"Server: " + SERVER + b"\r\n\r\n" + body)
            conn.shutdown(socket.SHUT_WR)
        except (ClientGone, OSError):
            pass
        log.debug("refused a request from %s: %d %s", addr, exc.status, exc.reason)

    # ------------------------------------------------------ the environ

    def peer(self, conn: socket.socket, addr: Any) -> tuple[str, ...]:
        """The environ keys of a connection, once for all its requests, as
        (key, value, key, value...)."""
        if self.server is None:
            self.server = _server_name(conn)
        remote: tuple[str, ...]
        if isinstance(addr, tuple):
            remote = ("REMOTE_ADDR", addr[0], "REMOTE_PORT", str(addr[1]))
        else:
            remote = ("REMOTE_ADDR", "")
        return (*remote, "SERVER_NAME", self.server[0], "SERVER_PORT", self.server[1])

    def environ(self, req: Request, peer: tuple[str, ...], body: Input) -> dict[str, Any]:
        if self.heads is None:
            env = speedups.environ(self.base, req.method, req.url, req.version, req.headers,
                                   self.keys, peer, body)
        else:
            env = self.request_environ(req, peer, body)
        if "HTTP_X_FORWARDED_FOR" in env or "HTTP_X_FORWARDED_PROTO" in env:
            self.forwarded(env)
        return env

    def request_environ(self, req: Request, extra: tuple[str, ...],
                        body: Input) -> dict[str, Any]:
        """The Python version of speedups.environ: the request's keys, the
        connection's (``extra``: key, value, key, value...) and wsgi.input."""
        env = self.base.copy()
        url = req.url
        if url[:1] != b"/":
            # "*" (OPTIONS *) asks about the server as a whole: PATH_INFO ""
            # -- CGI's PATH_INFO is empty or starts with "/", so never "*".
            url = b"" if url == b"*" else _origin_form(url)
        path, _, query = url.partition(b"?")
        if b"#" in query:
            query = query.partition(b"#")[0]
        env["REQUEST_METHOD"] = req.method.decode("latin-1")
        env["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        env["QUERY_STRING"] = query.decode("latin-1")
        env["SERVER_PROTOCOL"] = req.version
        keys = self.keys
        for name, value in req.headers:
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
                if len(keys) < 512:
                    keys[name] = key
            text = value.decode("latin-1")
            if key in env:
                if key[:5] == "HTTP_":
                    env[key] += "," + text
            else:
                env[key] = text
        env["wsgi.input"] = body
        for i in range(0, len(extra), 2):
            env[extra[i]] = extra[i + 1]
        return env

    def forwarded(self, env: dict[str, Any]) -> None:
        """X-Forwarded-For/-Proto, believed only from forwarded_allow_ips."""
        if env["REMOTE_ADDR"] not in self.trusted:
            return
        chain = [h.strip() for h in env.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        # The right-most address not of a trusted proxy is the client's.
        while chain:
            host = chain.pop()
            if host not in self.trusted or not chain:
                env["REMOTE_ADDR"] = host
                break
        proto = env.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            env["wsgi.url_scheme"] = proto

    def log_access(self, environ: dict[str, Any], resp: Response, started: float) -> None:
        if self.access is not None:
            self.access.write(environ, resp.code, resp.sent, resp.headers,
                              time.monotonic() - started)


def _environ_key(name: bytes) -> str:
    key = name.decode("latin-1").upper().replace("-", "_")
    if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return key
    return "HTTP_" + key


def _origin_form(url: bytes) -> bytes:
    """The path of an absolute-form target (``GET http://host/p?q``)."""
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return url
    slash = url.find(b"/", scheme_end + 3)
    return url[slash:] if slash >= 0 else b"/"


def _server_name(sock: socket.socket) -> tuple[str, str]:
    try:
        name = sock.getsockname()
    except OSError:
        return ("localhost", "0")
    if isinstance(name, tuple):
        return (str(name[0]), str(name[1]))
    return ("localhost", "0")

