"""mps.metrics: the Prometheus exposition and the master's /metrics endpoint.

No master runs here.  The exposition is checked with prometheus_client's own
text parser (the spec's reference, not our reading of it); the application's
multiprocess metrics come from real forked processes writing into a real
PROMETHEUS_MULTIPROC_DIR; the server is driven by a real selectors loop on
real 127.0.0.1 sockets, in a thread that times each pass, while the test
plays the clients -- polite and hostile -- with deadlines, never sleeps.
"""
from __future__ import annotations

import http.client
import os
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from mps import __version__, metrics, status
from mps.arbiter import Totals
from mps.config import Settings
from mps.metrics import METRICS, Metric, MetricsServer
from mps.scoreboard import PyScoreboard
from mps.upgrade import Progress

# ------------------------------------------------------------- exposition

SAMPLE_DOC: dict[str, Any] = {
    "pid": 4242, "backend": "c", "uptime_s": 3600.25, "listening": "127.0.0.1:8000",
    "stopping": None, "generation": 3,
    "settings": {"max_children": 48, "backlog": 2048},
    "children": {"total": 9, "idle": 4, "busy": 3, "starting": 1, "exiting": 1},
    "idle_counter": 4,
    "totals": {"connections": 123456, "requests": 234567, "spawned": 60, "reaped": 51,
               "crashed": 2, "recycled": 40, "retired": 8, "timed_out": 1,
               "max_children_reached": 5, "lock_holders_killed": 1, "counter_repairs": 7},
    "busy_s": 987.5,
    "upgrade": {}, "old_generation": [], "slots": [], "scoreboard": "",
}

#: What the parser must find for SAMPLE_DOC with ready=True, depth 17, limit 2048:
#: (sample name, labels) -> value.  Written out by hand, not derived from METRICS.
EXPECTED = {
    ("mps_children", (("state", "idle"),)): 4,
    ("mps_children", (("state", "busy"),)): 3,
    ("mps_children", (("state", "starting"),)): 1,
    ("mps_children", (("state", "exiting"),)): 1,
    ("mps_idle_counter", ()): 4,
    ("mps_max_children", ()): 48,
    ("mps_connections_total", ()): 123456,
    ("mps_requests_total", ()): 234567,
    ("mps_busy_seconds_total", ()): 987.5,
    ("mps_children_spawned_total", ()): 60,
    ("mps_children_reaped_total", ()): 51,
    ("mps_children_crashed_total", ()): 2,
    ("mps_children_recycled_total", ()): 40,
    ("mps_children_retired_total", ()): 8,
    ("mps_children_timed_out_total", ()): 1,
    ("mps_max_children_reached_total", ()): 5,
    ("mps_counter_repairs_total", ()): 7,
    ("mps_lock_holders_killed_total", ()): 1,
    ("mps_listen_queue_depth", ()): 17,
    ("mps_listen_queue_limit", ()): 2048,
    ("mps_generation", ()): 3,
    ("mps_uptime_seconds", ()): 3600.25,
    ("mps_ready", ()): 1,
    ("mps_build_info", (("backend", "c"), ("version", __version__))): 1,
}


def parse(text: bytes) -> dict[str, Any]:
    """Metric families by name, as prometheus_client's parser reads them."""
    return {f.name: f for f in text_string_to_metric_families(text.decode("utf-8"))}


def samples(families: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values() for s in f.samples}


def own(doc: dict[str, Any], ready: bool = True) -> bytes:
    return metrics.exposition(doc, ready=ready, queue_depth=17, queue_limit=2048, app=False)


def family_name(m: Metric) -> str:
    """The parser names a counter's family without its _total."""
    return m.name[:-len("_total")] if m.type == "counter" else m.name


def test_every_metric_is_exposed_with_its_type_and_value() -> None:
    families = parse(own(SAMPLE_DOC))
    assert set(families) == {family_name(m) for m in METRICS}
    for m in METRICS:
        assert families[family_name(m)].type == m.type, m.name
        assert families[family_name(m)].documentation == m.help, m.name
    assert samples(families) == EXPECTED


def test_ready_gauge_follows_readiness() -> None:
    assert samples(parse(own(SAMPLE_DOC, ready=False)))[("mps_ready", ())] == 0


def test_families_come_from_the_table_in_order_once_each() -> None:
    text = own(SAMPLE_DOC).decode()
    typed = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert typed == [(m.name, m.type) for m in METRICS]
    helped = re.findall(r"^# HELP (\S+) ", text, re.M)
    assert helped == [m.name for m in METRICS]


def test_names_follow_prometheus_conventions() -> None:
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    for m in METRICS:
        assert re.fullmatch(r"mps_[a-z][a-z0-9_]*", m.name), m.name
        assert m.type in ("counter", "gauge"), m.name
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        assert "seconds" not in m.name or m.name.endswith(("_seconds", "_seconds_total"))
        assert m.help and m.help.endswith("."), m.name
    assert {m.name for m in METRICS if "seconds" in m.name} == {
        "mps_busy_seconds_total", "mps_uptime_seconds"}


def test_exposition_of_a_real_status_document() -> None:
    """The document as status.document() builds it from a real scoreboard:
    every key the table names is there, and the children add up."""
    board = PyScoreboard(4)
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        idle, busy = board.reserve(), board.reserve()
        board.started(idle, 1001)
        board.started(busy, 1002)
        board.idle(idle)
        board.idle(busy)
        board.busy(busy)
        board.reserve()          # a third child still STARTING
        source = SimpleNamespace(
            pid=os.getpid(), board=board, listener=listener, settings=Settings(),
            min_spare=1, max_spare=2, started_at=time.monotonic() - 5, stopping="",
            generation=0, progress=Progress(), old=None,
            totals=Totals(spawned=3, timed_out=1))
        doc = status.document(source)
    finally:
        listener.close()
        board.close()
    got = samples(parse(metrics.exposition(doc, ready=True, queue_depth=0,
                                           queue_limit=Settings().backlog, app=False)))
    assert got[("mps_children", (("state", "idle"),))] == 1
    assert got[("mps_children", (("state", "busy"),))] == 1
    assert got[("mps_children", (("state", "starting"),))] == 1
    assert got[("mps_idle_counter", ())] == 1
    assert got[("mps_children_spawned_total", ())] == 3
    assert got[("mps_children_timed_out_total", ())] == 1
    assert got[("mps_build_info", (("backend", "python"), ("version", __version__)))] == 1
    assert got[("mps_max_children", ())] == Settings().max_children
    assert got[("mps_uptime_seconds", ())] >= 5


def test_label_values_and_help_text_are_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    weird = 'a "quoted" \\back\\slash\nand newline'
    monkeypatch.setattr(metrics, "METRICS", METRICS + (
        Metric("mps_test_escapes", "gauge", "help with \\ and\na newline.", "generation"),))
    doc = dict(SAMPLE_DOC, backend=weird)
    text = own(doc)
    assert b"\n" not in text.split(b"mps_build_info{", 1)[1].split(b"}")[0]
    families = parse(text)
    (build,) = families["mps_build_info"].samples
    assert build.labels["backend"] == weird
    assert families["mps_test_escapes"].documentation == "help with \\ and\na newline."


def test_metrics_markdown_covers_every_metric() -> None:
    md = metrics.metrics_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(METRICS)
    for m, row in zip(METRICS, rows):
        assert row.startswith(f"| `{m.name}` | {m.type} |"), row
        assert m.help in row
        for label in m.labels:
            assert f"`{label}`" in row


# -------------------------------------------- the application's own metrics

def fork_app_child(hits: int) -> int:
    """A forked 'child' that counts ``hits`` in prometheus_client's
    multiprocess mode (as an app in an mps child would), then exits."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        from prometheus_client import Counter, Gauge, values
        # The mode is chosen at import from the environment; this process
        # imported prometheus_client before the test set it.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        Counter("app_hits", "Hits served.", registry=None).inc(hits)
        Gauge("app_in_flight", "Requests in flight.", registry=None,
              multiprocess_mode="livesum").set(hits)
        code = 0
    finally:
        os._exit(code)      # never return into pytest's frames


def reap(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status_ = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status_) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"app child {pid} did not exit")


def test_app_multiprocess_metrics_are_aggregated_and_dead_children_marked(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    first, second = fork_app_child(1), fork_app_child(2)
    reap(first)
    reap(second)
    assert metrics.app_metrics_dir() == str(tmp_path)

    got = samples(parse(metrics.exposition(SAMPLE_DOC, ready=True, queue_depth=0,
                                           queue_limit=1)))
    assert got[("app_hits_total", ())] == 3
    assert got[("app_in_flight", ())] == 3
    assert got[("mps_connections_total", ())] == 123456      # mps's own are still there

    metrics.mark_dead(first)
    got = samples(parse(metrics.exposition(SAMPLE_DOC, ready=True, queue_depth=0,
                                           queue_limit=1)))
    assert got[("app_in_flight", ())] == 2     # the dead child's live gauge is gone
    assert got[("app_hits_total", ())] == 3    # its counts stay: totals never go back


def test_no_app_metrics_without_the_environment_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    assert metrics.app_metrics_dir() is None
    assert metrics.app_metrics() == b""
    assert metrics.exposition(SAMPLE_DOC, ready=True, queue_depth=17,
                              queue_limit=2048) == own(SAMPLE_DOC)
    metrics.mark_dead(12345)     # nothing to do, nothing raised


def test_without_prometheus_client_only_mps_metrics_are_served(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)   # import now raises ImportError
    (tmp_path / "gauge_livesum_12345.db").write_bytes(b"")
    assert metrics.app_metrics_dir() is None
    assert metrics.exposition(SAMPLE_DOC, ready=True, queue_depth=17,
                              queue_limit=2048) == own(SAMPLE_DOC)
    metrics.mark_dead(12345)
    assert (tmp_path / "gauge_livesum_12345.db").exists()   # untouched


def test_unreadable_multiproc_dir_is_logged_and_left_out(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path / "missing"))
    text = metrics.exposition(SAMPLE_DOC, ready=True, queue_depth=17, queue_limit=2048)
    assert text == own(SAMPLE_DOC)
    assert "left out of /metrics" in caplog.text and "missing" in caplog.text


# ------------------------------------------------------------- the server

BODY = b"# mps test exposition\nmps_up 1\n"


class Loop:
    """The master's loop in miniature, in a thread: select, dispatch to the
    server, expire.  It records the longest pass (the work after select()
    returns): a server that blocked would show here."""

    def __init__(self, server: MetricsServer, selector: selectors.BaseSelector) -> None:
        self.server, self.selector = server, selector
        self.longest = 0.0
        self.passes = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                events = self.selector.select(0.02)
                began = time.monotonic()
                for key, mask in events:
                    assert key.data is self.server
                    self.server.handle(key.fileobj, mask)
                self.server.expire(time.monotonic())
                self.longest = max(self.longest, time.monotonic() - began)
                self.passes += 1
        except BaseException as exc:     # surfaced by the fixture
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the loop did not stop"


class Served:
    """A MetricsServer on 127.0.0.1, its loop, and the callbacks' state."""

    def __init__(self, **kw: Any) -> None:
        self.body = kw.pop("body", BODY)
        self.ready = True
        self.fail = False
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.server = MetricsServer(listener, self.selector, self.render, lambda: self.ready,
                                    **kw)
        self.loop = Loop(self.server, self.selector)

    def render(self) -> bytes:
        if self.fail:
            raise RuntimeError("render failed")
        body: bytes = self.body
        return body

    def close(self) -> None:
        self.loop.join()
        self.server.close()
        self.selector.close()
        if self.loop.error is not None:
            raise self.loop.error


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(**kw: Any) -> Served:
        made.append(Served(**kw))
        return made[-1]

    yield make
    for served in made:
        served.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def connect(port: int, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything until EOF, and the error that ended it instead (a reset)."""
    chunks: list[bytes] = []
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return b"".join(chunks), None
            chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return b"".join(chunks), exc


def test_metrics_endpoint_serves_the_exposition(serve: Callable[..., Served]) -> None:
    body = own(SAMPLE_DOC)
    srv = serve(body=body)
    code, headers, got = get(srv.port, "/metrics")
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert got == body
    assert samples(parse(got)) == EXPECTED
    assert get(srv.port, "/metrics?name[]=mps_ready")[0] == 200


def test_ready_answers_200_then_503(serve: Callable[..., Served]) -> None:
    srv = serve()
    assert get(srv.port, "/ready")[::2] == (200, b"ready\n")
    srv.ready = False
    assert get(srv.port, "/ready")[::2] == (503, b"not ready\n")
    srv.ready = True
    assert get(srv.port, "/ready")[0] == 200


def test_live_answers_200_even_when_not_ready(serve: Callable[..., Served]) -> None:
    srv = serve()
    srv.ready = False
    assert get(srv.port, "/live")[::2] == (200, b"live\n")


def test_unknown_path_is_404(serve: Callable[..., Served]) -> None:
    srv = serve()
    for path in ("/", "/metricsx", "/ready/", "/status"):
        assert get(srv.port, path)[0] == 404, path


def test_other_methods_are_405(serve: Callable[..., Served]) -> None:
    srv = serve()
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        code, headers, _ = get(srv.port, "/metrics", method)
        assert code == 405, method
        assert headers["allow"] == "GET, HEAD"


def test_head_is_answered_without_body(serve: Callable[..., Served]) -> None:
    srv = serve()
    code, headers, body = get(srv.port, "/metrics", "HEAD")
    assert (code, body) == (200, b"")
    assert int(headers["content-length"]) == len(BODY)


def test_malformed_request_is_400(serve: Callable[..., Served]) -> None:
    srv = serve()
    for raw in (b"garbage\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
                b"G\x00T /metrics HTTP/1.0\r\n\r\n"):
        with connect(srv.port) as sock:
            sock.sendall(raw)
            got, err = read_all(sock)
        assert err is None and got.startswith(b"HTTP/1.0 400 "), raw


def test_head_split_across_many_sends_is_served(serve: Callable[..., Served]) -> None:
    srv = serve()
    raw = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(srv.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(raw) - 1):
            sock.sendall(raw[i:i + 1])
        wait_until(lambda: any(len(c.head) == len(raw) - 1 for c in srv.server.clients.values()),
                   timeout=5, what="the server to have read all but the last byte")
        sock.sendall(raw[-1:])
        got, _ = read_all(sock)
    assert got.startswith(b"HTTP/1.0 200 ") and got.endswith(b"\r\n\r\nready\n")


def test_render_failure_is_500_and_the_loop_goes_on(
        serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    srv = serve()
    srv.fail = True
    assert get(srv.port, "/metrics")[0] == 500
    assert "rendering /metrics failed" in caplog.text
    srv.fail = False
    assert get(srv.port, "/metrics")[::2] == (200, BODY)


def test_hostile_clients_never_stall_the_loop(serve: Callable[..., Served]) -> None:
    """A client that never sends, one that sends a megabyte of header, and one
    that never reads a large answer, all at once: every other client is
    answered meanwhile, no pass of the loop takes long, and each hostile
    client is closed (the last two long before their deadline would matter
    to anyone else)."""
    big = b"# " + b"x" * (16 << 20) + b"\n"
    srv = serve(body=big, read_s=1.0, send_s=1.0)

    silent = connect(srv.port)

    nonreader = socket.socket()
    nonreader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    nonreader.settimeout(5)
    nonreader.connect(("127.0.0.1", srv.port))
    nonreader.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")

    flood_result: list[Any] = []

    def flood() -> None:
        with connect(srv.port) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * (1 << 20))
                flood_result.append(read_all(sock))
            except OSError as exc:      # reset while still sending
                flood_result.append((b"", exc))

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        # The others are served, the big answer whole, while all that goes on.
        for _ in range(3):
            assert get(srv.port, "/ready")[0] == 200
            assert get(srv.port, "/live")[0] == 200
        code, _, body = get(srv.port, "/metrics")
        assert code == 200 and body == big
    finally:
        flooder.join(10)
    assert not flooder.is_alive()
    got, err = flood_result[0]
    assert got.startswith(b"HTTP/1.0 431 ") or err is not None, (got[:40], err)

    # The silent one and the non-reader are gone once their deadlines pass.
    wait_until(lambda: not srv.server.clients, timeout=10, what="every client closed")
    with silent:
        assert read_all(silent) == (b"", None)
    with nonreader:
        got, err = read_all(nonreader)
    assert got.startswith(b"HTTP/1.0 200 ")
    assert len(got) < len(big), "the non-reader cannot have had it all"
    assert err is not None, "a cut-short answer must end in a reset, not a clean EOF"

    assert srv.loop.longest < 0.5, f"a loop pass took {srv.loop.longest:.3f}s"
    assert srv.loop.passes > 10


def test_oversized_head_is_refused_at_once(serve: Callable[..., Served]) -> None:
    srv = serve(read_s=60.0)
    with connect(srv.port) as sock:
        sock.sendall(b"GET /ready HTTP/1.1\r\nX-Junk: " + b"a" * 5000)
        got, err = read_all(sock)    # well within 5 s: the cap, not the 60 s deadline
    assert got.startswith(b"HTTP/1.0 431 ") or err is not None
    wait_until(lambda: not srv.server.clients, timeout=5, what="the flood client dropped")


def test_idle_clients_are_closed_after_the_deadline(serve: Callable[..., Served]) -> None:
    srv = serve(read_s=0.3)
    began = time.monotonic()
    silent, partial = connect(srv.port), connect(srv.port)
    partial.sendall(b"GET /metr")
    wait_until(lambda: len(srv.server.clients) == 2, timeout=5, what="both clients accepted")
    assert srv.server.next_deadline() is not None
    with silent, partial:
        assert read_all(silent) == (b"", None)
        assert read_all(partial) == (b"", None)
    assert 0.3 <= time.monotonic() - began < 5
    wait_until(lambda: not srv.server.clients, timeout=5, what="both clients dropped")
    assert srv.server.next_deadline() is None


def test_clients_beyond_the_cap_are_closed_at_once(
        serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    srv = serve(max_clients=4, read_s=60.0)
    held = [connect(srv.port) for _ in range(4)]
    try:
        wait_until(lambda: len(srv.server.clients) == 4, timeout=5, what="four clients held")
        for _ in range(2):
            with connect(srv.port) as extra:
                assert read_all(extra)[0] == b""     # closed long before the 60 s deadline
        assert caplog.text.count("clients at once") == 1      # logged once
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: not srv.server.clients, timeout=5, what="the held clients gone")
    assert get(srv.port, "/live")[0] == 200


def test_fds_and_registrations_follow_the_clients(serve: Callable[..., Served]) -> None:
    srv = serve(read_s=60.0)
    listener = srv.server.listener
    assert srv.server.fds() == [listener.fileno()]
    with connect(srv.port):
        wait_until(lambda: len(srv.server.clients) == 1, timeout=5, what="one client")
        (client,) = srv.server.clients
        assert srv.server.fds() == [listener.fileno(), client.fileno()]
        assert srv.server.wanted_events() == {listener: selectors.EVENT_READ,
                                              client: selectors.EVENT_READ}


def test_close_releases_the_listener_and_clients() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    selector = selectors.DefaultSelector()
    server = MetricsServer(listener, selector, lambda: BODY, lambda: True)
    try:
        with connect(port) as sock:
            deadline = time.monotonic() + 5
            while not server.clients and time.monotonic() < deadline:
                for key, mask in selector.select(0.05):
                    server.handle(key.fileobj, mask)
            assert len(server.clients) == 1
            server.close()
            assert read_all(sock) == (b"", None)
        assert selector.get_map() is not None and len(selector.get_map()) == 0
        assert listener.fileno() == -1
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()
    finally:
        selector.close()
