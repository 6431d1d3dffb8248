"""Types of mps.http._speedups (src/_mpshttp.c): the C versions of
mps.http.message's Request and Sink and of three steps of mps.http.wsgi."""
import collections
from collections.abc import Sequence
from typing import Any

import httptools

class Request:
    method: bytes
    url: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: collections.deque[bytes]
    started: float
    content_length: int
    body_size: int
    fields: int
    chunks: int
    framing: int
    keep_alive: bool
    chunked: bool
    expect_continue: bool
    complete: bool
    host: bool
    def __init__(self, started: float) -> None: ...
    def line(self) -> bytes: ...

class Sink:
    parser: httptools.HttpRequestParser | None
    head_bytes: int
    @property
    def ready(self) -> collections.deque[Request]: ...
    @property
    def opened(self) -> float: ...
    @property
    def parsing(self) -> Request | None: ...
    @property
    def last(self) -> Request | None: ...
    def __init__(self, request_line: int, fields: int, field_size: int, max_body: int,
                 opened: float, ready: collections.deque[Any]) -> None: ...
    def on_message_begin(self) -> None: ...
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_message_complete(self) -> None: ...
    def on_chunk_header(self) -> None: ...

def valid(status: object, headers: object) -> bool: ...
def head(status: str, code: int, headers: Sequence[tuple[str, str]], known_length: int,
         is_head: bool, http11: bool, keep: bool,
         date: bytes) -> tuple[bytes, int, bool, bool, bool]: ...
def environ(base: dict[str, Any], method: bytes, target: bytes, version: str,
            headers: list[tuple[bytes, bytes]], keys: dict[bytes, str], extra: tuple[Any, ...],
            input: object) -> dict[str, Any]: ...
def configure(bad_request: type[Exception], uri_too_long: type[Exception],
              headers_too_large: type[Exception], payload_too_large: type[Exception],
              coding: type[Exception], method: type[Exception], version: type[Exception],
              no_body: collections.deque[bytes]) -> None: ...
