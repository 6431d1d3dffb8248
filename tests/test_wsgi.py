"""``mps serve --wsgi``: issue 8's "What users get", "HTTP, done right" and
"Operability", against real masters on 127.0.0.1 with real clients
(raw sockets, http.client, requests, curl).

Most checks share one master per scoreboard backend (``pool``: the
``wsgi_apps.router`` app, a small pool) or one single-child master per backend
(``solo``: where "the same child goes on" must be seen as the same pid).  The
apps are wrapped in ``wsgiref.validate.validator``, and the masters run with
WSGIWarning turned into an error, so a PEP 3333 violation by the server turns
a request into a 500 and fails the test that made it.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import requests

import wsgi_apps
from conftest import BACKENDS, TESTS, Master, pid_alive, run_mps, wait_until
from mps.http.message import NO_SPEEDUPS_ENV, SPEEDUPS
from mps.http.wsgi import WARM_UP_CONNECTIONS

#: Turns the validator's warnings into errors in the server: a 500 then.
STRICT_ENV = {"PYTHONWARNINGS": "error::wsgiref.validate.WSGIWarning"}
POOL = {"start_servers": 2, "min_spare": 1, "max_spare": 3, "max_children": 6}
ONE_CHILD = {"start_servers": 1, "min_spare": 1, "max_spare": 1, "max_children": 1}
MAX_BODY = 100_000


# ---------------------------------------------------------------- clients

@dataclass
class Reply:
    """One HTTP response as it came off the wire."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str        # "length", "chunked", "close" or "none"
    raw: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ",".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body.split(b"\n", 1)[0])


class Conn:
    """A raw client connection; replies are read one at a time, in order."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file: BinaryIO = self.sock.makefile("rb")

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> Conn:
        self.sock.sendall(data)
        return self

    def reply(self, method: str = "GET") -> Reply:
        return read_reply(self.file, method)

    def rest(self) -> bytes:
        """Everything until the server closes (reset counts as closed)."""
        try:
            return self.file.read()
        except ConnectionResetError:
            return b""

    def at_eof(self) -> bool:
        """The server closed the connection (nothing more follows)."""
        return self.rest() == b""


def read_reply(f: BinaryIO, method: str = "GET") -> Reply:
    """Parse one response from ``f`` strictly (a stray byte fails the parse)."""
    raw = bytearray()

    def line() -> bytes:
        data = f.readline(65537)
        raw.extend(data)
        if not data.endswith(b"\r\n"):
            raise AssertionError(f"truncated or bare-LF line {data[:200]!r} "
                                 f"after {bytes(raw)[-300:]!r}")
        return data[:-2]

    first = f.readline(65537)
    if not first:
        raise EOFError("the server closed the connection before a reply")
    raw.extend(first)
    m = re.fullmatch(rb"(HTTP/1\.[01]) ([1-5]\d\d) ([^\r\n]*)\r\n", first)
    assert m, f"bad status line {first[:200]!r}"
    version, status, reason = m.group(1).decode(), int(m.group(2)), m.group(3).decode()
    headers = []
    while (text := line()):
        name, sep, value = text.partition(b":")
        assert sep and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name), f"bad header {text!r}"
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    lows = {k.lower(): v for k, v in headers}
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Reply(version, status, reason, headers, b"", "none", bytes(raw))
    if lows.get("transfer-encoding", "").lower() == "chunked":
        assert "content-length" not in lows, "both Content-Length and chunked"
        body = bytearray()
        while True:
            size = int(line().split(b";")[0], 16)
            if size == 0:
                while line():       # trailers
                    pass
                break
            data = f.read(size)
            raw.extend(data)
            assert len(data) == size, f"chunk cut short: {bytes(raw)[-200:]!r}"
            body.extend(data)
            assert line() == b"", "chunk not followed by CRLF"
        return Reply(version, status, reason, headers, bytes(body), "chunked", bytes(raw))
    if "content-length" in lows:
        size = int(lows["content-length"])
        data = f.read(size)
        raw.extend(data)
        assert len(data) == size, f"body cut short: {len(data)} of {size}"
        return Reply(version, status, reason, headers, data, "length", bytes(raw))
    data = f.read()
    raw.extend(data)
    return Reply(version, status, reason, headers, data, "close", bytes(raw))


def req(method: str, path: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1",
        length: bool = True) -> bytes:
    """A request's bytes; ``length`` adds Content-Length for a body."""
    lines = [f"{method} {path} {version}", "Host: test", *headers]
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def ask(port: int, data: bytes, method: str = "GET") -> Reply:
    with Conn(port) as c:
        return c.send(data).reply(method)


def url(m: Master, path: str) -> str:
    return f"http://127.0.0.1:{m.port}{path}"


def log_has(m: Master, *needles: str, timeout: float = 10.0) -> str:
    """Wait until the master's log holds every needle; the log."""
    return str(wait_until(lambda: (lambda out: out if all(n in out for n in needles) else "")(
        m.output()), timeout, what=f"{needles} in the log"))


def marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------- masters

@dataclass
class Served:
    master: Master
    tmp: Path

    @property
    def port(self) -> int:
        return self.master.port

    @property
    def close_mark(self) -> Path:
        return self.tmp / "closed"

    @property
    def access_log(self) -> Path:
        return self.tmp / "access.log"

    def pid(self) -> int:
        reply = ask(self.port, req("GET", "/pid/", "Connection: close"))
        assert reply.status == 200, reply
        return int(reply.body)


def serve(tmp: Path, backend: str, target: str, settings: dict[str, Any],
          env: dict[str, str] | None = None) -> Iterator[Served]:
    # The Python scoreboard comes with the Python HTTP layer, as where no
    # compiler built either; the C one with mps.http._speedups.
    layer = {NO_SPEEDUPS_ENV: "1"} if backend == "python" else {}
    master = Master(tmp, "", backend, settings, {"CLOSE_MARK": str(tmp / "closed"), **STRICT_ENV,
                                                 **layer, **(env or {})}, wsgi=target)
    try:
        master.wait_ready()
        yield Served(master, tmp)
    finally:
        master.kill_all()


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Served]:
    """The router app on a small pool, access log on (combined format)."""
    tmp = tmp_path_factory.mktemp(f"pool-{request.param}")
    yield from serve(tmp, request.param, "wsgi_apps:router",
                     {**POOL, "max_body": MAX_BODY, "access_log": str(tmp / "access.log")})


@pytest.fixture(scope="module", params=BACKENDS)
def solo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Served]:
    """The router app on one child: every request meets the same pid until
    something kills or recycles it.  ``timeout`` kills a hung request."""
    tmp = tmp_path_factory.mktemp(f"solo-{request.param}")
    yield from serve(tmp, request.param, "wsgi_apps:router",
                     {**ONE_CHILD, "max_body": MAX_BODY, "timeout": 1.5, "max_requests": 0})


# ================================================================ what users get

HELLO_FILE = '''
def app(environ, start_response):
    body = b"file app " + environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.parametrize("spelling", ["module:app", "path/file.py:app", "module:create_app()"])
def test_wsgi_target_spellings(start_master: Callable[..., Master], tmp_path: Path,
                               spelling: str) -> None:
    """`mps serve --wsgi TARGET`, the target right after the flag, in each spelling."""
    if spelling == "path/file.py:app":
        site = tmp_path / "elsewhere"       # not on sys.path, not the master's cwd
        site.mkdir()
        (site / "myapp.py").write_text(HELLO_FILE)
        target, want = f"{site / 'myapp.py'}:app", b"file app /x"
    else:
        target = "wsgi_apps:hello" if spelling == "module:app" else "wsgi_apps:create_app()"
        want = b"Hello, World!"
    m = start_master(wsgi=target, **POOL, env=STRICT_ENV)
    m.wait_ready()
    assert m.proc.args[3:6] == ["serve", "--wsgi", target]    # exactly this spelling
    r = requests.get(url(m, "/x"), timeout=10)
    assert (r.status_code, r.content) == (200, want)
    assert r.headers["Server"] == "mps"


SERVER_FILE = '''
import os
import mps

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    out = b"%d %d" % (os.getpid(), len(body))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]

server = mps.Server(wsgi=app, start_servers=2, min_spare=1, max_spare=2, max_children=4,
                    max_body=10)

if __name__ == "__main__":
    server.run()
'''


def test_server_wsgi_run_as_a_script(tmp_path: Path) -> None:
    """`python app.py` with mps.Server(wsgi=app): the app is served, its
    Server keywords apply (max_body=10), and the command line still works."""
    script = tmp_path / "app.py"
    script.write_text(SERVER_FILE)
    status = tmp_path / "status.sock"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    log = open(tmp_path / "script.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), "--bind", f"fd://{listener.fileno()}",
                             "--status-socket", str(status)], pass_fds=[listener.fileno()],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(tmp_path))
    listener.close()
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "script.log").read_text()
            out = run_mps("status", str(status), "--json") if status.exists() else None
            return bool(out and out.code == 0 and json.loads(out.out)["children"]["idle"] >= 1)
        wait_until(ready, 20, interval=0.1, what="the script's pool")
        r = requests.post(f"http://127.0.0.1:{port}/", data=b"0123456789", timeout=10)
        assert r.status_code == 200
        pid, size = map(int, r.content.split())
        assert size == 10 and pid != proc.pid and pid_alive(pid)
        r = requests.post(f"http://127.0.0.1:{port}/", data=b"01234567890", timeout=10)
        assert r.status_code == 413      # Server(max_body=10)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def test_flask_app(start_master: Callable[..., Master]) -> None:
    """A real Flask app, unmodified, through a factory spelling."""
    m = start_master(wsgi="wsgi_apps:flask_app()", **POOL, max_body=10_000, env=STRICT_ENV)
    m.wait_ready()
    with requests.Session() as s:
        r = s.get(url(m, "/hello/wörld"), timeout=10)
        assert (r.status_code, r.text) == (200, "hello wörld")
        r = s.post(url(m, "/json"), json={"a": [1, 2]},
                   headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
                   timeout=10)
        assert r.status_code == 200
        assert r.json() == {"got": {"a": [1, 2]}, "remote": "203.0.113.9", "scheme": "https"}
        r = s.get(url(m, "/boom"), timeout=10)
        assert r.status_code == 500 and "on purpose" not in r.text
        r = s.get(url(m, "/nowhere"), timeout=10)
        assert r.status_code == 404
    # A chunked body past max_body is found while Flask reads it, and Flask
    # turns every exception into its own 500: the client still learns 413.
    r = requests.post(url(m, "/json"), data=iter([b"[" + b"1," * 6000, b"1]"]),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    log_has(m, "flask view failure on purpose")


def test_falcon_app(start_master: Callable[..., Master]) -> None:
    """A real Falcon app, unmodified, through a factory spelling; a chunked
    upload reaches its bounded_stream whole."""
    m = start_master(wsgi="wsgi_apps:falcon_app()", **POOL, env=STRICT_ENV)
    m.wait_ready()
    with requests.Session() as s:
        r = s.get(url(m, "/things/lamp?q=on"), timeout=10)
        assert r.status_code == 200
        assert r.json() == {"thing": "lamp", "q": "on"}
        r = s.post(url(m, "/things/box"), data=b"with a length", timeout=10)
        assert r.status_code == 201
        assert r.json() == {"thing": "box", "posted": "with a length"}
        r = s.post(url(m, "/things/box"), data=iter([b"part one, ", b"part two"]), timeout=10)
        assert r.request.headers.get("Transfer-Encoding") == "chunked"
        assert r.status_code == 201
        assert r.json() == {"thing": "box", "posted": "part one, part two"}
        assert s.get(url(m, "/nothing"), timeout=10).status_code == 404


def test_django_app(start_master: Callable[..., Master]) -> None:
    """A real Django project (settings in code, nothing of mps in it): its
    URL routing, form parsing, the forwarded client and scheme, its own 500
    and 404.  (Django reads a body by its Content-Length alone: a chunked
    upload reaches a Django view empty, under any server.)"""
    m = start_master(wsgi="django_app:application", **POOL, env=STRICT_ENV)
    m.wait_ready()
    with requests.Session() as s:
        r = s.get(url(m, "/hello/w%C3%B6rld"), timeout=10)
        assert (r.status_code, r.text) == (200, "hello wörld")
        r = s.post(url(m, "/form?q=1"), data={"a": "b c&d"},
                   headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
                   timeout=10)
        assert r.status_code == 200
        assert r.json() == {"a": "b c&d", "method": "POST", "remote": "203.0.113.9",
                            "secure": True, "q": "1"}
        r = s.head(url(m, "/hello/x"), timeout=10)
        assert r.status_code == 200 and r.content == b""
        r = s.get(url(m, "/boom"), timeout=10)
        assert r.status_code == 500 and "on purpose" not in r.text
        assert s.get(url(m, "/nowhere"), timeout=10).status_code == 404


# ================================================================ HTTP, done right

def test_keep_alive_default_on_http11(pool: Served) -> None:
    """HTTP/1.1 connections persist by default (http.client reuses its socket)."""
    conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
    try:
        conn.request("GET", "/pid/")
        first = conn.getresponse()
        pid = first.read()
        sock = conn.sock
        assert first.getheader("Connection") is None and not first.will_close
        for _ in range(3):
            conn.request("GET", "/pid/")
            again = conn.getresponse()
            assert again.read() == pid      # the same child: the same connection
            assert conn.sock is sock
    finally:
        conn.close()


def test_connection_close_honoured(pool: Served) -> None:
    with Conn(pool.port) as c:
        r = c.send(req("GET", "/hello/", "Connection: close")).reply()
        assert r.status == 200 and r.header("Connection") == "close"
        assert c.at_eof()


def test_http10_closes_unless_keep_alive(pool: Served) -> None:
    with Conn(pool.port) as c:
        r = c.send(req("GET", "/hello/", version="HTTP/1.0")).reply()
        assert (r.status, r.body) == (200, b"Hello, World!")
        assert r.header("Connection") == "close"
        assert c.at_eof()
    with Conn(pool.port) as c:
        for _ in range(3):
            r = c.send(req("GET", "/echo/", "Connection: keep-alive", version="HTTP/1.0")).reply()
            assert r.status == 200 and r.header("Connection") == "keep-alive"
            assert r.json()["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_pipelined_requests_answered_in_order(pool: Served) -> None:
    """Five requests in one write, bodies (read and unread) between them."""
    with Conn(pool.port) as c:
        c.send(req("GET", "/echo/one")
               + req("POST", "/hello/", body=b"never read by the app")
               + req("POST", "/echo/three", body=b"abc")
               + req("HEAD", "/echo/four")
               + req("GET", "/echo/five?last", "Connection: close"))
        one = c.reply()
        assert one.json()["PATH_INFO"] == "/one"
        assert c.reply().body == b"Hello, World!"
        three = c.reply()
        assert three.json()["PATH_INFO"] == "/three" and three.body.endswith(b"\nabc")
        four = c.reply("HEAD")
        assert four.status == 200 and four.body == b""
        five = c.reply()
        assert five.json()["QUERY_STRING"] == "last"
        assert c.at_eof()


def test_expect_100_continue_when_the_app_reads(pool: Served) -> None:
    with Conn(pool.port) as c:
        c.send(req("POST", "/echo/", "Expect: 100-continue", "Content-Length: 11"))
        interim = c.reply()
        assert (interim.status, interim.raw) == (100, b"HTTP/1.1 100 Continue\r\n\r\n")
        r = c.send(b"hello world").reply()
        assert r.status == 200 and r.json()["body_len"] == 11 and r.body.endswith(b"hello world")
        r = c.send(req("GET", "/hello/")).reply()   # the connection goes on
        assert r.body == b"Hello, World!"


def test_expect_100_continue_not_sent_when_the_app_never_reads(pool: Served) -> None:
    """The final answer comes without a 100; it says it closes, since the
    client may or may not send the body it announced."""
    with Conn(pool.port) as c:
        r = c.send(req("POST", "/hello/", "Expect: 100-continue", "Content-Length: 5")).reply()
        assert (r.status, r.body) == (200, b"Hello, World!")
        assert r.header("Connection") == "close"
        assert b"100 Continue" not in c.rest()


def test_no_100_continue_after_the_response_started(pool: Served) -> None:
    """An app that answers before it reads: a 100 now would land inside the
    response.  The client sends its body anyway (as curl does after a wait)."""
    with Conn(pool.port) as c:
        c.send(req("POST", "/late/", "Expect: 100-continue", "Content-Length: 5"))
        head = b""
        while not head.endswith(b"head first\n\r\n"):   # head and the first chunk
            byte = c.file.read(1)
            assert byte, f"closed after {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in head
        rest = c.send(b"12345").rest()
        assert b"100 Continue" not in head + rest
        assert rest == b"7\r\nread 5\n\r\n0\r\n\r\n"


def test_chunked_request_bodies_decoded(pool: Served) -> None:
    with Conn(pool.port) as c:
        body = chunked(b"hel", b"lo\nwor", b"ld\n", b"x" * 5000)
        r = c.send(req("POST", "/lines/", "Transfer-Encoding: chunked") + body).reply()
        assert r.status == 200 and r.body == b"6\n6\n5000\n"
        ext = b"3;name=value\r\nabc\r\n0\r\n\r\n"     # a chunk extension
        r = c.send(req("POST", "/echo/", "Transfer-Encoding: chunked") + ext).reply()
        info = r.json()
        assert info["body_len"] == 3 and r.body.endswith(b"\nabc")
        assert "CONTENT_LENGTH" not in info
        r = c.send(req("GET", "/hello/")).reply()
        assert r.body == b"Hello, World!"
    r2 = requests.post(url(pool.master, "/bounded/"), data=iter([b"a" * 70000, b"b" * 30000]),
                       timeout=10)
    assert r2.request.headers.get("Transfer-Encoding") == "chunked"
    assert r2.json()["len"] == 100000


def test_chunked_request_trailers_accepted(pool: Served) -> None:
    """RFC 9112 §7.1.2: a chunked body may end with trailer fields; a server
    may discard them but must read the message."""
    body = b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    r = ask(pool.port, req("POST", "/echo/", "Transfer-Encoding: chunked") + body)
    assert r.status == 200 and r.json()["body_len"] == 3


def test_head_204_304_carry_no_body(pool: Served) -> None:
    """Even when the app hands one over; the next reply on the connection
    parses cleanly, so no stray byte was sent."""
    with Conn(pool.port) as c:
        c.send(req("HEAD", "/hello/") + req("GET", "/faults/204-body")
               + req("GET", "/faults/304-body") + req("HEAD", "/lines/")
               + req("HEAD", "/faults/bigfile") + req("GET", "/hello/", "Connection: close"))
        head = c.reply("HEAD")
        assert head.status == 200 and head.header("Content-Length") == "13"
        r204 = c.reply()
        assert r204.status == 204 and r204.header("Content-Length") is None
        assert r204.header("Transfer-Encoding") is None
        r304 = c.reply()
        assert r304.status == 304 and r304.header("ETag") == '"v1"'
        assert r304.header("Transfer-Encoding") is None
        assert c.reply("HEAD").header("Transfer-Encoding") is None
        assert c.reply("HEAD").status == 200
        last = c.reply()
        assert last.body == b"Hello, World!"
        assert c.at_eof()


def test_unknown_length_chunked_on_11_close_delimited_on_10(pool: Served) -> None:
    with Conn(pool.port) as c:
        r = c.send(req("POST", "/lines/", body=b"a\nbb\n")).reply()
        assert r.framing == "chunked" and r.body == b"2\n3\n"
        r = c.send(req("GET", "/faults/write")).reply()       # write() from start_response
        assert r.framing == "chunked" and r.body == b"written and returned"
        assert c.send(req("GET", "/hello/")).reply().status == 200     # still open
    with Conn(pool.port) as c:
        r = c.send(req("POST", "/lines/", "Connection: keep-alive", body=b"a\nbb\n",
                       version="HTTP/1.0")).reply()
        assert r.framing == "close" and r.body == b"2\n3\n"
        assert r.header("Connection") == "close" and r.header("Transfer-Encoding") is None


def test_date_and_server_headers(pool: Served) -> None:
    for path in ("/hello/", "/faults/raise", "/nowhere"):
        r = ask(pool.port, req("GET", path))
        assert r.header("Server") == "mps"
        date = r.header("Date")
        assert date and date.endswith(" GMT")
        when = email.utils.parsedate_to_datetime(date).timestamp()
        assert abs(when - time.time()) < 5
    r = ask(pool.port, b"NOT A REQUEST\r\n\r\n")
    assert r.status == 400 and r.header("Server") == "mps" and r.header("Date")
    # The app's own Date and Server replace ours: never two of them.
    r = ask(pool.port, req("GET", "/faults/own-date"))
    assert [k for k, _ in r.headers].count("Date") == 1
    assert (r.header("Date"), r.header("Server")) == ("Sat, 01 Jan 2000 00:00:00 GMT", "myapp")


def test_environ_every_key_with_its_type(pool: Served) -> None:
    with Conn(pool.port) as c:
        port = c.sock.getsockname()[1]
        r = c.send(req("POST", "/environ/a%20b/c?x=1&y=%20", "Content-Type: text/plain",
                       "X-Dup: one", "X-Dup: two", body=b"12345")).reply()
    assert r.status == 200, r.body
    env = {k: tuple(v) for k, v in json.loads(r.body).items()}
    assert env["REQUEST_METHOD"] == ("str", "POST")
    assert env["SCRIPT_NAME"] == ("str", "/environ")    # the router mounted the app there
    assert env["PATH_INFO"] == ("str", "/a b/c")
    assert env["QUERY_STRING"] == ("str", "x=1&y=%20")
    assert env["CONTENT_TYPE"] == ("str", "text/plain")
    assert env["CONTENT_LENGTH"] == ("str", "5")
    assert env["SERVER_NAME"] == ("str", "127.0.0.1")
    assert env["SERVER_PORT"] == ("str", str(pool.port))
    assert env["SERVER_PROTOCOL"] == ("str", "HTTP/1.1")
    assert env["REMOTE_ADDR"] == ("str", "127.0.0.1")
    assert env["REMOTE_PORT"] == ("str", str(port))
    assert env["HTTP_HOST"] == ("str", "test")
    assert env["HTTP_X_DUP"] == ("str", "one,two")
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["wsgi.version"] == ("tuple", "(1, 0)")
    assert env["wsgi.url_scheme"] == ("str", "http")
    assert env["wsgi.input"][2] is True and env["wsgi.errors"][2] is True
    assert env["wsgi.multithread"] == ("bool", False)
    assert env["wsgi.multiprocess"] == ("bool", True)
    assert env["wsgi.run_once"] == ("bool", False)
    assert env["wsgi.input_terminated"] == ("bool", True)
    assert "wsgi.file_wrapper" in env
    plain = [k for k in env if "." not in k]
    assert all(env[k][0] == "str" for k in plain), env       # CGI keys are native strings
    r = ask(pool.port, req("GET", "/environ/", version="HTTP/1.0"))
    assert json.loads(r.body)["SERVER_PROTOCOL"] == ["str", "HTTP/1.0"]


def test_target_forms(start_master: Callable[..., Master]) -> None:
    """The absolute form gives its path; the asterisk form (OPTIONS *, the
    server as a whole) gives PATH_INFO "", since CGI's PATH_INFO is empty or
    begins with "/" (the validator holds the server to that)."""
    m = start_master(wsgi="wsgi_apps:echo", **POOL, env=STRICT_ENV)
    m.wait_ready()
    r = ask(m.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200 and (r.json()["PATH_INFO"], r.json()["SCRIPT_NAME"]) == ("", "")
    r = ask(m.port, b"GET http://example.com/a%2Fb?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert r.status == 200 and (r.json()["PATH_INFO"], r.json()["QUERY_STRING"]) == ("/a/b", "q=1")


def test_wsgi_input_bounded_to_the_body(pool: Served) -> None:
    """The app reads far past its body: it gets the body, then b"" -- never
    the pipelined request behind it."""
    with Conn(pool.port) as c:
        c.send(req("POST", "/bounded/", body=b"hello") + req("GET", "/echo/behind"))
        info = c.reply().json()
        assert info == {"len": 5, "head": "hello", "after": ["", "", ""], "terminated": True}
        assert c.reply().json()["PATH_INFO"] == "/behind"
        big = os.urandom(MAX_BODY)
        r = c.send(req("POST", "/bounded/", body=big) + req("GET", "/echo/again")).reply()
        assert r.json()["len"] == MAX_BODY and r.json()["after"] == ["", "", ""]
        assert c.reply().json()["PATH_INFO"] == "/again"
        r = c.send(req("GET", "/bounded/")).reply()     # no body at all
        assert r.json()["len"] == 0


def test_wsgi_errors_goes_to_the_log(pool: Served) -> None:
    mark = uuid.uuid4().hex
    assert ask(pool.port, req("GET", f"/errors/?{mark}")).body == b"ok"
    out = log_has(pool.master, f"app: write {mark}", f"app: lines {mark} joined",
                  f"app: flushed {mark}")
    line = next(x for x in out.splitlines() if f"write {mark}" in x)
    assert re.search(r"\[\d+\] \[slot \d+\] ERROR app: write", line), line   # pid and slot


def test_exc_info_semantics(pool: Served) -> None:
    # Before anything was sent: the new status and headers replace the old.
    r = ask(pool.port, req("GET", "/exc/before"))
    assert (r.status, r.header("Retry-After"), r.body) == (503, "1", b"replaced")
    # Twice without exc_info: an error, so a 500.
    assert ask(pool.port, req("GET", "/exc/twice")).status == 500
    # After the head went out: start_response re-raises; the response cannot
    # be fixed, so the connection ends mid-body (no final chunk).
    with Conn(pool.port) as c:
        c.send(req("GET", "/exc/after"))
        with pytest.raises(AssertionError, match="truncated"):
            c.reply()
    conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
    try:
        conn.request("GET", "/exc/after")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as got:
            resp.read()
        assert got.value.partial == b"partial"
    finally:
        conn.close()
    log_has(pool.master, "ValueError: caught by the app on purpose",
            "start_response called twice without exc_info")


def test_close_is_always_called(pool: Served) -> None:
    """The iterable's close(): after a whole body, a failed iteration, a
    HEAD, and a client that left in the middle of the body."""
    tag = uuid.uuid4().hex[:8]
    assert ask(pool.port, req("GET", f"/closing/?ok-{tag}")).body == b"ab"
    with Conn(pool.port) as c:
        c.send(req("GET", f"/closing/?raise-{tag}"))
        with pytest.raises(AssertionError, match="truncated"):
            c.reply()
    assert ask(pool.port, req("HEAD", f"/closing/?head-{tag}"), "HEAD").status == 200
    with Conn(pool.port) as c:
        c.send(req("GET", f"/closing/?big-{tag}"))
        assert c.file.readline().startswith(b"HTTP/1.1 200")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset
    want = {f"closed {kind}-{tag}" for kind in ("ok", "raise", "head", "big")}
    wait_until(lambda: want <= set(marks(pool.close_mark)), what=f"close() marks {want}")
    log_has(pool.master, "iteration failure on purpose")
    # The big body was really cut short by the client (not all buffered).
    line = wait_until(lambda: [x for x in pool.access_log.read_text().splitlines()
                               if f"big-{tag}" in x], what="the big response's access log line")
    sent = COMBINED.fullmatch(line[0])
    assert sent and int(sent.group("size")) < 32 << 20, line


def test_file_wrapper_bodies(pool: Served) -> None:
    """wsgi.file_wrapper: real files (sent with os.sendfile) arrive whole
    with their length, from the file's offset; a file without a descriptor
    is iterated instead."""
    source = Path(wsgi_apps.__file__).read_bytes()
    with Conn(pool.port) as c:
        r = c.send(req("GET", "/faults/file")).reply()
        assert r.body == source and r.framing == "length"
        r = c.send(req("GET", "/faults/file-offset")).reply()
        assert r.body == source[100:]
        r = c.send(req("GET", "/faults/wrap-bytesio")).reply()
        assert r.body == b"from a file without a descriptor" and r.framing == "chunked"
        r = c.send(req("GET", "/faults/bigfile")).reply()
        assert r.header("Content-Length") == str(len(wsgi_apps.BIG_FILE))
        assert r.body == wsgi_apps.BIG_FILE
        assert c.send(req("GET", "/hello/")).reply().body == b"Hello, World!"
    got = requests.get(url(pool.master, "/faults/bigfile"), timeout=10, stream=True)
    assert b"".join(got.iter_content(7919)) == wsgi_apps.BIG_FILE   # read slowly, odd sizes


def test_header_names_with_underscores_dropped(pool: Served) -> None:
    """X_Forwarded_For would become HTTP_X_FORWARDED_FOR beside (or instead
    of) X-Forwarded-For: a spoofing route, so such names never reach the app."""
    r = ask(pool.port, req("POST", "/echo/", "X_Forwarded_For: 6.6.6.6",
                           "X-Forwarded_Proto: https", "Content_Length: 3",
                           "Transfer_Encoding: chunked", "X-Fine: yes", body=b"hello"))
    info = r.json()
    assert "HTTP_X_FORWARDED_FOR" not in info and "HTTP_X_FORWARDED_PROTO" not in info
    assert "HTTP_TRANSFER_ENCODING" not in info
    assert info["REMOTE_ADDR"] == "127.0.0.1" and info["wsgi.url_scheme"] == "http"
    assert info["CONTENT_LENGTH"] == "5" and info["body_len"] == 5
    assert info["HTTP_X_FINE"] == "yes"
    assert not [k for k in info if k.startswith("HTTP_") and "6.6.6.6" in str(info[k])]
    # Beside the real header it must not join it either: the proxy's value
    # alone decides REMOTE_ADDR (127.0.0.1 is a trusted proxy by default).
    info = ask(pool.port, req("GET", "/echo/", "X-Forwarded-For: 192.0.2.1",
                              "X_Forwarded_For: 6.6.6.6")).json()
    assert info["HTTP_X_FORWARDED_FOR"] == "192.0.2.1" and info["REMOTE_ADDR"] == "192.0.2.1"


@pytest.mark.parametrize("path", ["/faults/crlf", "/faults/nul", "/faults/badname",
                                  "/faults/length?-10", "/faults/length?1_0",
                                  "/faults/length?10&10", "/faults/length?10&5"])
def test_unsendable_app_headers_are_500(pool: Served, path: str) -> None:
    with Conn(pool.port) as c:
        r = c.send(req("GET", path)).reply()
        wire = r.raw + c.rest()
    assert r.status == 500 and r.header("Connection") == "close"
    for leak in (b"owned", b"Set-Cookie", b"X-Evil", b"X Bad", b"never", b"\0", b"0123456789",
                 b": -10", b"1_0"):
        assert leak not in wire
    log_has(pool.master, f"app failed on GET {path}", "HeaderError")


def test_app_content_length_frames_the_body(pool: Served) -> None:
    """A valid Content-Length from the app is sent once and frames the body."""
    with Conn(pool.port) as c:
        r = c.send(req("GET", "/faults/length?10")).reply()
        assert (r.framing, r.body) == ("length", b"0123456789")
        assert [k.lower() for k, _ in r.headers].count("content-length") == 1
        assert c.send(req("GET", "/hello/")).reply().body == b"Hello, World!"


# ================================================================ bad input

#: (name, request bytes, status): each answered before the app runs; the
#: request names /closing/?bad-NAME, which would leave a mark if it ran.
BAD_INPUT = [
    ("malformed-line", b"GET /closing/?bad-malformed-line HTTP/1.1 extra\r\nHost: t\r\n\r\n", 400),
    ("malformed-header", b"GET /closing/?bad-malformed-header HTTP/1.1\r\nHost t\r\n\r\n", 400),
    ("long-line", b"GET /closing/?bad-long-line" + b"a" * 9000
     + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    ("many-fields", b"GET /closing/?bad-many-fields HTTP/1.1\r\nHost: t\r\n"
     + b"".join(b"X-F%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    ("large-field", b"GET /closing/?bad-large-field HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 9000
     + b"\r\n\r\n", 431),
    ("cl-and-te", b"POST /closing/?bad-cl-and-te HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-cl", b"POST /closing/?bad-duplicate-cl HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("invalid-cl", b"POST /closing/?bad-invalid-cl HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: 5x\r\n\r\n", 400),
    ("te-gzip", b"POST /closing/?bad-te-gzip HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te-gzip-chunked", b"POST /closing/?bad-te-gzip-chunked HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("over-max-body", b"POST /closing/?bad-over-max-body HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
]


@pytest.mark.parametrize("name,data,status", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_status(solo: Served, name: str, data: bytes, status: int) -> None:
    """Its status, the connection closed, the app never called, the child alive."""
    before = solo.pid()
    with Conn(solo.port) as c:
        r = c.send(data).reply()
        assert r.status == status, r.raw
        assert r.header("Connection") == "close"
        assert c.at_eof()
    # A good request after it leaves its mark: had the bad one reached the
    # app (before it, on the same one child), its mark would be there too.
    assert ask(solo.port, req("GET", f"/closing/?good-{name}")).body == b"ab"
    wait_until(lambda: f"closed good-{name}" in marks(solo.close_mark), what="the good mark")
    assert not [x for x in marks(solo.close_mark) if x.startswith("closed bad-")]
    assert solo.pid() == before
    assert solo.master.child_pids() == {before}


def test_413_before_the_body_is_sent(solo: Served) -> None:
    """The client learns 413 from the head alone: it never has to send the
    body (with or without Expect: 100-continue)."""
    before = solo.pid()
    for expect in ([], ["Expect: 100-continue"]):
        with Conn(solo.port, timeout=5) as c:
            c.send(req("POST", "/echo/", *expect, f"Content-Length: {MAX_BODY * 10}"))
            r = c.reply()
            assert r.status == 413 and b"100 Continue" not in r.raw
            assert c.at_eof()
    # A chunked body that grows past max_body mid-way is cut off at 413 too.
    with Conn(solo.port, timeout=5) as c:
        c.send(req("POST", "/echo/", "Transfer-Encoding: chunked"))
        c.send(b"%x\r\n" % (MAX_BODY + 10) + b"x" * (MAX_BODY + 10) + b"\r\n")
        assert c.reply().status == 413
    assert solo.pid() == before


def test_bad_body_after_the_response_started_just_closes(solo: Served) -> None:
    """Malformed chunked input found while the app streams its response:
    nothing can be answered any more, so the connection closes -- no second
    status line inside the first response."""
    before = solo.pid()
    with Conn(solo.port) as c:
        c.send(req("POST", "/late/", "Transfer-Encoding: chunked") + b"5\r\nhello\r\nZZ\r\n")
        wire = c.rest()
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n")
    assert wire.count(b"HTTP/1.1") == 1, wire
    assert solo.pid() == before


def test_app_that_raises_gets_500_and_the_child_goes_on(solo: Served) -> None:
    before = solo.pid()
    with Conn(solo.port) as c:
        r = c.send(req("GET", "/faults/raise")).reply()
        wire = r.raw + c.rest()
    assert r.status == 500 and r.body == b"500 Internal Server Error\n"
    for leak in (b"Traceback", b"RuntimeError", b"on purpose", b"wsgi_apps"):
        assert leak not in wire
    out = log_has(solo.master, "RuntimeError: app failure on purpose")
    assert "Traceback (most recent call last)" in out and "wsgi_apps.py" in out
    # The log names the request as it came, escaped: a decoded path could
    # otherwise start a log line of its own.
    assert ask(solo.port, req("GET", "/faults/raise%0d%0aFORGED-LINE")).status == 500
    out = log_has(solo.master, "app failed on GET /faults/raise%0d%0aFORGED-LINE")
    assert not [x for x in out.splitlines() if x.startswith("FORGED")]
    # Failing mid-body: the response is cut (it cannot be fixed); the child goes on.
    with Conn(solo.port) as c:
        with pytest.raises(AssertionError, match="truncated"):
            c.send(req("GET", "/faults/gen-raise")).reply()
    assert solo.pid() == before
    doc = solo.master.status()
    assert doc["totals"]["crashed"] == 0


def test_timeout_kills_a_hung_request(solo: Served) -> None:
    """`timeout` applies to a WSGI request: the master kills the child, the
    client's connection ends without a reply, a new child serves the next."""
    before = solo.pid()
    began = time.monotonic()
    with Conn(solo.port, timeout=20) as c:
        c.send(req("GET", "/slow/?s=60"))
        assert c.at_eof()
    assert time.monotonic() - began < 10
    wait_until(lambda: not pid_alive(before), what="the hung child to die")
    log_has(solo.master, "exceeded timeout")
    after = solo.pid()
    assert after != before
    assert solo.master.status()["totals"]["timed_out"] >= 1


def test_max_requests_recycles_children(start_master: Callable[..., Master],
                                        backend: str) -> None:
    """max_requests (connections per child) recycles a WSGI child as it
    does a raw one; keep-alive requests on one connection count once."""
    m = start_master(wsgi="wsgi_apps:router", backend=backend, **ONE_CHILD, max_requests=2,
                     env=STRICT_ENV)
    m.wait_ready()

    def pids_on_one_connection(n: int) -> set[int]:
        with Conn(m.port) as c:
            return {int(c.send(req("GET", "/pid/")).reply().body) for _ in range(n)}
    first = pids_on_one_connection(3)
    assert len(first) == 1
    assert pids_on_one_connection(2) == first       # the second connection
    third = pids_on_one_connection(1)
    assert third != first
    wait_until(lambda: not pid_alive(first.pop()), what="the recycled child to leave")
    assert m.status()["totals"]["recycled"] >= 1


# ================================================================ the C connection loop

CLOSE_REQUESTS = [
    req("GET", "/cgi/a%20b?x=1&y=%41", "Connection: close"),
    req("HEAD", "/cgi/h", "Connection: close"),
    req("GET", "/cgi/old", version="HTTP/1.0"),
    req("GET", "/cgi/fwd", "Connection: close", "X-Forwarded-For: 203.0.113.7",
        "X-Forwarded-Proto: https"),
    req("GET", "/cgi/dup", "Connection: close", "Accept: a", "Accept: b", "X_Under: no"),
    req("GET", "http://test/cgi/absolute?q", "Connection: close"),
]


def close_exchange(port: int, data: bytes) -> bytes:
    """One request on its own connection; all the server sends until it closes."""
    with Conn(port) as c:
        return re.sub(rb"Date: [^\r]*\r\n", b"", c.send(data).rest())


def test_the_c_loop_answers_as_the_python_layer(start_master: Callable[..., Master]) -> None:
    """One request per connection (Connection: close, HTTP/1.0) is served by
    mps.http's C connection loop -- accept, parse, environ, app, response,
    close -- on the C build; the same requests on the Python build give the
    same bytes (but for Date, and which path served)."""
    if not SPEEDUPS:
        pytest.skip("mps.http._speedups is not built here (no C compiler at install): "
                    "apt-get install gcc and reinstall mps")
    # (Bound by the master: TCP_DEFER_ACCEPT, so the first read has the
    # request.  On a listener handed in, see the next test.)
    c_build = start_master(wsgi="wsgi_apps:router", bind="127.0.0.1:0", **POOL, env=STRICT_ENV)
    python = start_master(wsgi="wsgi_apps:router", bind="127.0.0.1:0", **POOL,
                          env={**STRICT_ENV, NO_SPEEDUPS_ENV: "1"})
    c_build.wait_ready()
    python.wait_ready()
    for data in CLOSE_REQUESTS:
        got_c, got_py = close_exchange(c_build.port, data), close_exchange(python.port, data)
        if not data.startswith(b"HEAD"):
            assert json.loads(got_c.partition(b"\r\n\r\n")[2])["served by"] == "c-loop"
            assert json.loads(got_py.partition(b"\r\n\r\n")[2])["served by"] == "python"
        # (SERVER_PORT: each server's own, both five digits -- ephemeral ports)
        got_c = got_c.replace(b"c-loop", b"python").replace(b"%d" % c_build.port, b"PORT")
        assert got_c == got_py.replace(b"%d" % python.port, b"PORT"), data
    # A kept-alive request is handed to the Python path (it owns keep-alive).
    with Conn(c_build.port) as c:
        assert c.send(req("GET", "/cgi/ka")).reply().json()["served by"] == "python"


def test_the_c_loop_waits_for_a_request_that_follows_its_connection(
        start_master: Callable[..., Master]) -> None:
    """On a listener handed in (fd://, systemd: no TCP_DEFER_ACCEPT) a child
    can take a connection before its request arrives; the C loop waits a
    little for the bytes and serves the request itself."""
    if not SPEEDUPS:
        pytest.skip("mps.http._speedups is not built here (no C compiler at install): "
                    "apt-get install gcc and reinstall mps")
    m = start_master(wsgi="wsgi_apps:router", **ONE_CHILD, env=STRICT_ENV)   # fd://
    m.wait_ready()
    served = []
    for _ in range(3):      # (the wait is short: a test descheduled past it misses it once)
        with Conn(m.port) as c:
            wait_until(lambda: m.status()["children"]["busy"] == 1, interval=0.002,
                       what="the child holding the connection, no request yet")
            got = c.send(req("GET", "/cgi/after", "Connection: close")).rest()
        served.append(json.loads(got.partition(b"\r\n\r\n")[2])["served by"])
        if served[-1] == "c-loop":
            break
    assert "c-loop" in served, served


def test_both_paths_give_the_peers_address_and_port_as_the_client_has_them(
        start_master: Callable[..., Master]) -> None:
    """REMOTE_ADDR and REMOTE_PORT of clients on several loopback addresses
    (parts of one, two and three digits, zeros): the C loop formats them
    itself, the Python path takes accept()'s."""
    builds = {"c": STRICT_ENV, "python": {**STRICT_ENV, NO_SPEEDUPS_ENV: "1"}}
    for layer, env in builds.items():
        m = start_master(wsgi="wsgi_apps:whoami", bind="127.0.0.1:0", **POOL, env=env)
        m.wait_ready()
        for source in ("127.0.0.1", "127.10.200.3", "127.255.0.99"):
            with socket.create_connection(("127.0.0.1", m.port), timeout=10,
                                          source_address=(source, 0)) as s:
                s.sendall(req("GET", "/", "Connection: close"))
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
                mine = s.getsockname()
            remote = got.partition(b"\r\n\r\n")[2].decode().split()[2:]
            assert remote == [mine[0], str(mine[1])], (layer, got)


def test_the_c_loop_serves_a_unix_socket_as_the_python_layer(
        start_master: Callable[..., Master], tmp_path: Path) -> None:
    """Behind nginx on a Unix socket: REMOTE_ADDR is "" and there is no
    REMOTE_PORT, in both builds.  (No TCP_DEFER_ACCEPT there: the request
    is queued behind a busy child here, so the first read has it.)"""
    if not SPEEDUPS:
        pytest.skip("mps.http._speedups is not built here (no C compiler at install): "
                    "apt-get install gcc and reinstall mps")
    replies = {}
    for layer, env in (("c", STRICT_ENV), ("python", {**STRICT_ENV, NO_SPEEDUPS_ENV: "1"})):
        path = tmp_path / f"{layer}.sock"
        m = start_master(wsgi="wsgi_apps:router", extra_args=["--bind", f"unix:{path}"],
                         **ONE_CHILD, env=env)
        m.wait_ready()
        with socket.socket(socket.AF_UNIX) as busy, socket.socket(socket.AF_UNIX) as queued:
            busy.settimeout(10)
            queued.settimeout(10)
            busy.connect(str(path))
            busy.sendall(req("GET", "/slow/?s=0.3", "Connection: close"))
            wait_until(lambda: m.status()["children"]["busy"] == 1, what="the child busy")
            queued.connect(str(path))
            queued.sendall(req("GET", "/cgi/u?q", "Connection: close"))
            got = b""
            while chunk := queued.recv(65536):
                got += chunk
        replies[layer] = re.sub(rb"Date: [^\r]*\r\n", b"", got)
    served = json.loads(replies["c"].partition(b"\r\n\r\n")[2])
    assert served["served by"] == "c-loop" and served["REMOTE_ADDR"] == ""
    assert replies["c"].replace(b"c-loop", b"python") == replies["python"]


def test_the_c_loop_hands_over_what_it_cannot_serve(start_master: Callable[..., Master]) -> None:
    """What the C loop does not serve itself reaches the Python path whole:
    a body, a head that arrives in pieces, pipelining, bad input."""
    m = start_master(wsgi="wsgi_apps:router", bind="127.0.0.1:0", **POOL, env=STRICT_ENV)
    m.wait_ready()
    posted = ask(m.port, req("POST", "/echo/", "Connection: close", body=b"0123456789"))
    assert posted.status == 200 and posted.json()["body_len"] == 10
    with Conn(m.port) as c:     # the head in two pieces: the first read has half
        c.send(b"GET /cgi/slowly HTTP/1.1\r\nHo")
        time.sleep(0.05)
        assert c.send(b"st: test\r\nConnection: close\r\n\r\n").reply().status == 200
    with Conn(m.port) as c:     # two requests in the first read
        c.send(req("GET", "/cgi/1") + req("GET", "/cgi/2", "Connection: close"))
        assert [c.reply().json()["PATH_INFO"] for _ in range(2)] == ["/1", "/2"]
        assert c.at_eof()
    bad = ask(m.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
    assert bad.status == 400


def test_the_c_loop_keeps_the_pools_rules(start_master: Callable[..., Master]) -> None:
    """Connections served in C count toward max_requests, show their request
    in the status while busy, and an app error is a 500 the child survives."""
    m = start_master(wsgi="wsgi_apps:router", bind="127.0.0.1:0", **ONE_CHILD, max_requests=3,
                     env=STRICT_ENV)
    m.wait_ready()
    pids = [int(ask(m.port, req("GET", "/pid/", "Connection: close")).body) for _ in range(7)]
    assert len(set(pids)) >= 3 and pids[0] == pids[1] == pids[2] != pids[3]
    assert m.status()["totals"]["recycled"] >= 2
    failed = ask(m.port, req("GET", "/faults/raise", "Connection: close"))
    assert failed.status == 500
    log_has(m, "app failure on purpose")
    with Conn(m.port) as c:
        c.send(req("GET", "/slow/?s=1", "Connection: close"))

        def busy() -> dict[str, Any] | None:
            # (until it takes the next connection, the child is busy with the last)
            slots = [s for s in m.status()["slots"]
                     if s["state"] == "busy" and s.get("request") == "GET /slow/?s=1"]
            return slots[0] if slots else None
        assert wait_until(busy, what="the busy slot to show the request")["state_age_s"] >= 0
        assert c.reply().body.startswith(b"done ")


# ================================================================ operability

COMBINED = re.compile(r'(?P<host>\S+) - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                      r'"(?P<line>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-) '
                      r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)"')


def test_access_log_combined_format(pool: Served) -> None:
    """The default format is Apache's combined; %r is the request line as
    the client sent it (even when the app rewrites PATH_INFO, as a mount does)."""
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    ask(pool.port, req("GET", "/hello/a%20b?x=1", "Referer: http://ref.example/",
                       f"User-Agent: {agent}"))
    ask(pool.port, req("HEAD", "/nowhere", f"User-Agent: {agent}"), "HEAD")

    def lines() -> list[str]:
        text = pool.access_log.read_text() if pool.access_log.exists() else ""
        return [x for x in text.splitlines() if agent in x]
    got = wait_until(lambda: (lambda ls: ls if len(ls) == 2 else None)(lines()),
                     what="two access log lines")
    # Two children may write in either order: the line is written after the
    # response went out.
    first, second = sorted((COMBINED.fullmatch(x) for x in got),
                           key=lambda m: m is not None and m.group("line").startswith("HEAD"))
    assert first and second, got
    assert first.group("host") == "127.0.0.1"
    assert first.group("line") == "GET /hello/a%20b?x=1 HTTP/1.1"
    assert (first.group("status"), first.group("size")) == ("200", "13")
    assert (first.group("referer"), first.group("agent")) == ("http://ref.example/", agent)
    assert (second.group("line"), second.group("status")) == ("HEAD /nowhere HTTP/1.1", "404")
    assert (second.group("size"), second.group("referer")) == ("-", "-")


def test_forwarded_headers_from_a_trusted_proxy(pool: Served) -> None:
    """127.0.0.1 is trusted by default: X-Forwarded-For/-Proto are believed
    (the right-most address that is not a trusted proxy is the client)."""
    info = ask(pool.port, req("GET", "/echo/", "X-Forwarded-For: 203.0.113.7",
                              "X-Forwarded-Proto: https")).json()
    assert (info["REMOTE_ADDR"], info["wsgi.url_scheme"]) == ("203.0.113.7", "https")
    info = ask(pool.port, req("GET", "/echo/", "X-Forwarded-For: 198.51.100.9, 203.0.113.7, "
                              "127.0.0.1")).json()
    assert (info["REMOTE_ADDR"], info["wsgi.url_scheme"]) == ("203.0.113.7", "http")


def test_custom_access_log_and_untrusted_proxy(start_master: Callable[..., Master]) -> None:
    """--access-log - with a format of its own (%D: microseconds), and
    --forwarded-allow-ips naming someone else: X-Forwarded-* are ignored."""
    fmt = "ACCESS %h %>s %b %D %m %U%q %H %{X-Trace}i %{Content-Type}o %P"
    m = start_master(wsgi="wsgi_apps:router", **POOL, access_log="-", access_log_format=fmt,
                     forwarded_allow_ips="10.0.0.1", env=STRICT_ENV)
    m.wait_ready()
    trace = uuid.uuid4().hex[:8]
    info = ask(m.port, req("GET", "/echo/", "X-Forwarded-For: 203.0.113.7",
                           "X-Forwarded-Proto: https", f"X-Trace: {trace}")).json()
    assert (info["REMOTE_ADDR"], info["wsgi.url_scheme"]) == ("127.0.0.1", "http")
    assert ask(m.port, req("GET", "/slow/?s=0.3", f"X-Trace: {trace}")).status == 200
    out = log_has(m, f"/slow/?s=0.3 HTTP/1.1 {trace}")
    got = [x for x in out.splitlines() if x.startswith("ACCESS ") and trace in x]
    assert len(got) == 2, got
    echo, slow = (x.split() for x in got)
    assert echo[1:3] == ["127.0.0.1", "200"] and echo[5:7] == ["GET", "/echo/"]
    assert echo[9] == "application/octet-stream" and int(echo[10]) in m.child_pids()
    assert 300_000 <= int(slow[4]) < 5_000_000, slow     # %D: the 0.3 s the app slept
    assert int(echo[4]) < int(slow[4])


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_access_log_to_a_full_stdout_never_stops_the_pool(tmp_path: Path, kind: str) -> None:
    """--access-log - with stdout a pipe or a socket (the journal's) that
    nobody reads -- a stuck log shipper: lines are dropped, requests served."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    if kind == "pipe":
        read_end, write_end = os.pipe()     # read_end stays open and unread
    else:
        ours, theirs = socket.socketpair()
        read_end, write_end = ours.detach(), theirs.detach()
    log = open(tmp_path / "master.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mps", "serve", "--wsgi", "wsgi_apps:hello",
                             "--bind", f"fd://{listener.fileno()}", "--access-log", "-",
                             "--max-requests=0",    # one child: one "dropping" warning
                             *(f"--{k.replace('_', '-')}={v}" for k, v in ONE_CHILD.items())],
                            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                            stdout=write_end, stderr=log, start_new_session=True, cwd=str(TESTS))
    listener.close()
    os.close(write_end)
    try:
        agent = "A" * 3000      # about 3 KB a line: the 64 KiB pipe is full after ~16
        for i in range(60 if kind == "pipe" else 300):
            with Conn(port, timeout=5) as c:
                try:
                    r = c.send(req("GET", f"/{i}", f"User-Agent: {agent}")).reply()
                except (TimeoutError, socket.timeout):
                    raise AssertionError(f"request {i} got no answer: the pool is stuck on "
                                         f"its access log\n{(tmp_path / 'master.log').read_text()}")
                assert r.body == b"Hello, World!"
        # The log did go there until stdout was full, in whole lines (a
        # socket may take the first part of the line that filled it).
        lines = os.read(read_end, 1 << 22).decode().splitlines()
        whole = [x for x in lines if COMBINED.fullmatch(x)]
        assert len(whole) >= 15 and len(lines) - len(whole) <= (kind == "socket"), lines[-1][:80]
        log_text = (tmp_path / "master.log").read_text()
        assert log_text.count("access log: stdout is full") == 1, log_text     # said once
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        os.close(read_end)
        log.close()


def test_status_shows_the_request_being_served(pool: Served) -> None:
    """`mps status --json`: a busy slot shows its request (method and path,
    bounded) and for how long, as mod_status does."""
    path = "/echo/status-probe-" + "p" * 300
    with Conn(pool.port) as c:
        c.send(req("POST", path, "Content-Length: 10") + b"01234")  # the app waits for 5 more

        def busy() -> dict[str, Any] | None:
            out = run_mps("status", pool.master.status_path, "--json")
            assert out.code == 0, out.err
            slots = [s for s in json.loads(out.out)["slots"]
                     if s["state"] == "busy" and "status-probe" in s.get("request", "")]
            return slots[0] if slots else None
        slot = wait_until(busy, what="the busy slot to show its request")
        assert slot["request"].startswith("POST /echo/status-probe-ppp")
        assert len(slot["request"]) <= 200
        assert slot["state_age_s"] >= 0
        plain = run_mps("status", pool.master.status_path)
        assert "POST /echo/status-probe-" in plain.out
        r = c.send(b"56789").reply()
        assert r.json()["body_len"] == 10


# ================================================================ real clients

@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (apt-get install curl) -- the curl checks did not run")
    return path


def run_curl(curl: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([curl, "-sS", "-v", "--max-time", "10", *args], capture_output=True,
                          timeout=20, check=False)


def test_curl(pool: Served, curl: str) -> None:
    base = url(pool.master, "")
    # keep-alive: two URLs on one connection
    out = run_curl(curl, base + "/pid/", base + "/pid/")
    assert out.returncode == 0, out.stderr
    assert b"Re-using existing connection" in out.stderr or b"Reusing existing" in out.stderr
    # HTTP/1.0
    out = run_curl(curl, "-0", base + "/echo/")
    assert json.loads(out.stdout.split(b"\n")[0])["SERVER_PROTOCOL"] == "HTTP/1.0"
    # a chunked upload with Expect: 100-continue
    out = subprocess.run([curl, "-sS", "-v", "--max-time", "10", "-H", "Transfer-Encoding: chunked",
                          "-H", "Expect: 100-continue", "--data-binary", "@-", base + "/echo/"],
                         input=b"x" * 5000, capture_output=True, timeout=20, check=False)
    assert out.returncode == 0, out.stderr
    assert b"< HTTP/1.1 100 Continue" in out.stderr
    assert json.loads(out.stdout.split(b"\n")[0])["body_len"] == 5000
    # HEAD
    out = run_curl(curl, "-I", base + "/hello/")
    assert out.returncode == 0 and b"Content-Length: 13" in out.stdout


def test_validated_apps_saw_no_violation(pool: Served) -> None:
    """After this module's traffic (and some of its own): no WSGIWarning, and
    no iterable left unclosed (the validator's __del__ says so on stderr)."""
    with Conn(pool.port) as c:
        for data in (req("GET", "/hello/"), req("POST", "/echo/", body=b"x"),
                     req("POST", "/lines/", "Transfer-Encoding: chunked") + chunked(b"a\n"),
                     req("GET", "/closing/?final")):
            assert c.send(data).reply().status == 200
    out = pool.master.output()
    assert "WSGIWarning" not in out
    assert "garbage collected without being closed" not in out
    assert "closed final" in marks(pool.close_mark)


def test_http_date_is_imf_fixdate_whatever_the_instant() -> None:
    import random
    from email.utils import formatdate

    from mps.http.wsgi import http_date
    rng = random.Random(7)
    for t in [0, 784111777, 951782400, 4102444799] + [rng.uniform(0, 4e9) for _ in range(2000)]:
        assert http_date(t).decode() == formatdate(t, usegmt=True)


# ================================================================ the master's warm-up

def test_warm_up_serves_its_own_requests_not_the_apps(tmp_path: Path) -> None:
    """WSGIHandler.mps_warm_up (run by the master before it forks) talks to a
    throwaway handler and app of its own, on the handler's path (C, or
    Python with an access log): every request is answered, the handler's
    app is never called, no access log is opened, the handler's own state
    is untouched."""
    from mps.http.wsgi import WSGIHandler, Options
    called: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        called.append(environ)
        start_response("200 OK", [])
        return [b""]

    log = tmp_path / "access.log"
    for options in (Options(), Options(access_log=str(log))):
        handler = WSGIHandler(app, options)
        assert handler.mps_warm_up() == 3 * WARM_UP_CONNECTIONS
        assert called == []
        assert not log.exists()
        assert handler.server is None and handler.keys == {}


def test_the_masters_warm_up_never_calls_the_app(start_master: Callable[..., Master],
                                                  tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    app = tmp_path / "counted.py"
    app.write_text(
        "import os\n"
        "def app(environ, start_response):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('%d\\n' % os.getpid())\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n")
    m = start_master(wsgi=f"{app}:app", **ONE_CHILD)
    m.wait_ready()
    assert not calls.exists()       # booted, warmed up, forked: no call yet
    with Conn(m.port) as c:
        assert c.send(req("GET", "/", "Connection: close")).reply().body == b"ok"
    assert calls.read_text().split() == [str(pid) for pid in m.child_pids()]
    assert "warm-up failed" not in m.output()
