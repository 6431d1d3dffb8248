"""systemd, natively (issue 9): the notify protocol against a real
NOTIFY_SOCKET datagram socket bound by the test, socket activation through
the real ``systemd-socket-activate``, and several masters on one port
(``--reuse-port``).  Real processes, sockets and signals on 127.0.0.1.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Load, pid_alive, recv_all, run_mps, wait_until

STATUS_LINE = re.compile(r"(\d+) idle, (\d+) busy, (\d+) children \(generation (\d+)\); "
                         r"([\d.]+) connections/s")

#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS), which the socket module lacks.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

APP = '''\
import os
import time
import mps

VERSION = {version!r}
server = mps.Server()


@server.handler
def handle(conn, addr):
    """Line echo, with the version and what the child sees of socket activation."""
    data = b""
    while not data.endswith(b"\\n"):
        chunk = conn.recv(64)
        if not chunk:
            return
        data += chunk
    seen = " ".join(str(os.environ.get(v)) for v in ("LISTEN_FDS", "LISTEN_PID",
                                                      "LISTEN_FDNAMES"))
    conn.sendall(b"%s [%s] %d: %s" % (VERSION.encode(), seen.encode(), os.getpid(), data))


@server.post_fork
def slow_boot(server, worker):
    time.sleep({boot_s!r})     # a child is idle only this long after its fork
'''


def write_app(path: Path, version: str, boot_s: float = 0.0, broken: bool = False) -> str:
    path.write_text(("import no_such_module_on_purpose\n" if broken else "")
                    + APP.format(version=version, boot_s=boot_s))
    return f"{path}:handle"


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hi\n")
        return recv_all(s)


class Notify:
    """The systemd side of sd_notify: a datagram socket, every message kept
    with the (monotonic) time it arrived."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        # Arrival times from the kernel: this thread may be late to read them.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.env = "@" + address[1:].decode() if isinstance(address, bytes) else address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, 64)
            except TimeoutError:
                continue
            late = 0.0
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                    sec, nsec = struct.unpack("ll", value[:16])
                    late = max(0.0, time.time() - (sec + nsec / 1e9))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self.lock:
                self.messages.append((time.monotonic() - late, fields))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(t, f) for t, f in self.messages
                    if key in f and (value is None or f[key] == value)]

    def wait(self, key: str, value: str | None = None, count: int = 1,
             timeout: float = 15.0) -> tuple[float, dict[str, str]]:
        """The ``count``-th message carrying ``key`` (= ``value``)."""
        found = wait_until(lambda: len(self.with_key(key, value)) >= count and
                           self.with_key(key, value)[count - 1], timeout,
                           interval=0.005, what=f"{key}={value or '*'} (#{count})")
        return found  # type: ignore[no-any-return]

    def order(self) -> list[str]:
        """The state changes in the order they came (WATCHDOG and STATUS left out)."""
        with self.lock:
            return [k for _, f in self.messages for k in f
                    if k not in ("WATCHDOG", "STATUS", "MONOTONIC_USEC")]


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Notify]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        assert len(path) < 108, path
        n = Notify(path)
    else:
        n = Notify(f"\0mps-test-notify-{os.getpid()}-{time.monotonic_ns()}".encode())
    yield n
    n.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(str(tmp_path / "notify.sock"))
    yield n
    n.close()


POOL = {"start_servers": 3, "min_spare": 1, "max_spare": 4, "max_children": 8}


# ------------------------------------------------------------ notify


def test_ready_once_start_servers_children_are_idle(start_master, tmp_path, notify):
    # Children need 0.3 s to boot: READY=1 sent at start, before they are
    # idle, would find them still starting.
    app = write_app(tmp_path / "app.py", "v1", boot_s=0.3)
    began = time.monotonic()
    m = start_master(app=app, env={"NOTIFY_SOCKET": notify.env}, **POOL)
    at, ready = notify.wait("READY", "1")
    doc = m.status()
    assert doc["children"]["idle"] >= POOL["start_servers"], doc["children"]
    assert at - began >= 0.3
    status = STATUS_LINE.fullmatch(ready["STATUS"])
    assert status, ready
    assert int(status.group(1)) >= POOL["start_servers"] and status.group(4) == "0"
    assert ask(m.port).startswith(b"v1 ")
    assert len(notify.with_key("READY")) == 1
    assert "STOPPING" not in notify.order() and "RELOADING" not in notify.order()


def test_status_line_and_watchdog_while_serving(start_master, tmp_path, notify_path):
    app = write_app(tmp_path / "app.py", "v1")
    m = start_master(app=app, env={"NOTIFY_SOCKET": notify_path.env,
                                   "WATCHDOG_USEC": "200000"}, **POOL)
    at_ready, _ = notify_path.wait("READY", "1")
    # Connections to count, then the next periodic STATUS= line (every 5 s).
    served = 0
    while time.monotonic() - at_ready < 1.0:
        assert ask(m.port).startswith(b"v1 ")
        served += 1
        time.sleep(0.005)       # a steady trickle, not a CPU hog beside the master
    statuses = len(notify_path.with_key("STATUS"))
    at, msg = notify_path.wait("STATUS", count=statuses + 1, timeout=10)
    line = STATUS_LINE.fullmatch(msg["STATUS"])
    assert line, msg
    idle, busy, total, generation, rate = line.groups()
    assert int(idle) + int(busy) <= int(total) and int(idle) >= POOL["min_spare"]
    assert float(rate) > 0, msg     # `served` connections in the last few seconds
    # WATCHDOG=1 all along, never a gap systemd would punish (WATCHDOG_USEC).
    pets = [t for t, _ in notify_path.with_key("WATCHDOG", "1")]
    gaps = [b - a for a, b in zip(pets, pets[1:])]
    print(f"\nSTATUS={msg['STATUS']!r} after {served} connections; WATCHDOG=1 x{len(pets)}: "
          f"gap median {statistics.median(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms")
    assert pets[0] - at_ready < 0.2 and at - pets[-1] < 0.2
    assert max(gaps) < 0.2
    assert statistics.median(gaps) <= 0.12


def test_no_watchdog_for_another_pid(start_master, tmp_path, notify_path):
    # WATCHDOG_PID names who systemd watches: not this master.
    m = start_master(app=write_app(tmp_path / "app.py", "v1"),
                     env={"NOTIFY_SOCKET": notify_path.env, "WATCHDOG_USEC": "200000",
                          "WATCHDOG_PID": "1"}, **POOL)
    notify_path.wait("READY", "1")
    ask(m.port)
    time.sleep(0.5)     # five watchdog periods: none may come
    assert notify_path.with_key("WATCHDOG") == []


def test_usr2_sends_reloading_then_ready(start_master, tmp_path, notify_path):
    app = tmp_path / "app.py"
    m = start_master(app=write_app(app, "v1"), env={"NOTIFY_SOCKET": notify_path.env,
                                                     "PYTHONDONTWRITEBYTECODE": "1"}, **POOL)
    notify_path.wait("READY", "1")
    # A refused release: RELOADING=1, then READY=1 with the reason (the old code serves).
    write_app(app, "v2", broken=True)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m.signal(signal.SIGUSR2)
    _, reloading = notify_path.wait("RELOADING", "1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    _, refused = notify_path.wait("READY", "1", count=2)
    assert refused["STATUS"].startswith("upgrade refused: cannot import app"), refused
    assert ask(m.port).startswith(b"v1 ")
    # A good one: RELOADING=1, then READY=1 once the new generation serves.
    write_app(app, "v3")
    m.signal(signal.SIGUSR2)
    notify_path.wait("RELOADING", "1", count=2)
    _, ready = notify_path.wait("READY", "1", count=3)
    assert STATUS_LINE.fullmatch(ready["STATUS"]).group(4) == "1"  # type: ignore[union-attr]
    assert m.status()["generation"] == 1
    # An old child retired just as it accepted serves that one connection
    # (it was already in accept()): the new code answers once they are gone.
    wait_until(lambda: ask(m.port).startswith(b"v3 "), 5, what="replies from v3")
    assert notify_path.order() == ["READY", "RELOADING", "READY", "RELOADING", "READY"]


def test_term_sends_stopping(start_master, tmp_path, notify):
    m = start_master(app=write_app(tmp_path / "app.py", "v1"),
                     env={"NOTIFY_SOCKET": notify.env}, **POOL)
    notify.wait("READY", "1")
    m.signal(signal.SIGTERM)
    notify.wait("STOPPING", "1")
    assert m.wait_exit(15) == 0
    assert notify.order() == ["READY", "STOPPING"]


# ------------------------------------------------------ socket activation


TOOL = shutil.which("systemd-socket-activate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(TOOL is None, reason="systemd-socket-activate is missing: "
                                         "apt-get install systemd")
def test_socket_activation_serves_the_passed_socket(tmp_path):
    assert TOOL is not None
    app = tmp_path / "app.py"
    write_app(app, "v1")
    port = free_port()
    status = str(tmp_path / "status.sock")
    log_path = tmp_path / "activated.log"
    args = [TOOL, "-l", f"127.0.0.1:{port}", "--fdname=web", "-E", "PYTHONDONTWRITEBYTECODE=1",
            sys.executable, "-m", "mps", "serve", f"{app}:handle", "--status-socket", status,
            "--start-servers", "2", "--min-spare", "1", "--max-spare", "2",
            "--max-children", "4"]        # no --bind: the passed socket is the listener
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def first_reply() -> bytes | None:
            assert proc.poll() is None, log_path.read_text()
            try:
                return ask(port)    # the first connection makes the tool exec mps
            except ConnectionRefusedError:
                return None         # the tool does not listen yet
        reply = wait_until(first_reply, 15, what="the activated server to answer")
        assert reply.startswith(b"v1 [None None None] "), reply
        output = log_path.read_text()
        assert "socket activation: serving the socket systemd passed (fd 3, 'web')" in output
        doc = run_mps("status", "--json", status)
        assert doc.code == 0, doc
        assert f'"listening": "127.0.0.1:{port}"' in doc.out.replace(",\n", "\n")
        assert f'"pid": {proc.pid}' in doc.out      # the tool exec'd into the master
        # An upgrade keeps the passed socket; the variables stay gone.
        write_app(app, "v2")
        r = run_mps("reload", "--status-socket", status, "--timeout", "30")
        assert r.code == 0, (r, log_path.read_text())
        assert ask(port).startswith(b"v2 [None None None] ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --------------------------------------------------------- reuse-port


def test_two_masters_on_one_port_and_one_stops_under_load(start_master):
    # Hold the port with SO_REUSEPORT without listening: both masters can
    # bind it, nobody else can take it meanwhile, and it gets no connection.
    hold = socket.socket()
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind(("127.0.0.1", 0))
    port = hold.getsockname()[1]
    try:
        a = start_master(app="apps.py:echo", bind=f"127.0.0.1:{port}", reuse_port=True,
                         **POOL)
        b = start_master(app="apps.py:echo", bind=f"127.0.0.1:{port}", reuse_port=True,
                         **POOL)
        a.wait_ready()
        b.wait_ready()
    finally:
        hold.close()
    pids = {a.pid, b.pid}
    with Load(port, threads=4) as load:
        load.wait_for(200)
        served_a = a.status()["totals"]["connections"]
        assert served_a > 0 and b.status()["totals"]["connections"] > 0
        a.signal(signal.SIGTERM)
        assert a.wait_exit(30) == 0
        load.wait_for(200)          # b alone
    print(f"\nreuse-port: {load.ok} connections, slowest connect "
          f"{load.slowest_connect * 1000:.0f} ms across the stop of one master")
    assert load.failed == [] and load.refused == 0
    assert not pid_alive(a.pid) and pid_alive(b.pid) and pids == {a.pid, b.pid}
    assert "listen queue drained" in a.output()
