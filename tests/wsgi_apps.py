"""WSGI apps used by the tests, each wrapped in wsgiref.validate.validator
(so any PEP 3333 violation by the server fails the request) unless noted."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
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
def slow(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Sleep for ?s=SECONDS, then answer with the pid."""
    seconds = float(environ["QUERY_STRING"].partition("s=")[2] or 0)
    time.sleep(seconds)
    body = b"done %d" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def faults(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Not validated (it breaks the rules on purpose): /raise, /crlf, /nul,
    /write, /late, /short, /gen-raise, /file, /noclose."""
    path = environ["PATH_INFO"]
    if path == "/raise":
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
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


class Closing:
    """An iterable whose close() leaves a mark in CLOSE_MARK (a file path)."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterable[bytes]:
        return iter(self.parts)

    def close(self) -> None:
        with open(os.environ["CLOSE_MARK"], "a") as f:
            f.write("closed\n")


@validator
def closing(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing([b"a", b"b"])  # type: ignore[return-value]


def create_app() -> Callable[..., Iterable[bytes]]:
    """A factory, as `--wsgi wsgi_apps:create_app()` calls it."""
    return hello


# --- real frameworks ---------------------------------------------------

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

    return validator(app)


def falcon_app() -> Any:
    import falcon

    class Things:
        def on_get(self, req: Any, resp: Any, thing: str) -> None:
            resp.media = {"thing": thing, "q": req.get_param("q")}

        def on_post(self, req: Any, resp: Any, thing: str) -> None:
            resp.media = {"thing": thing, "posted": req.bounded_stream.read().decode()}
            resp.status = falcon.HTTP_201

    app = falcon.App()
    app.add_route("/things/{thing}", Things())
    return validator(app)
