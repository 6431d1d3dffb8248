"""Prometheus metrics and the master's tiny HTTP endpoint (``metrics_bind``).

Two halves, both below the arbiter (this module never imports it):

* :func:`exposition` -- mps's own metrics in the Prometheus text format
  0.0.4, made from the status document (:func:`mps.status.document`) plus
  the few values that are not in it (readiness, the listen queue).
  :data:`METRICS` is the one table of names, types and meanings: the
  exposition and the README's reference (:func:`metrics_markdown`) are both
  made from it.  An application using ``prometheus_client``'s multiprocess
  mode (``PROMETHEUS_MULTIPROC_DIR``) gets its aggregated metrics appended;
  :func:`mark_dead` is what the master calls when it reaps a child.
  ``prometheus_client`` is optional (``mps[metrics]``): without it only
  mps's own metrics are served.
* :class:`MetricsServer` -- answers ``GET /metrics``, ``/ready`` and
  ``/live`` from the master's selector loop without ever blocking it: every
  client is bounded in number, in the bytes it may send and in time.  The
  answers come from two callbacks the master hands in; the server knows
  nothing of the pool.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._version import __version__
from .status import STATES

log = logging.getLogger("mps")

#: The environment variable prometheus_client's multiprocess mode reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ----------------------------------------------------------------- the table

@dataclass(frozen=True)
class Metric:
    """One metric family.  ``key`` is where its value sits in the status
    document (dotted path); "" for the few that are computed (labelled
    families, and values the document does not hold)."""

    name: str
    type: str                   # "counter" or "gauge"
    help: str
    key: str = ""
    labels: tuple[str, ...] = ()


def _counter(name: str, key: str, help: str) -> Metric:
    return Metric(name, "counter", help, key)


#: Every metric mps exposes, in exposition order: the single source for the
#: exposition, its HELP/TYPE lines and the README's metrics reference.
METRICS: tuple[Metric, ...] = (
    Metric("mps_children", "gauge",
           "Children by scoreboard state (their sum is the pool's size).", labels=("state",)),
    Metric("mps_idle_counter", "gauge",
           "The scoreboard's idle counter (equals the idle children; a drift is repaired "
           "and counted in mps_counter_repairs_total).", "idle_counter"),
    Metric("mps_max_children", "gauge",
           "The max_children setting: the most children the pool may have.",
           "settings.max_children"),
    _counter("mps_connections_total", "totals.connections",
             "Connections accepted by the children."),
    _counter("mps_requests_total", "totals.requests",
             "HTTP requests begun by the children (WSGI); raw handlers count "
             "connections only."),
    _counter("mps_busy_seconds_total", "busy_s",
             "Seconds children have spent serving connections, summed over all children; "
             "rate() of it is the average number of busy children."),
    _counter("mps_children_spawned_total", "totals.spawned", "Children forked."),
    _counter("mps_children_reaped_total", "totals.reaped", "Children that exited and were reaped."),
    _counter("mps_children_crashed_total", "totals.crashed",
             "Children that died with an error or a signal, or before they could serve."),
    _counter("mps_children_recycled_total", "totals.recycled",
             "Children that left on their own after serving max_requests connections."),
    _counter("mps_children_retired_total", "totals.retired",
             "Children the master retired (surplus idle, reload) that exited cleanly."),
    _counter("mps_children_timed_out_total", "totals.timed_out",
             "Children killed for serving one connection longer than the timeout setting."),
    _counter("mps_max_children_reached_total", "totals.max_children_reached",
             "Times the pool reached max_children while connections still wanted a child "
             "(they wait in the listen queue; counted once per episode)."),
    _counter("mps_counter_repairs_total", "totals.counter_repairs",
             "Scoreboard repairs: idle-counter drift corrected, or a lock recovered from a dead "
             "holder."),
    _counter("mps_lock_holders_killed_total", "totals.lock_holders_killed",
             "Children SIGKILLed because they held the scoreboard lock past lock_timeout "
             "(stopped, not dead)."),
    Metric("mps_listen_queue_depth", "gauge",
           "Connections waiting in the listen queue for a child (TCP listeners; 0 otherwise)."),
    Metric("mps_listen_queue_limit", "gauge",
           "The listen queue's limit (the backlog setting)."),
    Metric("mps_generation", "gauge",
           "Code generation: 0 at start, one more after each successful upgrade (USR2).",
           "generation"),
    Metric("mps_uptime_seconds", "gauge", "Seconds since the master started.", "uptime_s"),
    Metric("mps_ready", "gauge",
           "1 while the pool serves and takes new connections; 0 once a stop or drain has "
           "begun (the /ready endpoint answers 503)."),
    Metric("mps_build_info", "gauge",
           "Always 1; the labels say which mps runs and with which scoreboard backend.",
           labels=("version", "backend")),
)


def metrics_markdown() -> str:
    """The README's metrics reference, generated from :data:`METRICS`."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.type} | {labels} | {m.help} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------- the exposition

_Sample = tuple[Mapping[str, str], float]


def exposition(doc: Mapping[str, Any], *, ready: bool, queue_depth: int, queue_limit: int,
               app: bool = True) -> bytes:
    """The /metrics body: mps's own metrics (from the status document ``doc``
    and the three values it does not hold), then -- unless ``app`` is false
    -- the application's multiprocess metrics (:func:`app_metrics`)."""
    samples = _samples(doc, ready, queue_depth, queue_limit)
    lines = []
    for m in METRICS:
        lines.append(f"# HELP {m.name} {_escape_help(m.help)}")
        lines.append(f"# TYPE {m.name} {m.type}")
        for labels, value in samples[m.name]:
            lines.append(f"{m.name}{_labels(labels)} {_number(value)}")
    own = ("\n".join(lines) + "\n").encode()
    return own + app_metrics() if app else own


def _samples(doc: Mapping[str, Any], ready: bool, queue_depth: int,
             queue_limit: int) -> dict[str, list[_Sample]]:
    """Every family's samples: those with a ``key`` read from the document,
    the others computed here (a KeyError names a family left out)."""
    computed: dict[str, list[_Sample]] = {
        "mps_children": [({"state": s}, doc["children"].get(s, 0)) for s in STATES],
        "mps_listen_queue_depth": [({}, queue_depth)],
        "mps_listen_queue_limit": [({}, queue_limit)],
        "mps_ready": [({}, 1 if ready else 0)],
        "mps_build_info": [({"version": __version__, "backend": str(doc["backend"])}, 1)],
    }
    out = {}
    for m in METRICS:
        out[m.name] = [({}, _lookup(doc, m.key))] if m.key else computed[m.name]
    return out


def _lookup(doc: Mapping[str, Any], key: str) -> float:
    value: Any = doc
    for part in key.split("."):
        value = value[part]
    return float(value) if isinstance(value, float) else int(value)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ------------------------------------------------- the application's metrics

def app_metrics_dir() -> str | None:
    """The multiprocess directory whose metrics /metrics includes: the
    ``PROMETHEUS_MULTIPROC_DIR`` environment variable when it is set and
    ``prometheus_client`` is importable, else None.  The master may call it
    once at start to log what it will serve (and to import prometheus_client
    before the first scrape or reap, not during one)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    try:
        import prometheus_client.multiprocess  # noqa: F401
    except ImportError:
        return None
    return path


def app_metrics() -> bytes:
    """The application's metrics, aggregated over every child's files in the
    multiprocess directory (b"" without one).  A directory that cannot be
    read is logged and left out: /metrics still serves mps's own."""
    path = app_metrics_dir()
    if path is None:
        return b""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    try:
        registry = CollectorRegistry()
        # prometheus_client leaves these two untyped (unused-ignore: once it types them).
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call, unused-ignore]
        return generate_latest(registry)
    except Exception as exc:    # a stray or half-written file must not cost mps's own
        log.warning("application metrics in %s=%s left out of /metrics: %s",
                    MULTIPROC_ENV, path, exc)
        return b""


def mark_dead(pid: int) -> None:
    """The master reaped child ``pid``: drop its live-gauge files (its
    counters stay, so totals never go backwards).  No-op outside
    multiprocess mode or without prometheus_client."""
    path = app_metrics_dir()
    if path is None:
        return
    from prometheus_client.multiprocess import mark_process_dead
    try:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call, unused-ignore]
    except OSError as exc:
        log.warning("cannot mark child %d dead in %s=%s: %s", pid, MULTIPROC_ENV, path,
                    exc.strerror or exc)


# --------------------------------------------------------- the HTTP server

#: Clients served at once; more are accepted and closed at once.
MAX_CLIENTS = 64
#: Longest request head read (request line and headers); longer is 431.
HEAD_LIMIT = 4096
#: Seconds a client has to send its request head; then it is closed.
READ_S = 2.0
#: Seconds a client has to read its whole answer (Prometheus's default
#: scrape timeout); then it is reset, so a partial body reads as an error.
SEND_S = 10.0
#: After accept() fails for lack of descriptors (EMFILE, ENFILE, ENOBUFS),
#: the listener is left out of the loop this long: it stays readable, and a
#: level-triggered loop would otherwise spin on it.
ACCEPT_PAUSE_S = 1.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/\d\.\d\r?")


class _Client:
    """One connection: reading its head, then writing its answer."""

    __slots__ = ("sock", "deadline", "head", "out")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.head = bytearray()
        self.out: memoryview | None = None      # set once answered


class MetricsServer:
    """Serves /metrics, /ready and /live from the master's selector loop.

    The server owns ``listener`` (non-blocking) from construction and keeps
    its own sockets registered in ``selector`` with ``data=self``, so the
    loop dispatches with::

        for key, events in selector.select(timeout):
            if key.data is server:
                server.handle(key.fileobj, events)
        server.expire(time.monotonic())

    and includes :meth:`next_deadline` in its timeout.  Nothing here waits:
    each readiness event costs at most one accept batch, one recv() or one
    send().  A client is closed once answered, once it has sent more than
    ``head_limit`` bytes without ending its head (431), or at its deadline.

    Answers: ``GET /metrics`` -> ``render_metrics()``; ``GET /ready`` -> 200
    or 503 from ``is_ready()``; ``GET /live`` -> 200; another path -> 404;
    another method -> 405.  HEAD is answered like GET, without the body.
    """

    def __init__(self, listener: socket.socket, selector: selectors.BaseSelector,
                 render_metrics: Callable[[], bytes], is_ready: Callable[[], bool], *,
                 max_clients: int = MAX_CLIENTS, head_limit: int = HEAD_LIMIT,
                 read_s: float = READ_S, send_s: float = SEND_S) -> None:
        self.listener = listener
        self.selector = selector
        self.render_metrics = render_metrics
        self.is_ready = is_ready
        self.max_clients = max_clients
        self.head_limit = head_limit
        self.read_s = read_s
        self.send_s = send_s
        self.clients: dict[socket.socket, _Client] = {}
        self.paused_until = 0.0         # accept() ran out of descriptors: listener left out
        self.warned_full = False
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self)

    # ------------------------------------------------------------ the loop

    def fds(self) -> list[int]:
        """Every descriptor the server holds (a forked child must close them:
        a child keeping a client's socket would keep the answer from ending)."""
        return [self.listener.fileno(), *(c.fileno() for c in self.clients)]

    def wanted_events(self) -> dict[socket.socket, int]:
        """What the server keeps registered, and for which events."""
        want = {} if self.paused_until else {self.listener: selectors.EVENT_READ}
        for sock, client in self.clients.items():
            want[sock] = selectors.EVENT_READ if client.out is None else selectors.EVENT_WRITE
        return want

    def handle(self, sock: Any, events: int) -> None:
        """Dispatch one selector event for one of the server's sockets."""
        if events & selectors.EVENT_READ:
            self.on_readable(sock)
        if events & selectors.EVENT_WRITE and sock in self.clients:
            self.on_writable(sock)

    def on_readable(self, sock: socket.socket) -> None:
        if sock is self.listener:
            self.accept()
        elif sock in self.clients:
            self.read(self.clients[sock])

    def on_writable(self, sock: socket.socket) -> None:
        client = self.clients.get(sock)
        if client is not None and client.out is not None:
            self.send(client)

    def next_deadline(self) -> float | None:
        """The monotonic time :meth:`expire` next has work, or None."""
        due = [c.deadline for c in self.clients.values()]
        if self.paused_until:
            due.append(self.paused_until)
        return min(due) if due else None

    def expire(self, now: float) -> None:
        """Close the clients past their deadline; resume accepting after a pause."""
        for client in [c for c in self.clients.values() if now >= c.deadline]:
            if client.out is not None:
                # Reset, not close: a scrape cut short must read as an error,
                # not as a complete exposition.
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.drop(client)
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, self)

    def close(self) -> None:
        """Close every client and the listener (the master is leaving)."""
        for client in list(self.clients.values()):
            self.drop(client)
        if not self.paused_until:
            self.selector.unregister(self.listener)
        self.listener.close()

    # ----------------------------------------------------------- the verbs

    def accept(self) -> None:
        """Take the waiting connections; over the cap, close them at once.
        At most max_clients per call, so a connect flood cannot hold the loop."""
        for _ in range(self.max_clients):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.pause_accepting(exc)
                return
            if len(self.clients) >= self.max_clients:
                if not self.warned_full:
                    log.warning("metrics endpoint: %d clients at once; closing more at once "
                                "(logged once)", self.max_clients)
                    self.warned_full = True
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn] = _Client(conn, time.monotonic() + self.read_s)
            self.selector.register(conn, selectors.EVENT_READ, self)

    def pause_accepting(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.warning("metrics endpoint: accept failed (%s); pausing %gs",
                        exc.strerror, ACCEPT_PAUSE_S)
            self.paused_until = time.monotonic() + ACCEPT_PAUSE_S
            self.selector.unregister(self.listener)
        # Else (ECONNABORTED, EPROTO...): that one connection is gone; go on.

    def read(self, client: _Client) -> None:
        """One recv(); answer once the head is complete or too long."""
        try:
            data = client.sock.recv(self.head_limit + 1 - len(client.head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(client)
            return
        if not data:                # gone before it asked
            self.drop(client)
            return
        client.head += data
        end = _HEAD_END.search(client.head)
        if end is not None:
            self.answer(client, *self.route(bytes(client.head[:end.start()])))
        elif len(client.head) > self.head_limit:
            self.answer(client, 431, b"request head too long\n")

    def route(self, head: bytes) -> tuple[int, bytes, str, bool]:
        """(status, body, content type, send body) for a request head."""
        match = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0])
        if match is None:
            return 400, b"bad request\n", _TEXT, True
        method, path = match.group(1), match.group(2).split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", _TEXT, True
        with_body = method == b"GET"
        if path == b"/metrics":
            try:
                return 200, self.render_metrics(), CONTENT_TYPE, with_body
            except Exception:
                log.exception("metrics endpoint: rendering /metrics failed")
                return 500, b"internal error\n", _TEXT, with_body
        if path == b"/ready":
            if self.is_ready():
                return 200, b"ready\n", _TEXT, with_body
            return 503, b"not ready\n", _TEXT, with_body
        if path == b"/live":
            return 200, b"live\n", _TEXT, with_body
        return 404, b"not found\n", _TEXT, with_body

    def answer(self, client: _Client, status: int, body: bytes, ctype: str = _TEXT,
               with_body: bool = True) -> None:
        """Queue the response, switch the client to writing, send what fits."""
        head = [f"HTTP/1.0 {status} {_REASONS[status]}", f"Content-Type: {ctype}",
                f"Content-Length: {len(body)}", "Connection: close"]
        if status == 405:
            head.append("Allow: GET, HEAD")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        client.out = memoryview(raw + body if with_body else raw)
        client.deadline = time.monotonic() + self.send_s
        self.selector.modify(client.sock, selectors.EVENT_WRITE, self)
        self.send(client)

    def send(self, client: _Client) -> None:
        """One send(); close the client once it has its whole answer."""
        assert client.out is not None
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self.drop(client)

    def drop(self, client: _Client) -> None:
        del self.clients[client.sock]
        self.selector.unregister(client.sock)
        client.sock.close()
