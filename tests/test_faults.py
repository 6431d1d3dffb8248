"""Fault injection: under a steady concurrent load, a fault costs at most the
connections it touches, and the scoreboard always agrees with /proc."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Load, Master, consistent, pid_alive, recv_all, wait_until

POOL = {"start_servers": 4, "min_spare": 2, "max_spare": 6, "max_children": 12}


def within_bounds(m: Master) -> dict[str, Any] | None:
    doc = consistent(m)
    if doc is None:
        return None
    s, c = doc["settings"], doc["children"]
    ok = c["idle"] >= s["min_spare"] and c["total"] <= s["max_children"]
    return doc if ok else None


def ask(m: Master, request: bytes, timeout: float = 10.0) -> bytes:
    with m.connect(timeout) as s:
        s.sendall(request)
        try:
            return recv_all(s)
        except ConnectionResetError:
            return b""


def test_random_sigkills_cost_only_in_flight_connections(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, max_requests=0, **POOL)
    m.wait_ready()
    rng = random.Random(1234)
    killed: set[int] = set()
    with Load(m.port) as load:
        for _ in range(12):
            pids = wait_until(lambda: sorted(m.child_pids() - killed), what="a child to kill")
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            wait_until(lambda: not pid_alive(victim), what="the victim to die")
            load.wait_for(10)
    kills = len(killed)
    doc = wait_until(lambda: within_bounds(m), what="the pool back within its bounds")
    assert len(load.failed) <= kills, load.failed
    assert doc["totals"]["crashed"] == kills, doc["totals"]
    assert load.ok > 100


def test_child_killed_holding_the_lock_is_repaired_and_counted(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, **POOL)
    m.wait_ready()
    with Load(m.port) as load:
        assert ask(m, b"lockdie\n") == b""
        load.wait_for(50)       # every child still gets the lock
    doc = wait_until(lambda: (d := within_bounds(m)) and d["totals"]["counter_repairs"] >= 1
                     and d, what="the repair to be counted")
    assert load.failed == []
    assert doc["totals"]["crashed"] == 1


def test_child_stopped_holding_the_lock_is_killed_and_the_pool_serves_on(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, **POOL)
    m.wait_ready()
    with Load(m.port) as load:
        stopped = m.connect()
        stopped.sendall(b"lockstop\n")          # the child stops inside the lock
        began = time.monotonic()
        doc = wait_until(lambda: (d := m.try_status()) and d["totals"]["lock_holders_killed"] == 1
                         and d, timeout=10, what="the stopped holder to be killed")
        load.wait_for(50)                       # every child gets the lock again
        recovered = time.monotonic() - began
        assert recovered < 5, recovered
        assert recv_all(stopped) == b""         # its own connection is the only cost
        stopped.close()
    doc = wait_until(lambda: (d := within_bounds(m)) and d["totals"]["counter_repairs"] >= 1
                     and d, what="the repair to be counted")
    assert load.failed == [], load.failed[:5]
    assert doc["totals"]["crashed"] == 0
    assert "has held the scoreboard lock" in m.output()


def test_raising_exiting_segfaulting_and_hanging_handlers(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, timeout=1, **POOL)
    m.wait_ready()
    with Load(m.port) as load:
        for request in (b"raise\n", b"exit\n", b"segv\n", b"hang\n", b"raise\n"):
            assert ask(m, request) == b""
        load.wait_for(50)
    doc = wait_until(lambda: (d := within_bounds(m)) and d["totals"]["timed_out"] == 1 and d,
                     what="the hung child to be killed")
    assert load.failed == []
    assert doc["totals"]["crashed"] == 2    # exit and segv; raise costs no child
    assert m.output().count("RuntimeError: handler failure on purpose") == 2


def test_stopped_children_are_reclaimed_by_timeout(start_master):
    m = start_master(app="apps.py:hold", timeout=1, **POOL)
    m.wait_ready()
    held = []
    try:
        for _ in range(2):
            s = m.connect()
            pid = int(s.recv(64))
            os.kill(pid, signal.SIGSTOP)
            held.append((s, pid))
        for _, pid in held:
            wait_until(lambda: not pid_alive(pid), what="the stopped child to be killed")
    finally:
        for s, _ in held:
            s.close()
    doc = wait_until(lambda: within_bounds(m), what="the pool to recover")
    assert doc["totals"]["timed_out"] == 2


def test_rude_clients_cost_one_connection_each(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, timeout=1, **POOL)
    m.wait_ready()
    with Load(m.port) as load:
        silent = m.connect()                     # connects, sends nothing
        half = m.connect()
        half.sendall(b"pi")                      # half a request, then nothing
        reset = m.connect()
        reset.sendall(b"big\n")                  # then resets mid-reply
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.recv(1024)
        reset.close()
        deaf = m.connect()
        deaf.sendall(b"big\n")                   # never reads the reply
        load.wait_for(50)
        doc = wait_until(lambda: (d := m.status())["totals"]["timed_out"] >= 3 and d,
                         what="the held children to be reclaimed")
        for s in (silent, half, deaf):
            s.close()
        load.wait_for(20)
    assert load.failed == []
    doc = wait_until(lambda: within_bounds(m), what="the pool to recover")
    assert doc["totals"]["crashed"] == 0         # EPIPE/ECONNRESET never kill a child
    assert doc["totals"]["timed_out"] == 3


def test_master_sigkill_takes_every_child_within_a_second(start_master, backend):
    m = start_master(app="apps.py:hold", backend=backend, **POOL)
    m.wait_ready()
    children = m.child_pids()
    with m.connect() as busy:
        busy.recv(64)
        os.kill(m.pid, signal.SIGKILL)
        m.wait_exit()
        start = time.monotonic()
        wait_until(lambda: not any(pid_alive(p) for p in children), timeout=5,
                   what="orphans to exit")
        # A second for the busy child's grace, plus scheduling slack on a
        # loaded 2-core machine.
        assert time.monotonic() - start < 1.5


def test_signal_storm(start_master, backend):
    m = start_master(app="apps.py:faulty", backend=backend, **POOL)
    m.wait_ready()
    rng = random.Random(99)
    storm = [signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD]
    with Load(m.port) as load:
        deadline = time.monotonic() + 3
        sent = 0
        while time.monotonic() < deadline:
            m.signal(rng.choice(storm))
            sent += 1
            time.sleep(0.01)     # ~100 signals a second: pacing the storm, not waiting
        load.wait_for(50)
    assert m.proc.poll() is None
    doc = wait_until(lambda: consistent(m), timeout=20, what="a consistent scoreboard")
    assert doc["generation"] >= 1
    assert load.failed == [], load.failed[:5]
    assert sent > 100


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_graceful_stop_and_rotation_under_load_fail_no_connection(start_master, backend, sig):
    # The master's own listener: an inherited (fd://) one is its owner's to
    # drain (test_stops.py covers that hand-off).
    m = start_master(app="apps.py:faulty", backend=backend, bind="127.0.0.1:0", **POOL)
    m.wait_ready()
    with Load(m.port, threads=6) as load:
        load.wait_for(100)
        m.signal(sig)
        if sig == signal.SIGTERM:
            assert m.wait_exit(timeout=30) == 0
        else:
            wait_until(lambda: (d := m.try_status()) and d["generation"] == 1
                       and consistent(m), what="the rotation")
            load.wait_for(100)
    assert load.failed == [], load.failed[:5]


def test_fork_failure_backs_off_and_recovers(start_master):
    m = start_master(app="apps.py:flaky_fork", **POOL)
    doc = m.wait_ready(timeout=30)
    out = m.output()
    assert out.count("fork failed: Resource temporarily unavailable") == 4
    assert "retrying in 0.8 s" in out            # exponential back-off
    assert m.echo(b"after").endswith(b": after")
    assert doc["totals"]["spawned"] >= POOL["min_spare"]


def test_a_fork_failing_mid_batch_keeps_the_forked_and_frees_the_rest(start_master):
    # The first batch (start_servers 4) forks two children, fails on the
    # third: those two serve, the two slots never forked are released (not
    # left STARTING), and the next pass forks the rest after the back-off.
    m = start_master(app="apps.py:flaky_midway", **{**POOL, "min_spare": 4})
    doc = wait_until(lambda: consistent(m) if m.child_pids() and len(m.child_pids()) >= 4
                     else None, timeout=30, what="four children, the board agreeing")
    assert m.output().count("fork failed: Resource temporarily unavailable") == 1
    assert doc["totals"]["spawned"] == len(m.child_pids()) == 4
    assert m.echo(b"after").endswith(b": after")


def test_status_clients_never_delay_pool_maintenance(start_master):
    m = start_master(**POOL)
    m.wait_ready()
    clients = []
    try:
        for i in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(m.status_path)
            if i % 2:
                try:
                    s.sendall(os.urandom(512))   # garbage
                except (BrokenPipeError, ConnectionResetError):
                    pass    # the master answered and closed first
            clients.append(s)                    # and none of them reads
        victims = m.child_pids()
        start = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(m.child_pids() - victims) >= POOL["min_spare"], timeout=5,
                   what="replacements")
        assert time.monotonic() - start < 2.0
    finally:
        for s in clients:
            s.close()
    assert within_bounds(m) or wait_until(lambda: within_bounds(m), what="the pool")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_loadgen(port: int, conns: int) -> dict[str, Any]:
    from mps.bench import build
    out = subprocess.run([build("loadgen"), "--port", str(port), "--clients", "8",
                          "--seconds", "120", "--max-conns", str(conns)],
                         capture_output=True, text=True, timeout=180, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_master_resources_stay_flat_over_100k_connections(start_master, monkeypatch):
    monkeypatch.setenv("MPS_BENCH_DIR", str(Path(__file__).resolve().parent.parent / "benchmarks"))
    m = start_master(max_requests=100, max_requests_jitter=20, log_level="warning", **POOL)
    m.wait_ready()
    warm = run_loadgen(m.port, 10_000)
    assert warm["errors"] == 0
    wait_until(lambda: within_bounds(m), what="a settled pool")
    fds, rss = fd_count(m.pid), rss_kb(m.pid)
    result = run_loadgen(m.port, 100_000)
    assert result["errors"] == 0 and result["conns"] == 100_000
    doc = wait_until(lambda: within_bounds(m), what="a settled pool")
    assert doc["totals"]["recycled"] >= 500                # hundreds of recycles happened
    assert doc["totals"]["connections"] >= 110_000
    assert fd_count(m.pid) == fds
    assert rss_kb(m.pid) - rss < 2048, "the master's memory grew by more than 2 MiB"
