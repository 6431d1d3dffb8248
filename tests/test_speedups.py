"""mps.http._speedups (src/_mpshttp.c) against the Python versions it
replaces: the same input must give the same answer, whichever serves.

The live suites (test_wsgi, test_http_hostile) run both builds against real
servers; here hypothesis throws many more inputs at the two side by side,
in one process: start_response's checks, the response head, the environ,
and the parser callbacks (requests from the fuzz suite's generators, fed in
random pieces).
"""
from __future__ import annotations

import collections
import os
import re
import select
import socket
import sys
import threading
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mps.http import message, wsgi
from mps.http.body import Input
from mps.pool import Alone
from test_http_hostile import mutated_requests, valid_requests

speedups = pytest.importorskip(
    "mps.http._speedups",
    reason="mps.http._speedups is not built (no C compiler at install): "
           "pip install a C compiler (apt-get install gcc) and reinstall mps")

EXAMPLES = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DATE = b"Date: Fri, 27 Nov 2026 06:00:00 GMT\r\n"

# ------------------------------------------------------------ start_response

NAMES = ["Content-Type", "Content-Length", "content-length", "Connection", "CONNECTION",
         "Keep-Alive", "Transfer-Encoding", "TE", "Trailers", "Upgrade", "Proxy-Authenticate",
         "Proxy-Authorization", "Date", "Server", "X-Thing", "Set-Cookie", "x_under",
         "A~b|c", "a b", "", "a:b", "\u00e9t\u00e9"]
VALUES = ["text/plain", "13", "0", "007", "-5", "+5", "1_0", " 13", "close", "keep-alive",
          "Keep-Alive, CLOSE", "closed", "chunked", "x" * 40, "caf\u00e9", "\u2603",
          "99999999999999999999", "123456789012345678", "a\rb", "a\nb", "a\0b", ""]
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
values = st.one_of(st.sampled_from(VALUES), st.text(max_size=20))
statuses = st.one_of(
    st.sampled_from(["200 OK", "204 No Content", "304 Not Modified", "101 Switching",
                     "404 Not Found", "500 Oops", "200", "099 Low", "600 High", "2000 OK",
                     "200 OK\r\nX: y", "200  Spaces", "200 caf\u00e9", "200 \u2603"]),
    st.text(max_size=12))
header_lists = st.lists(st.tuples(names, values), max_size=6)


def python_refuses(status: Any, headers: Any) -> bool:
    try:
        wsgi.Response.check(status, headers)
    except wsgi.HeaderError:
        return True
    return False


@EXAMPLES
@given(status=statuses, headers=header_lists)
def test_valid_agrees_with_the_python_check(status: str, headers: list[tuple[str, str]]) -> None:
    assert speedups.valid(status, headers) is not python_refuses(status, headers)


@pytest.mark.parametrize("headers", [
    "not a list", [("a", "b", "c")], [["Name", "v"]], [(b"Name", "v")], [("Name", 5)], [()],
    (("Name", "v"),)])
def test_valid_refuses_what_is_not_a_list_of_str_pairs(headers: Any) -> None:
    assert not speedups.valid("200 OK", headers)
    assert python_refuses("200 OK", headers)


class FixedClock(wsgi.Clock):
    def date(self) -> bytes:
        return DATE


def response_head(fast: bool, status: str, headers: list[tuple[str, str]], method: bytes,
                  version: str, keep: bool, known_length: int) -> Any:
    """(head, length, keep, chunked, body_allowed) from the C or the Python
    build, or the class of what it raised."""
    req = message.Request(0.0)
    req.method, req.version, req.complete = method, version, True
    resp = wsgi.Response(None, req, Input(None, req, None),  # type: ignore[arg-type]
                         FixedClock(), keep, None if fast else {})
    try:
        resp.start_response(status, headers)
        head = resp.head(known_length)
    except (wsgi.HeaderError, UnicodeEncodeError) as exc:
        return type(exc).__name__
    return head, resp.length, resp.keep, resp.chunked, resp.body_allowed


@EXAMPLES
@given(status=statuses, headers=header_lists, method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]), keep=st.booleans(),
       known_length=st.one_of(st.just(-1), st.integers(0, 1 << 40)))
def test_head_is_the_python_head(status: str, headers: list[tuple[str, str]], method: bytes,
                                 version: str, keep: bool, known_length: int) -> None:
    python = response_head(False, status, headers, method, version, keep, known_length)
    c = response_head(True, status, headers, method, version, keep, known_length)
    if isinstance(python, str):     # refused: by either check, with either exception
        assert isinstance(c, str), (c, python)
    else:
        assert c == python


def test_head_frames_as_the_issue_says() -> None:
    """A spot check that both builds are right, not merely alike."""
    for fast in (True, False):
        head, length, keep, chunked, allowed = response_head(
            fast, "200 OK", [("Content-Type", "text/plain"), ("Connection", "close")],
            b"GET", "HTTP/1.1", True, -1)
        assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: "
                        b"chunked\r\nConnection: close\r\n" + DATE + b"Server: mps\r\n\r\n")
        assert (length, keep, chunked, allowed) == (-1, False, True, True)
        assert response_head(fast, "200 OK", [("Content-Length", "-5")], b"GET", "HTTP/1.1",
                             True, -1) == "HeaderError"


# ------------------------------------------------------------ the environ

targets = st.one_of(
    st.sampled_from([b"/", b"*", b"/a%20b?x=1#frag", b"http://h:1/p?q", b"http://h", b"/%zz%4",
                     b"/%41%4a?%41", b"https://x/y/z", b"/\xe9?\xff#"]),
    st.binary(max_size=30))
field_names = st.one_of(
    st.sampled_from([b"Host", b"Content-Type", b"content-length", b"X-Forwarded-For",
                     b"Cookie", b"Accept", b"Content-TYPE", b"\xb5", b"\xdf-x"]),
    st.binary(min_size=1, max_size=10))


@EXAMPLES
@given(method=st.sampled_from([b"GET", b"POST", b"OPTIONS", b"M-SEARCH"]), target=targets,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
       headers=st.lists(st.tuples(field_names, st.binary(max_size=12)), max_size=8))
def test_environ_is_the_python_environ(method: bytes, target: bytes, version: str,
                                       headers: list[tuple[bytes, bytes]]) -> None:
    handler = wsgi.WSGIHandler(lambda e, s: [])
    req = message.Request(0.0)
    req.method, req.url, req.version, req.headers = method, target, version, headers
    keys: dict[bytes, str] = {}
    extra = ("REMOTE_ADDR", "127.0.0.1", "REMOTE_PORT", "5", "SERVER_NAME", "h")
    body = object()
    assert speedups.environ(handler.base, method, target, version, headers, keys, extra, body) \
        == handler.request_environ(req, extra, body)  # type: ignore[arg-type]
    assert keys == handler.keys     # the caches agree too


# ------------------------------------------------------------ the parser's callbacks

LIMITS = message.Limits(request_line=200, fields=12, field_size=300, max_body=2000)
FIELDS = ("method", "url", "version", "headers", "keep_alive", "content_length", "chunked",
          "expect_continue", "body_size", "complete", "fields", "host", "chunks", "started")


def feed(sink_class: type, data: bytes, cuts: list[int]) -> tuple[list[Any], list[Any], str, int]:
    """``data`` through httptools' Python API into a sink, in pieces: the
    requests whose heads completed, every request begun, how the parse
    ended (an error's class name, or "ok") and the sink's head_bytes."""
    ready: collections.deque[Any] = collections.deque()
    sink = sink_class(LIMITS.request_line, LIMITS.fields, LIMITS.field_size, LIMITS.max_body,
                      1.5, ready)
    parser = httptools.HttpRequestParser(sink)
    sink.parser = parser
    outcome = "ok"
    start = 0
    try:
        for cut in sorted(set(cuts)) + [len(data)]:
            parser.feed_data(data[start:cut])
            start = cut
    except httptools.HttpParserCallbackError as exc:
        outcome = type(exc.__context__).__name__
    except httptools.HttpParserUpgrade:
        outcome = "upgrade"
    except httptools.HttpParserError as exc:
        outcome = type(exc).__name__
    finally:
        sink.parser = None
    begun = list(ready) + ([sink.last] if sink.last is not None and sink.last not in ready else [])
    return list(ready), begun, outcome, sink.head_bytes


def request_fields(r: Any) -> dict[str, Any]:
    """A request's fields but its start time (a clock reading)."""
    return {f: getattr(r, f) for f in FIELDS if f != "started"} | {"body": b"".join(r.body)}


def parse(sink_class: type, data: bytes, cuts: list[int]) -> list[Any]:
    """What a sink makes of ``data`` fed in pieces: each request begun as its
    fields, then how the parse ended and head_bytes."""
    _, begun, outcome, head_bytes = feed(sink_class, data, cuts)
    # (started: only whether it is the connection's, 1.5, or a later reading)
    made = [request_fields(r) | {"started": 1.5 if r.started == 1.5 else "later"}
            for r in begun]
    return made + [outcome, head_bytes]


@EXAMPLES
@given(data=st.one_of(valid_requests(), mutated_requests(),
                      st.lists(valid_requests(), min_size=2, max_size=3).map(b"".join)),
       cuts=st.lists(st.integers(0, 4000), max_size=4))
def test_the_c_sink_parses_as_the_python_sink(data: bytes, cuts: list[int]) -> None:
    assert parse(speedups.Sink, data, cuts) == parse(message.Sink, data, cuts)


def test_the_sinks_refuse_alike_with_the_right_errors() -> None:
    """Spot checks: each refusal is the error the issue names, in both."""
    cases = {
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n": "URITooLong",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n": "BadRequest",
        b"GET / HTTP/1.1\r\n\r\n": "BadRequest",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n": "NotImplementedCoding",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n": "PayloadTooLarge",
        b"CONNECT h:1 HTTP/1.1\r\nHost: x\r\n\r\n": "NotImplementedMethod",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20 + b"\r\n": "HeadersTooLarge",
        b"GET / HTTP/2.0\r\nHost: x\r\n\r\n": "VersionNotSupported",
    }
    for data, error in cases.items():
        for sink_class in (speedups.Sink, message.Sink):
            assert parse(sink_class, data, [])[-2] == error, (sink_class, data)


# ------------------------------------------------------------ the C loop's parse

def c_loop_parse(data: bytes) -> list[dict[str, Any]] | None:
    got = speedups.parse_lone(data, LIMITS.request_line, LIMITS.fields, LIMITS.field_size,
                              LIMITS.max_body)
    return None if got is None else [request_fields(r) for r in got]


@EXAMPLES
@given(data=st.one_of(valid_requests(), mutated_requests(),
                      st.lists(valid_requests(), min_size=2, max_size=3).map(b"".join)))
def test_the_c_loop_parses_as_httptools_python_api(data: bytes) -> None:
    """serve_one calls httptools' llhttp directly: the same requests as
    through httptools.HttpRequestParser, or a stop (Python serves the
    connection) where that parse fails, or at a body or a chunk."""
    ready, begun, outcome, _ = feed(speedups.Sink, data, [])
    want = [request_fields(r) for r in ready] if outcome == "ok" else None
    got = c_loop_parse(data)
    if got is None:
        assert want is None or any(r.body_size or r.chunks for r in begun), want
    else:
        assert got == want


def test_the_c_loop_parses_the_common_requests() -> None:
    got = c_loop_parse(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nA:\r\nConnection: close\r\n\r\n")
    assert got is not None and len(got) == 1
    assert (got[0]["method"], got[0]["url"], got[0]["version"], got[0]["keep_alive"]) == (
        b"GET", b"/a?b=1", "HTTP/1.1", False)
    assert got[0]["headers"] == [(b"Host", b"x"), (b"A", b""), (b"Connection", b"close")]
    assert got[0]["complete"]
    # Stops: a body, chunks, an upgrade, bad input; a head not yet whole parses on.
    for data in [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
                 b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na",
                 b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", b"GET /\x01 HTTP/1.1\r\n"]:
        assert c_loop_parse(data) is None, data
    assert c_loop_parse(b"GET / HTTP/1.1\r\nHost: x\r\n") == []


def test_the_c_loop_parses_with_the_installed_httptools() -> None:
    """Where httptools bundles an llhttp that src/_mpshttp.c does not know,
    mps still serves (in Python) but loses its C loop: this says so."""
    assert message.LLHTTP, f"httptools {httptools.__version__}: its llhttp is not one " \
                           "src/_mpshttp.c knows (see speedups.llhttp)"


def test_llhttp_binds_only_httptools_parser() -> None:
    path = sys.modules[httptools.HttpRequestParser.__module__].__file__
    try:
        assert speedups.llhttp(None) is False
        with pytest.raises(RuntimeError, match="not bound"):
            speedups.parse_lone(b"GET / HTTP/1.0\r\n\r\n", 1, 1, 1, 1)
        assert speedups.llhttp(speedups.__file__) is False       # no llhttp in it
        assert speedups.llhttp("/nonexistent/parser.so") is False
    finally:
        assert speedups.llhttp(path) is True
    assert c_loop_parse(b"GET / HTTP/1.0\r\n\r\n") is not None


# ------------------------------------------------------------ misuse from Python

def test_a_request_field_cannot_be_deleted_or_mistyped() -> None:
    req = speedups.Request(0.0)
    for name in ("method", "url", "version", "headers", "body"):
        with pytest.raises(AttributeError):
            delattr(req, name)
    with pytest.raises(TypeError):
        req.method = "GET"      # type: ignore[assignment]
    with pytest.raises(TypeError):
        req.headers = ()        # type: ignore[assignment]
    req.url = b"/x"
    assert req.line() == b" /x"


def test_a_sink_without_init_raises_instead_of_crashing() -> None:
    sink = speedups.Sink.__new__(speedups.Sink)
    sink.on_message_begin()
    with pytest.raises(RuntimeError):
        sink.on_headers_complete()


def test_a_parser_that_calls_back_into_the_sink_cannot_free_the_request() -> None:
    """on_headers_complete holds its request across the parser's methods,
    which are Python code here (they may begin another message)."""
    ready: collections.deque[Any] = collections.deque()
    sink = speedups.Sink(100, 10, 100, 100, 0.0, ready)

    class Reentrant:
        def get_method(self) -> bytes:
            sink.on_message_begin()     # drops the sink's reference to the first request
            return b"GET"

        def get_http_version(self) -> str:
            return "1.1"

        def should_keep_alive(self) -> bool:
            return True

    sink.parser = Reentrant()   # type: ignore[assignment]
    sink.on_message_begin()
    first = sink.parsing
    sink.on_url(b"/")
    sink.on_header(b"Host", b"x")
    sink.on_headers_complete()
    assert list(ready) == [first] and first.method == b"GET" and first.url == b"/"
    assert sink.parsing is not None and sink.parsing is not first     # the second, begun


def test_headers_changed_after_start_response_are_never_sent() -> None:
    for fast in (True, False):
        req = message.Request(0.0)
        req.method, req.version, req.complete = b"GET", "HTTP/1.1", True
        resp = wsgi.Response(None, req, Input(None, req, None),  # type: ignore[arg-type]
                             FixedClock(), True, None if fast else {})
        headers = [("Content-Type", "text/plain")]
        resp.start_response("200 OK", headers)
        headers.append(("X-Evil", "a\r\nSet-Cookie: b=1"))
        with pytest.raises(wsgi.HeaderError):
            resp.head(0)


@pytest.mark.parametrize("value, length", [
    (b"0" * 5000 + b"5", 5), (b"9999999999999999999", (1 << 63) - 1),
    (b"1" + b"0" * 19, (1 << 63) - 1), (b"00", 0)])
def test_long_content_lengths_read_alike(value: bytes, length: int) -> None:
    """Leading zeros are no reason to refuse a length; one past 2**63 is over
    any max_body (413), whatever int()'s digit limit says."""
    data = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
    big = message.Limits(field_size=8190, max_body=1 << 62)
    results = []
    for sink_class in (speedups.Sink, message.Sink):
        ready: collections.deque[Any] = collections.deque()
        sink = sink_class(big.request_line, big.fields, big.field_size, big.max_body, 0.0,
                          ready)
        sink.parser = httptools.HttpRequestParser(sink)
        try:
            sink.parser.feed_data(data)
            results.append(ready[0].content_length)
        except httptools.HttpParserCallbackError as exc:
            results.append(type(exc.__context__).__name__)
        finally:
            sink.parser = None
    expected = length if length <= big.max_body else "PayloadTooLarge"
    assert results == [expected, expected]


# ------------------------------------------------------------ a whole exchange

class Boom(Exception):
    pass


@st.composite
def app_behaviours(draw: st.DrawFn) -> dict[str, Any]:
    """What a WSGI app may do with start_response and its return value."""
    part = st.one_of(st.binary(max_size=20), st.binary(max_size=5).map(bytearray),
                     st.just("text"))
    return {
        "status": draw(st.one_of(st.sampled_from(["200 OK", "204 No Content", "304 Not Modified",
                                                  "404 Not Found", "200 OK\r\nX: y"]), statuses)),
        "headers": draw(st.one_of(
            st.sampled_from([[("Content-Type", "text/plain")], [("Content-Length", "3")],
                             [("Content-Length", "0")], [("Connection", "close")], []]),
            header_lists)),
        "parts": draw(st.lists(part, max_size=3)),
        "shape": draw(st.sampled_from(["list", "tuple", "generator", "closing", "none"])),
        "write": draw(st.one_of(st.none(), st.binary(max_size=10))),
        "start": draw(st.sampled_from(["once", "never", "twice", "twice-exc-info", "keywords"])),
        "raise": draw(st.sampled_from([None, None, None, "before", "after"])),
        "change": draw(st.booleans()),      # a header list changed after start_response
    }


def make_app(b: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        assert environ["wsgi.input"].read() == b""
        if b["raise"] == "before":
            raise Boom("before start_response")
        headers = list(b["headers"])
        headers.append(("X-Env", " ".join(str(environ.get(k)) for k in (
            "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "HTTP_HOST",
            "REMOTE_ADDR", "wsgi.url_scheme"))))
        if b["start"] == "keywords":
            write = start_response(status=b["status"], headers=headers)
        elif b["start"] != "never":
            write = start_response(b["status"], headers)
        if b["start"] == "twice":
            start_response("200 OK", [])
        elif b["start"] == "twice-exc-info":
            try:
                raise Boom("replaced")
            except Boom:
                write = start_response("500 Oops", [("X-Oops", "1")], sys.exc_info())
        if b["write"] is not None and b["start"] != "never":
            write(b["write"])
        if b["change"]:
            headers.append(("X-Late", "a\r\nb"))
        if b["raise"] == "after":
            raise Boom("after start_response")
        parts = b["parts"]
        if b["shape"] == "tuple":
            return tuple(parts)
        if b["shape"] == "generator":
            return (p for p in parts)
        if b["shape"] == "closing":
            return Closing(parts)
        if b["shape"] == "none":
            return None
        return list(parts)
    return app


class Closing(list):    # a list with close(): Python's path, not the C one
    closed = 0

    def close(self) -> None:
        Closing.closed += 1


def serve_once(app: Any, fast: bool, request: bytes) -> bytes:
    """What a client gets for ``request`` from WSGIHandler, the C Responder
    serving (``fast``) or every step in Python; the Date line blanked."""
    handler = wsgi.WSGIHandler(app)
    handler.bind(Alone())
    if not fast:
        handler.fast, handler.heads = None, {}
    server, client = socket.socketpair()
    with server, client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)     # one request, then the end of the stream
        handler(server, ("127.0.0.1", 5000))
        server.close()
        out = b""
        while chunk := client.recv(65536):
            out += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"Date: -\r\n", out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(behaviour=app_behaviours(), method=st.sampled_from([b"GET", b"HEAD"]),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
       extra=st.sampled_from([b"", b"Connection: close\r\n", b"X-Forwarded-For: 10.0.0.1\r\n",
                              b"Connection: keep-alive\r\n"]),
       pipelined=st.booleans())
def test_the_c_responder_answers_as_the_python_path(behaviour: dict[str, Any], method: bytes,
                                                    version: bytes, extra: bytes,
                                                    pipelined: bool) -> None:
    request = method + b" /p?q=1 " + version + b"\r\nHost: x\r\n" + extra + b"\r\n"
    if pipelined:       # answered only when the first response kept the connection
        request += b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    app = make_app(behaviour)
    closed = Closing.closed
    python = serve_once(app, False, request)
    closed_python = Closing.closed - closed
    c = serve_once(app, True, request)
    assert c == python
    assert Closing.closed - closed == 2 * closed_python     # close() called alike


COMMON = {"status": "200 OK", "headers": [("Content-Type", "text/plain")], "parts": [b"abc"],
          "shape": "list", "write": None, "start": "once", "raise": None, "change": False}
EDGES = [
    {}, {"parts": []}, {"parts": [b"a", b"", b"bc"]}, {"shape": "tuple"},
    {"headers": [("Content-Length", "3")], "parts": []},            # less than declared
    {"headers": [("Content-Length", "5")]}, {"headers": [("Content-Length", "2")]},
    {"headers": [("Content-Length", "0")], "parts": []},
    {"headers": [("Connection", "close")]}, {"headers": [("Connection", "keep-alive")]},
    {"headers": [("Date", "x"), ("Server", "y")]}, {"headers": [("Transfer-Encoding", "gzip")]},
    {"status": "204 No Content"}, {"status": "304 Not Modified", "parts": []},
    {"status": "101 Switching"}, {"status": "200 caf\u00e9"}, {"status": "200 \u2603"},
    {"headers": [("X-Snow", "\u2603")]}, {"headers": [("Content-Length", "-1")]},
    {"parts": [bytearray(b"abc")]}, {"parts": ["abc"]}, {"parts": [b"a", "b"]},
    {"shape": "generator"}, {"shape": "closing"}, {"shape": "none"}, {"write": b"xy"},
    {"write": b""}, {"start": "never"}, {"start": "twice"}, {"start": "twice-exc-info"},
    {"start": "keywords"}, {"raise": "before"}, {"raise": "after"}, {"change": True},
    {"status": "200"}, {"headers": [("a b", "c")]}, {"forwarded": True},
]


@pytest.mark.parametrize("edge", EDGES, ids=[repr(e)[:60] for e in EDGES])
@pytest.mark.parametrize("method, version", [(b"GET", b"HTTP/1.1"), (b"HEAD", b"HTTP/1.1"),
                                             (b"GET", b"HTTP/1.0")])
def test_the_c_responder_answers_edges_as_the_python_path(edge: dict[str, Any], method: bytes,
                                                          version: bytes) -> None:
    """Each of the C path's own branches, and each hand-over to Python, with
    a second request pipelined behind: it shows whether the connection went on."""
    app = make_app({**COMMON, **edge})
    keep = b"Connection: keep-alive\r\n" if version == b"HTTP/1.0" else b""
    if edge.get("forwarded"):
        keep += b"X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: https\r\n"
    request = (method + b" / " + version + b"\r\nHost: x\r\n" + keep + b"\r\n"
               b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    python = serve_once(app, False, request)
    assert python.startswith(b"HTTP/1.1 ")
    assert serve_once(app, True, request) == python


def test_the_c_responder_serves_the_common_request() -> None:
    """A spot check that the C path is taken, and right, not merely alike."""
    calls = []

    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(type(start_response).__name__)
        assert environ["PATH_INFO"] == "/p" and environ["QUERY_STRING"] == "q=1"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"Hello, ", b"world!"]

    out = serve_once(hello, True, b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert calls == ["builtin_function_or_method"]      # C's start_response
    assert out == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
                   b"Date: -\r\nServer: mps\r\n\r\nHello, world!")


def test_the_c_date_is_the_python_date() -> None:
    for _ in range(3):      # (a second may turn between the two)
        before = wsgi.Clock().date()
        c = speedups.date()
        if wsgi.Clock().date() == before:
            assert c == before
            return
    pytest.fail("the clock turned a second on every try")


def late_caller(how: str) -> Any:
    """An app that keeps the first request's write() or start_response and
    calls it while serving the second: the first response is long sent."""
    kept: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/1":
            kept["write"] = start_response("200 OK", [("Content-Length", "3")])
            kept["start"] = start_response
            return [b"one"]
        try:
            if how == "write":
                kept["write"](b"INJECTED")
            else:
                try:
                    raise KeyError("late")
                except KeyError:
                    kept["start"]("500 Late", [("Content-Length", "4")], sys.exc_info())(b"late")
        except Exception:      # (Python's rules: exc_info re-raised, as the head was sent)
            pass
        start_response("200 OK", [("Content-Length", "3")])
        return [b"two"]
    return app


@pytest.mark.parametrize("how", ["write", "exc_info"])
def test_a_late_call_never_sends_into_the_next_response(how: str) -> None:
    request = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    python = serve_once(late_caller(how), False, request)
    assert python.count(b"HTTP/1.1 ") == 2 and python.endswith(b"two")
    assert serve_once(late_caller(how), True, request) == python


def test_an_exchange_promoted_twice_at_once_keeps_one_response() -> None:
    """promote is Python: another thread may promote the same exchange while
    it runs (here: a nested write, as that thread would).  One Response
    serves, one head is sent, and the other Response is not leaked."""
    handler = wsgi.WSGIHandler(lambda environ, start_response: [])
    handler.bind(Alone())
    kept: dict[str, Any] = {}
    made: list[wsgi.Response] = []

    def promote(*args: Any) -> wsgi.Response:
        resp = handler.promote(*args)
        made.append(resp)
        if len(made) == 1:
            kept["write"](b"B")
        return resp

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        kept["write"] = start_response("200 OK", [])
        kept["write"](b"A")
        return []

    responder = speedups.Responder(app, handler.base, handler.keys, Input, promote,
                                   message.send_all, message.ClientGone, wsgi.HeaderError,
                                   wsgi.Response.check, handler.forwarded)
    server, client = socket.socketpair()
    with server, client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = message.Reader(server, handler.limits, handler.pool, handler.buf)
        req = reader.next_request(True)
        out = responder.respond(server, reader, req, handler.peer(server, ("127.0.0.1", 1)),
                                True)
        reader.close()
        server.shutdown(socket.SHUT_WR)
        assert out[0] is made[1]
        refs = sys.getrefcount(made[0])     # (outside assert: pytest's rewrite holds values)
        assert refs == 2        # the list's, and the argument's
        sent = b""
        while chunk := client.recv(65536):
            sent += chunk
    assert sent.count(b"HTTP/1.1 ") == 1 and b"\r\n1\r\nB\r\n" in sent and sent.endswith(b"A\r\n")


@pytest.mark.parametrize("fast", [True, False])
def test_a_body_larger_than_the_socket_takes_is_sent_whole(fast: bool) -> None:
    """The one sendmsg() takes part of a 3 MB body; the rest goes through
    send_all, waiting for the client to read: the client gets every byte."""
    body = bytes(range(256)) * (3_000_000 // 256)

    def big(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body[:1000], body[1000:]]

    handler = wsgi.WSGIHandler(big)
    handler.bind(Alone())
    if not fast:
        handler.fast, handler.heads = None, {}
    server, client = socket.socketpair()
    got = bytearray()

    def read() -> None:
        while chunk := client.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    with server, client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader.start()
        handler(server, ("127.0.0.1", 5000))
        server.shutdown(socket.SHUT_RDWR)
        reader.join(10)
    assert not reader.is_alive()
    head, _, sent = bytes(got).partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head and sent == body


def test_a_connection_served_in_c_gets_one_socket_object_at_most() -> None:
    """The C loop makes a connection's socket object only when Python needs
    one, by calling Python -- where another thread may get in and make one
    too (here: a nested write() while the first is made).  The one that
    lost is detached, never left owning the fd, which could by then be
    another connection's."""
    from mps.scoreboard import CScoreboard, c_available
    if not c_available():
        pytest.skip("the C scoreboard core is not built: apt-get install gcc, reinstall mps")
    board = CScoreboard(1)
    listener = socket.socket()
    waiter = select.epoll()
    try:
        slot = board.reserve()
        board.started(slot, os.getpid())
        board.idle(slot)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        waiter.register(listener, select.EPOLLIN)
        board.set_waiter(waiter)
        board.prepare_accept(listener)
        made: list[socket.socket] = []
        kept: dict[str, Any] = {}

        def socket_for(fd: int) -> socket.socket:
            sock = CScoreboard.socket_for(board, fd)
            made.append(sock)
            if len(made) == 1:
                kept["write"](b"")      # as another thread would, meanwhile
            return sock

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            kept["write"] = start_response("200 OK", [("Content-Length", "2")])
            kept["write"](b"ok")
            return []

        handler = wsgi.WSGIHandler(app)
        handler.bind(Alone())
        board.socket_for = socket_for   # type: ignore[method-assign]
        serve_one = handler.direct(board.accept_entry(slot, listener), board)
        assert serve_one is not None
        with socket.create_connection(listener.getsockname(), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert serve_one(False) is None         # served in C, and closed
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok")
        assert len(made) == 2
        assert made[0].fileno() == -1 and made[1].fileno() == -1   # detached; closed
    finally:
        waiter.close()
        listener.close()
        board.close()
