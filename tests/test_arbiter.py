"""The master and its pool, with real processes, sockets and signals."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from conftest import consistent, pid_alive, recv_all, wait_until

SMALL = {"start_servers": 2, "min_spare": 1, "max_spare": 2, "max_children": 4}


def test_echo_is_the_seeds_handler(start_master, backend):
    m = start_master(backend=backend, **SMALL)
    doc = m.wait_ready()
    assert doc["backend"] == backend
    reply = m.echo(b"hello")
    pid, _, data = reply.partition(b": ")
    assert data == b"hello"
    assert int(pid) in m.child_pids()


def test_a_handler_may_reply_through_makefile(start_master, backend):
    m = start_master(app="apps.py:filed", backend=backend, **SMALL)
    m.wait_ready()
    with m.connect() as s:
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
    assert reply.startswith(b"filed ")


def test_a_file_the_handler_keeps_keeps_the_connection_open(start_master, backend):
    """After the handler the child closes the connection, as socket.close()
    does: a makefile() file the handler kept holds it open until it closes."""
    m = start_master(app="apps.py:keep_file", backend=backend, start_servers=1, min_spare=1,
                     max_spare=1, max_children=1)
    m.wait_ready()
    with m.connect() as first:
        assert first.recv(64) == b"first"
        with m.connect() as second:
            assert second.recv(64) == b"second"
        rest = b""
        while chunk := first.recv(64):
            rest += chunk
    assert rest == b" late"


def test_sigkilled_children_release_their_slots(start_master, backend):
    m = start_master(backend=backend, **SMALL)
    m.wait_ready()
    victims = sorted(m.child_pids())
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # (They die young without serving, so the master backs off before forking.)
    doc = wait_until(lambda: (d := consistent(m)) and d["children"]["idle"] >= 1
                     and not (m.child_pids() & set(victims)) and d,
                     what="replacements and a consistent scoreboard")
    assert doc["totals"]["crashed"] >= len(victims)
    assert doc["totals"]["reaped"] >= len(victims)
    assert m.echo(b"after").endswith(b": after")
    assert "before serving anything" in m.output()


def test_burst_spawns_on_demand_and_surplus_is_retired(start_master, backend):
    m = start_master(app="apps.py:hold", backend=backend)      # the seed's pool: 32 children
    m.wait_ready(idle=32)
    clients = []
    try:
        for _ in range(64):
            clients.append(m.connect())
        pids = {int(s.recv(64)) for s in clients}       # each reply comes from an accepted child
        assert len(pids) == 64
        doc = m.status()
        assert doc["children"]["busy"] == 64
        assert doc["totals"]["max_children_reached"] >= 1
    finally:
        for s in clients:
            s.close()
    doc = wait_until(lambda: (d := consistent(m)) and d["children"]["total"] <= 32 and d,
                     timeout=40, what="the surplus above max_spare to be retired")
    assert doc["children"]["idle"] == 32
    assert doc["totals"]["retired"] >= 32
    assert doc["totals"]["crashed"] == 0
    assert "reached max_children (64); consider raising it" in m.output()


def test_children_recycle_after_max_requests_with_jitter(start_master, backend):
    m = start_master(app="apps.py:count_pid", backend=backend, max_requests=3,
                     max_requests_jitter=2, **SMALL)
    m.wait_ready()
    served: Counter[int] = Counter()
    for _ in range(60):
        with m.connect() as s:
            served[int(recv_all(s))] += 1
    doc = wait_until(lambda: consistent(m), what="a consistent scoreboard")
    gone = [pid for pid in served if not pid_alive(pid)]
    assert len(gone) >= 8
    assert all(3 <= served[pid] <= 5 for pid in gone), served
    assert len({served[pid] for pid in gone}) > 1, "jitter should vary the limits"
    assert doc["totals"]["recycled"] >= len(gone) - 1
    assert doc["totals"]["crashed"] == 0


def test_timeout_kills_a_hung_handler(start_master, backend):
    m = start_master(app="apps.py:boom", backend=backend, timeout=1, **SMALL)
    m.wait_ready()
    with m.connect() as s:
        s.sendall(b"hang")
        assert recv_all(s) == b""       # the master killed the child: EOF, not a hang
    doc = wait_until(lambda: (d := consistent(m)) and d["totals"]["timed_out"] == 1 and d,
                     what="timed_out to be counted")
    assert doc["totals"]["crashed"] == 0
    assert "exceeded timeout" in m.output()
    assert m.echo(b"next").endswith(b": next")


def test_timeout_reclaims_a_stopped_child(start_master):
    m = start_master(app="apps.py:hold", timeout=1, **SMALL)
    m.wait_ready()
    with m.connect() as s:
        pid = int(s.recv(64))
        os.kill(pid, signal.SIGSTOP)    # hung so hard that no Python runs
        wait_until(lambda: not pid_alive(pid), what="the stopped child to be killed")
    doc = wait_until(lambda: consistent(m), what="a consistent scoreboard")
    assert doc["totals"]["timed_out"] == 1


def test_graceful_stop_finishes_in_flight_connection(start_master, backend):
    m = start_master(app="apps.py:slow", backend=backend, **SMALL)
    m.wait_ready()
    children = m.child_pids()
    with m.connect() as s:
        s.sendall(b"1.0")
        wait_until(lambda: m.status()["children"]["busy"] == 1, what="the child to be busy")
        m.signal(signal.SIGTERM)
        assert recv_all(s).startswith(b"done ")
    assert m.wait_exit() == 0
    wait_until(lambda: not any(pid_alive(p) for p in children), what="children to exit")
    assert not os.path.exists(m.status_path)


def test_graceful_timeout_kills_stragglers(start_master):
    m = start_master(app="apps.py:slow", graceful_timeout=0.5, **SMALL)
    m.wait_ready()
    children = m.child_pids()
    with m.connect() as s:
        s.sendall(b"60")
        wait_until(lambda: m.status()["children"]["busy"] == 1, what="the child to be busy")
        m.signal(signal.SIGTERM)
        assert m.wait_exit(timeout=10) == 0
        assert recv_all(s) == b""
    wait_until(lambda: not any(pid_alive(p) for p in children), what="children to die")
    assert "graceful_timeout (0.5s) expired" in m.output()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop(start_master, sig):
    m = start_master(app="apps.py:hold", **SMALL)
    m.wait_ready()
    children = m.child_pids()
    with m.connect() as s:
        s.recv(64)
        m.signal(sig)
        assert m.wait_exit(timeout=5) == 0
    wait_until(lambda: not any(pid_alive(p) for p in children), timeout=3, what="children to die")


def test_hup_replaces_every_child_while_serving(start_master, backend):
    m = start_master(backend=backend, **SMALL)
    m.wait_ready()
    old = m.child_pids()
    failures: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                assert m.echo(b"x", timeout=5).endswith(b": x")
                served[0] += 1
            except BaseException as exc:     # noqa: BLE001 - counted, then reported
                failures.append(exc)

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_until(lambda: served[0] >= 20, what="load to flow")
        m.signal(signal.SIGHUP)
        wait_until(lambda: (d := m.try_status()) and d["generation"] == 1
                   and not (m.child_pids() & old) and consistent(m),
                   what="every old child to be replaced")
        before = served[0]
        wait_until(lambda: served[0] >= before + 20, what="load to flow after the rotation")
    finally:
        stop.set()
        t.join(30)
    assert failures == []
    assert m.proc.poll() is None


def test_master_sigkill_leaves_no_children(start_master, backend):
    m = start_master(app="apps.py:hold", backend=backend, **SMALL)
    m.wait_ready()
    children = m.child_pids()
    assert children
    with m.connect() as s:
        s.recv(64)              # one child busy too
        os.kill(m.pid, signal.SIGKILL)
        m.wait_exit()
        wait_until(lambda: not any(pid_alive(p) for p in children), timeout=3,
                   what="orphaned children to exit")


def test_ttin_ttou_move_the_spare_bounds(start_master):
    m = start_master(**SMALL)
    m.wait_ready()
    m.signal(signal.SIGTTIN)
    doc = wait_until(lambda: (d := m.status())["settings"]["min_spare"] == 2 and d,
                     what="TTIN to apply")
    assert doc["settings"]["max_spare"] == 3
    wait_until(lambda: m.status()["children"]["idle"] >= 2, what="the pool to grow")
    m.signal(signal.SIGTTOU)        # one at a time: the kernel merges pending signals
    wait_until(lambda: m.status()["settings"]["min_spare"] == 1, what="the first TTOU")
    m.signal(signal.SIGTTOU)
    doc = wait_until(lambda: (d := m.status())["settings"]["min_spare"] == 0 and d,
                     what="TTOU to apply")
    assert doc["settings"]["max_spare"] == 1


def test_handler_exception_is_logged_and_child_goes_on(start_master, backend):
    m = start_master(app="apps.py:boom", backend=backend, start_servers=1, min_spare=1,
                     max_spare=1, max_children=1)
    m.wait_ready()
    (child,) = m.child_pids()
    with m.connect() as s:
        s.sendall(b"raise")
        assert recv_all(s) == b""       # mps closed the connection for the handler
    assert m.echo(b"ok") == b"%d: ok" % child
    out = m.output()
    assert "RuntimeError: handler failure on purpose" in out
    assert "Traceback" in out
    assert m.status()["totals"]["crashed"] == 0


@pytest.mark.parametrize("request_", [b"exit", b"segv"])
def test_handler_killing_its_child_costs_one_connection(start_master, request_):
    m = start_master(app="apps.py:boom", **SMALL)
    m.wait_ready()
    with m.connect() as s:
        s.sendall(request_)
        assert recv_all(s) == b""
    doc = wait_until(lambda: (d := consistent(m)) and d["totals"]["crashed"] == 1 and d,
                     what="the crash to be counted and repaired")
    assert doc["children"]["idle"] >= 1
    assert m.echo(b"fine").endswith(b": fine")


def test_children_that_cannot_boot_stop_the_master_with_3(start_master):
    m = start_master(app="apps.py:cannot_boot", **SMALL)
    assert m.wait_exit(timeout=20) == 3
    out = m.output()
    assert "children cannot boot" in out
    assert "database unreachable (on purpose)" in out


def test_socketserver_request_handler_works_unchanged(start_master):
    m = start_master(app="apps.py:EchoRequestHandler", **SMALL)
    m.wait_ready()
    assert m.echo(b"hi").startswith(b"socketserver ")


def test_hooks_run(start_master, tmp_path):
    hook_log = tmp_path / "hooks.log"
    m = start_master(app="apps.py:hooked", env={"MPS_TEST_HOOK_LOG": str(hook_log)})
    m.wait_ready()
    doc = m.status()
    assert doc["settings"]["max_children"] == 4     # from the Server's keywords
    (victim, *_) = m.child_pids()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: hook_log.exists() and f"child_exit {victim}" in hook_log.read_text(),
               what="child_exit to run")


def test_status_socket_is_private_and_never_stalls_the_master(start_master):
    m = start_master(**SMALL)
    m.wait_ready()
    assert os.stat(m.status_path).st_mode & 0o777 == 0o600
    silent = []
    try:
        for _ in range(50):     # clients that connect and never read
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(m.status_path)
            try:
                s.sendall(b"garbage\x00\xff" * 10)
            except (BrokenPipeError, ConnectionResetError):
                pass    # the master answered and closed first: what it should do
            silent.append(s)
        victims = m.child_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: consistent(m) and not (m.child_pids() & victims),
                   what="the pool to be repaired while status clients hang")
    finally:
        for s in silent:
            s.close()


def test_unix_socket_bind(start_master, tmp_path):
    path = tmp_path / "app.sock"
    m = start_master(extra_args=["--bind", f"unix:{path}"], **SMALL)
    m.wait_ready()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"unix")
        assert recv_all(s).endswith(b": unix")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert not path.exists()


def test_handlers_get_sockets_without_the_listeners_timeout(start_master, backend):
    # Idle children wake from accept() every second through the listener's
    # SO_RCVTIMEO, which Linux copies into accepted sockets: a client that
    # pauses longer than that must still be served.
    m = start_master(backend=backend, **SMALL)
    m.wait_ready()
    with m.connect() as s:
        time.sleep(1.5)         # the stimulus: a client slower than the wake-up period
        s.sendall(b"late")
        assert recv_all(s).endswith(b": late")


def test_children_hanging_in_boot_are_killed_and_stop_the_master(start_master):
    m = start_master(app="apps.py:hangs_at_boot", timeout=0.5, **SMALL)
    assert m.wait_exit(timeout=30) == 3
    out = m.output()
    assert "has not booted in 0.5s (post_fork hangs?)" in out
    assert "children cannot boot" in out
