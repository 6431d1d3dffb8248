"""A fleet, tested for real (issue 10): HAProxy in front of three mps instances.

HAProxy runs contrib/haproxy/haproxy.cfg itself -- the shipped example, its
ports taken from the environment -- in mode tcp with ``send-proxy-v2`` and
health checks on each master's ``/ready``.  The masters serve
``wsgi_apps:whoami`` (it answers with the master's pid, the child's, and the
REMOTE_ADDR/REMOTE_PORT it saw) with ``--proxy-protocol``, ``--metrics-bind``
and ``--drain-delay``.  A few client threads send one GET per connection
through HAProxy, each from 127.0.0.2, while the instances are restarted,
upgraded and killed; every request is counted.  The measured numbers are
printed (``pytest -s`` shows them).

The last test needs no HAProxy: /ready and --drain-delay on one master.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Master, pid_alive, recv_all, run_mps, wait_until

HAPROXY = shutil.which("haproxy")
CONFIG = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed: apt-get install haproxy "
                            "(.ci/run installs it when it runs as root)")

CLIENT = "127.0.0.2"        # the clients' address; HAProxy's own is 127.0.0.1
THREADS = 4
DRAIN_DELAY = 1.0
NAMES = ("mps1", "mps2", "mps3")    # the servers of backend "mps" in the config
POOL = dict(start_servers=3, min_spare=2, max_spare=6, max_children=16)
TCP_LISTEN = "0A"          # the st column of /proc/net/tcp
REQUEST = b"GET / HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(port: int, path: str) -> int | None:
    """The status of GET path on 127.0.0.1:port, or None when it cannot connect."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
            head = recv_all(s)
    except OSError:
        return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else None


def server_side_peers(port: int) -> set[str]:
    """The remote addresses of the TCP connections (TIME_WAIT included; not
    the listener) whose local end is 127.0.0.1:port: who really connected."""
    peers = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if int(local.split(":")[1], 16) == port and state != TCP_LISTEN:
                raw = int(remote.split(":")[0], 16).to_bytes(4, "little")
                peers.add(socket.inet_ntoa(raw))
    return peers


# --------------------------------------------------------------- the load


@dataclass(frozen=True)
class Reply:
    began: float
    ended: float
    master: int
    child: int
    remote_addr: str
    remote_port: str
    client_port: int        # the port this client connected from


class FleetLoad:
    """Client threads doing one GET per connection through HAProxy, each from
    CLIENT; every attempt ends in ``replies`` or ``failures``."""

    def __init__(self, port: int, threads: int = THREADS) -> None:
        self.port = port
        self.replies: list[Reply] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> FleetLoad:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.replies) >= 20, what="load to flow through HAProxy")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                reply = self._one(began)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failures.append((began, repr(exc)))
            else:
                with self._lock:
                    self.replies.append(reply)
            self._stop.wait(0.003)      # steady, not flat out: 2 CPUs serve 3 pools and HAProxy

    def _one(self, began: float) -> Reply:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.bind((CLIENT, 0))
            s.connect(("127.0.0.1", self.port))
            client_port = s.getsockname()[1]
            s.sendall(REQUEST)
            data = recv_all(s)
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise ValueError(f"not a 200: {data[:60]!r}")
        master, child, addr, port = body.decode().split()
        return Reply(began, time.monotonic(), int(master), int(child), addr, port, client_port)

    def mark(self) -> tuple[int, int]:
        with self._lock:
            return len(self.replies), len(self.failures)

    def since(self, mark: tuple[int, int]) -> tuple[list[Reply], list[tuple[float, str]]]:
        with self._lock:
            return self.replies[mark[0]:], self.failures[mark[1]:]

    def served_by(self, master: int, after: float,
                  child_not_in: AbstractSet[int] = frozenset()) -> Reply | None:
        """The latest reply from ``master`` to a request begun after ``after``."""
        with self._lock:
            return next((r for r in reversed(self.replies)
                         if r.master == master and r.began > after
                         and r.child not in child_not_in), None)

    def wait_served_by(self, master: int, after: float, what: str,
                       child_not_in: AbstractSet[int] = frozenset()) -> Reply:
        reply: Reply = wait_until(lambda: self.served_by(master, after, child_not_in), 10,
                                  what=what)
        return reply


# --------------------------------------------------------------- HAProxy


class HAProxy:
    """haproxy -db -f contrib/haproxy/haproxy.cfg, its ports from the environment."""

    def __init__(self, tmp: Path, front: int, servers: list[tuple[int, int]]) -> None:
        assert HAPROXY is not None
        self.front = front
        self.stats_path = str(tmp / "haproxy.sock")
        env = {**os.environ, "MPS_HAPROXY_STATS": self.stats_path,
               "MPS_FRONT_BIND": f"127.0.0.1:{front}"}
        for name, (port, metrics) in zip(NAMES, servers):
            env[f"{name.upper()}_PORT"] = str(port)
            env[f"{name.upper()}_METRICS"] = str(metrics)
        self.log_path = tmp / "haproxy.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` for the servers of backend mps: name -> its CSV fields."""
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n{self.output()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.stats_path)
            s.sendall(b"show stat\n")
            lines = recv_all(s).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","))) for line in lines[1:] if line)
        return {r["svname"]: r for r in rows if r["pxname"] == "mps" and r["svname"] in NAMES}

    def try_servers(self) -> dict[str, dict[str, str]] | None:
        try:
            return self.servers()
        except OSError:
            return None

    def status(self, name: str) -> str:
        return self.servers()[name]["status"]

    def wait_status(self, name: str, want: str, timeout: float = 10.0) -> float:
        """Poll until server ``name`` is ``want`` ("UP", "DOWN"); the time seen."""
        wait_until(lambda: self.status(name) == want, timeout, interval=0.01,
                   what=f"HAProxy to see {name} {want}")
        return time.monotonic()

    def went_down(self, name: str) -> int:
        """How many times the checks have taken ``name`` from UP to DOWN."""
        return int(self.servers()[name]["chkdown"])

    def wait_serving(self) -> None:
        def up() -> bool:
            rows = self.try_servers()
            return rows is not None and all(rows[n]["status"] == "UP" for n in NAMES)
        wait_until(up, 15, what=f"HAProxy to see all three servers UP\n{self.output()}")
        wait_until(lambda: http_status(self.front, "/") == 200, 10, what="HAProxy's frontend")

    def kill(self) -> None:
        for kill in (os.kill, os.killpg):       # its pid, then the session it leads
            try:
                kill(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        finally:
            self.log.close()


# --------------------------------------------------------------- the fleet


class Fleet:
    """Three mps masters on ports chosen up front (a restart binds the same
    ones), HAProxy in front of them."""

    def __init__(self, start_master: Callable[..., Master], tmp: Path) -> None:
        ports = free_ports(7)
        self.start_master = start_master
        self.front = ports[0]
        self.addresses = [(ports[1 + 2 * i], ports[2 + 2 * i]) for i in range(3)]
        self.masters = [self.start(i) for i in range(3)]
        self.haproxy = HAProxy(tmp, self.front, self.addresses)

    def start(self, i: int) -> Master:
        port, metrics = self.addresses[i]
        m = self.start_master(wsgi="wsgi_apps:whoami", bind=f"127.0.0.1:{port}",
                              proxy_protocol=True, metrics_bind=f"127.0.0.1:{metrics}",
                              drain_delay=DRAIN_DELAY, **POOL)
        assert m.port == port
        m.wait_ready()
        wait_until(lambda: http_status(metrics, "/ready") == 200, 10, what=f"{NAMES[i]} ready")
        return m

    def restart(self, i: int) -> Master:
        self.masters[i] = self.start(i)
        return self.masters[i]


@pytest.fixture
def fleet(start_master: Callable[..., Master], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(start_master, tmp_path)
    try:
        f.haproxy.wait_serving()
        yield f
    finally:
        f.haproxy.kill()    # the masters (and orphans) go with start_master's teardown


def report(title: str, **numbers: Any) -> None:
    print(f"\n[fleet] {title}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def slowest(replies: list[Reply]) -> str:
    return f"{max((r.ended - r.began for r in replies), default=0.0):.3f}s"


# --------------------------------------------------------------- scenarios


@needs_haproxy
def test_the_example_config_is_valid_as_shipped() -> None:
    # Its defaults (no variable set) make a config HAProxy accepts as it is.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MPS1_", "MPS2_", "MPS3_", "MPS_HAPROXY", "MPS_FRONT"))}
    assert HAPROXY is not None
    done = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr, done.stdout + done.stderr


@needs_haproxy
def test_rolling_restart_fails_no_request(fleet: Fleet) -> None:
    out_after = []
    with FleetLoad(fleet.front) as load:
        mark = load.mark()
        for i, name in enumerate(NAMES):
            old = fleet.masters[i]
            downs = fleet.haproxy.went_down(name)
            term = time.monotonic()
            old.signal(signal.SIGTERM)
            # The drain delay: /ready is 503 at once, and HAProxy takes the
            # instance out while it still serves (before it stops accepting).
            wait_until(lambda: http_status(fleet.addresses[i][1], "/ready") == 503, 5,
                       what=f"{name}'s /ready to turn 503")
            out_after.append(fleet.haproxy.wait_status(name, "DOWN", 5) - term)
            assert old.proc.poll() is None, "the instance stopped before HAProxy took it out"
            assert old.wait_exit(15) == 0, old.output()
            new = fleet.restart(i)
            fleet.haproxy.wait_status(name, "UP")
            load.wait_served_by(new.pid, term, f"requests to reach the new {name}")
            assert fleet.haproxy.went_down(name) == downs + 1
        replies, failures = load.since(mark)
    report("rolling restart", requests=len(replies), failed=len(failures),
           out_of_rotation_after=[f"{t:.3f}s" for t in out_after],
           drain_delay=f"{DRAIN_DELAY}s", slowest=slowest(replies))
    assert failures == []
    assert all(t < DRAIN_DELAY for t in out_after), out_after


@needs_haproxy
def test_rolling_upgrade_fails_no_request(fleet: Fleet) -> None:
    with FleetLoad(fleet.front) as load:
        mark = load.mark()
        for i, name in enumerate(NAMES):
            m = fleet.masters[i]
            before = m.child_pids()
            began = time.monotonic()
            r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
            assert r.code == 0, (r, m.output())
            assert m.status()["generation"] == 1
            fleet.haproxy.wait_status(name, "UP")
            load.wait_served_by(m.pid, began, f"{name}'s new children to serve",
                                child_not_in=before)
        replies, failures = load.since(mark)
        downs = {name: fleet.haproxy.went_down(name) for name in NAMES}
    report("rolling upgrade", requests=len(replies), failed=len(failures),
           taken_out_by_checks=downs, slowest=slowest(replies))
    assert failures == []
    assert {r.master for r in replies} == {m.pid for m in fleet.masters}


@needs_haproxy
def test_a_killed_instance_is_ejected_and_rejoins(fleet: Fleet) -> None:
    victim = fleet.masters[0]
    children = victim.child_pids()
    with FleetLoad(fleet.front) as load:
        load.wait_served_by(victim.pid, 0.0, "requests to reach mps1")
        mark = load.mark()
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        ejected = fleet.haproxy.wait_status("mps1", "DOWN", 5) - killed
        # Its children die with it (PDEATHSIG); then its ports are free again.
        wait_until(lambda: not any(pid_alive(p) for p in children), 10,
                   what="the killed master's children to die")
        # The others take the load meanwhile.
        wait_until(lambda: len(load.since(mark)[0]) >= 50, 10, what="50 requests after the kill")
        new = fleet.restart(0)
        restarted = time.monotonic()
        fleet.haproxy.wait_status("mps1", "UP")
        rejoined = load.wait_served_by(new.pid, restarted, "requests to reach mps1 again")
        replies, failures = load.since(mark)
    last_on_victim = max((r.ended for r in replies if r.master == victim.pid and r.ended > killed),
                         default=killed)
    report("one master SIGKILLed", requests=len(replies), failed=len(failures),
           ejected_by_checks_after=f"{ejected:.3f}s",
           last_reply_from_it_after=f"{last_on_victim - killed:.3f}s",
           rejoined_after_restart=f"{rejoined.ended - restarted:.3f}s", slowest=slowest(replies),
           failures_were=sorted({why for _, why in failures}))
    # Only what was in flight on it fails: each client has one request at a time.
    assert len(failures) <= THREADS, failures
    assert not any(r.master == victim.pid and r.began > killed + ejected for r in replies)


@needs_haproxy
def test_handlers_see_the_clients_address_not_haproxys(fleet: Fleet) -> None:
    with FleetLoad(fleet.front) as load:
        load.wait_served_by(fleet.masters[2].pid, 0.0, "requests to reach mps3")
        replies, failures = load.since((0, 0))
        # Who really connected to the instances: HAProxy, from 127.0.0.1.
        peers = set().union(*(server_side_peers(port) for port, _ in fleet.addresses))
    report("client addresses", requests=len(replies), handlers_saw=sorted(
        {r.remote_addr for r in replies}), instances_connected_from=sorted(peers))
    assert failures == []
    assert peers == {"127.0.0.1"}
    assert {r.master for r in replies} == {m.pid for m in fleet.masters}
    assert all(r.remote_addr == CLIENT and r.remote_port == str(r.client_port)
               for r in replies), [r for r in replies if r.remote_addr != CLIENT][:3]


# --------------------------------------------------------------- no balancer


def test_drain_delay_reports_not_ready_while_serving_then_stops(
        start_master: Callable[..., Master]) -> None:
    (metrics,) = free_ports(1)
    m = start_master(wsgi="wsgi_apps:whoami", bind="127.0.0.1:0",
                     metrics_bind=f"127.0.0.1:{metrics}", drain_delay=DRAIN_DELAY, **POOL)
    m.wait_ready()
    wait_until(lambda: http_status(metrics, "/ready") == 200, 10, what="/ready 200")
    assert http_status(metrics, "/live") == 200
    term = time.monotonic()
    m.signal(signal.SIGTERM)
    wait_until(lambda: http_status(metrics, "/ready") == 503, DRAIN_DELAY / 2,
               interval=0.01, what="/ready 503 soon after TERM")
    # Not ready, still serving: new connections are accepted and answered.
    served = [http_status(m.port, "/") for _ in range(3)]
    still_delaying = m.proc.poll() is None and http_status(metrics, "/ready") == 503
    assert m.wait_exit(15) == 0, m.output()
    stopped_after = time.monotonic() - term
    report("drain delay", served_while_not_ready=served, stopped_after=f"{stopped_after:.3f}s")
    assert served == [200, 200, 200] and still_delaying
    assert stopped_after >= DRAIN_DELAY


def test_a_live_masters_metrics_parse_with_prometheus_client(start_master):
    from prometheus_client.parser import text_string_to_metric_families
    port = free_ports(1)[0]
    m = start_master(app="apps.py:echo", bind="127.0.0.1:0", start_servers=3, min_spare=1,
                     max_spare=3, max_children=6, metrics_bind=f"127.0.0.1:{port}")
    m.wait_ready()
    for i in range(5):
        assert m.echo(b"m%d" % i).endswith(b": m%d" % i)

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, text = get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_state = {s.labels["state"]: s.value for s in families["mps_children"].samples}
    assert by_state["idle"] + by_state["busy"] >= 3
    total = next(s.value for s in families["mps_connections"].samples
                 if s.name == "mps_connections_total")
    assert total >= 5 and families["mps_connections"].type == "counter"
    assert families["mps_ready"].samples[0].value == 1
    assert get("/live")[0] == 200 and get("/ready")[0] == 200
