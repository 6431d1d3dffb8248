"""WSGI apps used by the tests, each wrapped in wsgiref.validate.validator
(so any PEP 3333 violation by the server fails the request) unless noted."""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import shift_path_info
from wsgiref.validate import validator

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def _read_body(environ: Environ) -> bytes:
    stream = environ["wsgi.input"]
    return b"".join(iter(lambda: stream.read(8192), b""))


@validator
def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


def hello_raw(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Not validated: the benchmark's hello app, as gunicorn and uWSGI get it."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


@validator
def echo(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Reply with the body read, plus what the environ said."""
    body = _read_body(environ)
    info = {k: v for k, v in environ.items() if isinstance(v, str)}
    info["pid"] = os.getpid()
    info["body_len"] = len(body)
    out = json.dumps(info).encode() + b"\n" + body
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(out)))])
    return [out]


@validator
def lines(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """readline() over the body; a streamed (chunked) reply of the line lengths."""
    stream = environ["wsgi.input"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    out = []
    while True:
        line = stream.readline()
        if not line:
            break
        out.append(b"%d\n" % len(line))
    return iter(out)


@validator
def pid(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    body = b"%d" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@validator
def whoami(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Who served, and whom: "MASTER_PID CHILD_PID REMOTE_ADDR REMOTE_PORT"."""
    body = ("%d %d %s %s" % (os.getppid(), os.getpid(), environ.get("REMOTE_ADDR", "-"),
                             environ.get("REMOTE_PORT", "-"))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@validator
def slow(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Sleep for ?s=SECONDS, then answer with the pid."""
    seconds = float(environ["QUERY_STRING"].partition("s=")[2] or 0)
    time.sleep(seconds)
    body = b"done %d" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def faults(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Not validated (it breaks the rules on purpose): /raise..., /crlf, /nul,
    /write, /short, /gen-raise, /file, /head204, /204-body, /304-body, /badname,
    /bigfile, /file-offset, /wrap-bytesio."""
    path = environ["PATH_INFO"]
    if path.startswith("/raise"):
        raise RuntimeError("app failure on purpose")
    if path == "/crlf":
        start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: owned=1")])
        return [b"never"]
    if path == "/nul":
        start_response("200 OK", [("X-Evil", "a\0b")])
        return [b"never"]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned"]
    if path == "/short":
        start_response("200 OK", [("Content-Length", "100")])
        return [b"only this"]
    if path == "/gen-raise":
        def gen() -> Iterable[bytes]:
            yield b"first part"
            raise RuntimeError("generator failure on purpose")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/file":
        f = open(__file__, "rb")
        start_response("200 OK", [("Content-Type", "text/x-python")])
        return environ["wsgi.file_wrapper"](f, 4096)
    if path == "/head204":
        start_response("204 No Content", [])
        return [b""]
    if path in ("/204-body", "/304-body"):
        status = "204 No Content" if path == "/204-body" else "304 Not Modified"
        start_response(status, [("ETag", '"v1"')])
        return [b"a body where none may be"]
    if path.startswith("/length"):       # /length?VALUE[&VALUE]: Content-Length as given
        lengths = environ["QUERY_STRING"].split("&")
        start_response("200 OK", [("Content-Type", "text/plain")]
                       + [("Content-Length", v) for v in lengths])
        return [b"0123456789"]
    if path == "/own-date":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"),
                                  ("Date", "Sat, 01 Jan 2000 00:00:00 GMT"), ("Server", "myapp")])
        return [b"ok"]
    if path == "/badname":
        start_response("200 OK", [("X Bad", "space in the name")])
        return [b"never"]
    if path == "/bigfile":
        big = tempfile.TemporaryFile()
        big.write(BIG_FILE)
        big.seek(0)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](big)
    if path == "/file-offset":
        f = open(__file__, "rb")
        f.seek(100)
        start_response("200 OK", [("Content-Type", "text/x-python")])
        return environ["wsgi.file_wrapper"](f)
    if path == "/wrap-bytesio":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"from a file without a descriptor"), 8)
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


class Closing:
    """An iterable whose close() appends "closed TAG" to CLOSE_MARK (a file
    path); with ``fail`` its iteration raises after the parts."""

    def __init__(self, parts: list[bytes], tag: str = "", fail: bool = False) -> None:
        self.parts = parts
        self.tag = tag
        self.fail = fail

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts
        if self.fail:
            raise RuntimeError("iteration failure on purpose")

    def close(self) -> None:
        with open(os.environ["CLOSE_MARK"], "a") as f:
            f.write(f"closed {self.tag}\n")


@validator
def closing(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """?TAG: two parts; ?raise-TAG: iteration raises; ?big-TAG: 32 MiB, more
    than loopback buffers hold, so a client that leaves in the middle of it
    is noticed.  close() leaves "closed TAG" in CLOSE_MARK."""
    query = environ["QUERY_STRING"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    if query.startswith("big-"):
        return Closing([b"x" * 65536] * 512, query)
    return Closing([b"a", b"b"], query, fail=query.startswith("raise-"))


@validator
def environ_types(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Each environ key with its type and value (repr for non-plain values);
    the validator's wrappers stand in for wsgi.input and wsgi.errors, so what
    the server gave is reported from inside them."""
    env = dict(environ)
    env["wsgi.input"] = getattr(environ["wsgi.input"], "input", environ["wsgi.input"])
    env["wsgi.errors"] = getattr(environ["wsgi.errors"], "errors", environ["wsgi.errors"])
    info = {k: [type(v).__name__, v if isinstance(v, (str, bool, int)) else repr(v)]
            for k, v in env.items()}
    for key, names in (("wsgi.input", ("read", "readline", "readlines", "__iter__")),
                       ("wsgi.errors", ("write", "writelines", "flush"))):
        info[key].append(all(callable(getattr(env[key], n, None)) for n in names))
    out = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]


@validator
def bounded(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Reads far past the body: what wsgi.input gives must stop at its end."""
    stream = environ["wsgi.input"]
    first = stream.read(1 << 22)
    after = [stream.read(10), stream.readline(), stream.read(1)]
    out = json.dumps({"len": len(first), "head": first[:16].decode("latin-1"),
                      "after": [a.decode("latin-1") for a in after],
                      "terminated": environ.get("wsgi.input_terminated")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]


@validator
def errors(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Writes ?MARK to wsgi.errors three ways."""
    mark = environ["QUERY_STRING"]
    stream = environ["wsgi.errors"]
    stream.write(f"write {mark}\n")
    stream.writelines([f"lines {mark} ", "joined\n"])
    stream.write(f"flushed {mark}")
    stream.flush()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@validator
def exc(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """exc_info semantics: /before replaces the status before anything was
    sent; /after (the head sent) must get the error re-raised; /twice calls
    start_response twice without exc_info."""
    path = environ["PATH_INFO"]
    headers = [("Content-Type", "text/plain")]
    write = start_response("200 OK", headers)
    if path == "/twice":
        start_response("201 Created", headers)
        return [b"never"]
    if path == "/after":
        write(b"partial")
    try:
        raise ValueError("caught by the app on purpose")
    except ValueError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                   ("Retry-After", "1")], sys.exc_info())
    return [b"replaced"]


@validator
def late(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Sends its head (and a first chunk) before it reads the body."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"head first\n")
    return [b"read %d\n" % len(_read_body(environ))]


def router(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Not validated itself (faults breaks the rules on purpose): /NAME/rest
    runs the app NAME with /NAME moved to SCRIPT_NAME, as a WSGI mount does."""
    name = shift_path_info(environ)
    app = ROUTES.get(name or "")
    if app is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "9")])
        return [b"not found"]
    return app(environ, start_response)


#: What /faults/bigfile sends: 3 MiB no two neighbouring KiB of which are alike.
BIG_FILE = b"".join(i.to_bytes(4, "big") * 256 for i in range(3 * 1024))


def create_app() -> Callable[..., Iterable[bytes]]:
    """A factory, as `--wsgi wsgi_apps:create_app()` calls it."""
    return hello


# --- real frameworks ---------------------------------------------------

def _terminated_input(app: Callable[..., Any]) -> Callable[..., Any]:
    """Inside the validator: hand the framework the server's own wsgi.input.
    With wsgi.input_terminated (set by mps) Werkzeug reads it with read() to
    its end, which the validator, older than that extension, refuses."""
    def call(environ: Environ, start_response: StartResponse) -> Any:
        environ["wsgi.input"] = getattr(environ["wsgi.input"], "input", environ["wsgi.input"])
        return app(environ, start_response)
    return call


def flask_app() -> Any:
    from flask import Flask, jsonify, request

    app = Flask("mps-test")

    @app.route("/hello/<name>")
    def greet(name: str) -> str:
        return f"hello {name}"

    @app.route("/json", methods=["POST"])
    def echo_json() -> Any:
        return jsonify(got=request.get_json(), remote=request.remote_addr,
                       scheme=request.scheme)

    @app.route("/boom")
    def boom() -> str:
        raise RuntimeError("flask view failure on purpose")

    return validator(_terminated_input(app))


def falcon_app() -> Any:
    import falcon

    class Things:
        def on_get(self, req: Any, resp: Any, thing: str) -> None:
            resp.media = {"thing": thing, "q": req.get_param("q")}

        def on_post(self, req: Any, resp: Any, thing: str) -> None:
            # bounded_stream believes Content-Length only (a chunked body
            # reads empty there); with wsgi.input_terminated the plain
            # stream ends where the body does.
            stream = req.bounded_stream if req.content_length is not None else req.stream
            resp.media = {"thing": thing, "posted": stream.read().decode()}
            resp.status = falcon.HTTP_201

    app = falcon.App()
    app.add_route("/things/{thing}", Things())
    return validator(_terminated_input(app))


@validator
def cgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The request's CGI keys and scheme as JSON (REMOTE_PORT varies, so it
    is only said to be digits), and which path served it: "c-loop" when
    wsgi.input has no reader (mps.http's C connection loop made it)."""
    inner = getattr(environ["wsgi.input"], "input", environ["wsgi.input"])
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
            "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "wsgi.url_scheme")
    info = {k: environ.get(k) for k in keys}
    info.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
    info["REMOTE_PORT digits"] = environ.get("REMOTE_PORT", "").isdigit()
    info["served by"] = "c-loop" if getattr(inner, "_reader", 0) is None else "python"
    body = json.dumps(info, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "hello": hello, "echo": echo, "lines": lines, "pid": pid, "slow": slow, "faults": faults,
    "closing": closing, "environ": environ_types, "bounded": bounded, "errors": errors,
    "exc": exc, "late": late, "cgi": cgi,
}
