"""Handlers used by the tests (imported by the children as tests/apps.py)."""
from __future__ import annotations

import ctypes
import os
import socket
import time
from typing import Any


def echo(conn: socket.socket, addr: Any) -> None:
    conn.sendall(b"%d: %s" % (os.getpid(), conn.recv(128)))


def filed(conn: socket.socket, addr: Any) -> None:
    """Reply through a makefile() file left open: it is flushed as it is freed."""
    f = conn.makefile("wb")
    f.write(b"filed %d" % os.getpid())


_KEPT: list[Any] = []


def keep_file(conn: socket.socket, addr: Any) -> None:
    """The first connection's makefile() file outlives the handler; the next
    connection to this child writes "late" to it and closes it."""
    if _KEPT:
        kept = _KEPT.pop()
        kept.write(b" late")
        kept.close()
        conn.sendall(b"second")
    else:
        kept = conn.makefile("wb")
        _KEPT.append(kept)
        conn.sendall(b"first")


def hold(conn: socket.socket, addr: Any) -> None:
    """Reply with the pid at once, then hold the child until the client closes."""
    conn.sendall(b"%d\n" % os.getpid())
    while conn.recv(1024):
        pass


def slow(conn: socket.socket, addr: Any) -> None:
    """Read a request, wait the number of seconds it names, reply."""
    seconds = float(conn.recv(64) or b"0")
    time.sleep(seconds)
    conn.sendall(b"done %d" % os.getpid())


def inject(what: bytes) -> None:
    """Carry out a fault request: raise, exit, segv or hang; anything else returns."""
    if what == b"raise":
        raise RuntimeError("handler failure on purpose")
    if what == b"exit":
        os._exit(7)
    if what == b"segv":
        ctypes.string_at(0)
    if what == b"hang":
        while True:
            time.sleep(1)


def boom(conn: socket.socket, addr: Any) -> None:
    """Requests decide the failure (see inject); else echo."""
    what = conn.recv(64)
    inject(what)
    conn.sendall(b"%d: %s" % (os.getpid(), what))


def count_pid(conn: socket.socket, addr: Any) -> None:
    conn.sendall(b"%d" % os.getpid())


class Handler:
    """Not callable as a handler: the app error test points at an instance."""


not_callable = Handler()


# --- apps built with the public API ---------------------------------------
import socketserver  # noqa: E402

import mps  # noqa: E402

cannot_boot = mps.Server()


@cannot_boot.handler
def _never(conn: socket.socket, addr: Any) -> None:
    conn.sendall(b"unreachable")


@cannot_boot.post_fork
def _fail_boot(server: mps.Server, worker: Any) -> None:
    raise RuntimeError("database unreachable (on purpose)")


class EchoRequestHandler(socketserver.BaseRequestHandler):
    """Existing socketserver code, moved over unchanged."""

    def handle(self) -> None:
        data = self.request.recv(128)
        self.request.sendall(b"socketserver %d: %s" % (os.getpid(), data))


hooked = mps.Server(start_servers=2, min_spare=1, max_spare=2, max_children=4)
hooked.handler(echo)


@hooked.post_fork
def _post_fork(server: mps.Server, worker: Any) -> None:
    os.environ["MPS_TEST_SLOT"] = str(worker.slot)


@hooked.child_exit
def _child_exit(server: mps.Server, worker: Any) -> None:
    path = os.environ.get("MPS_TEST_HOOK_LOG")
    if path:
        with open(path, "a") as f:
            f.write("child_exit %d\n" % worker.pid)


# --- fault injection -------------------------------------------------------

faulty = mps.Server()
_worker: list[Any] = []


@faulty.post_fork
def _keep_worker(server: mps.Server, worker: Any) -> None:
    _worker.append(worker)


@faulty.handler
def _faulty(conn: socket.socket, addr: Any) -> None:
    """A line-based echo whose requests can inject faults."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            return
        data += chunk
    what = data.strip()
    if what == b"lockdie":           # die holding the scoreboard lock
        _worker[0].board.hold_lock()
        os.kill(os.getpid(), 9)
    if what == b"lockstop":          # stop holding it (SIGSTOP, a debugger, a freezer)
        _worker[0].board.hold_lock()
        os.kill(os.getpid(), 19)
    inject(what)
    if what == b"big":               # a reply far larger than the socket buffers
        conn.sendall(b"x" * (32 << 20))
        return
    conn.sendall(b"%d: %s\n" % (os.getpid(), what))


flaky_fork = mps.Server()
flaky_fork.handler(echo)


@flaky_fork.on_starting
def _break_fork(server: mps.Server) -> None:
    """Make the master's next 4 fork() calls fail as if RLIMIT_NPROC were hit."""
    real_fork = os.fork
    failures = [4]

    def fork() -> int:
        if failures[0] > 0:
            failures[0] -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    os.fork = fork


flaky_midway = mps.Server()
flaky_midway.handler(echo)


@flaky_midway.on_starting
def _break_third_fork(server: mps.Server) -> None:
    """Make the master's third fork() fail, the others work: the first batch
    of children stops part-way."""
    real_fork = os.fork
    calls = [0]

    def fork() -> int:
        calls[0] += 1
        if calls[0] == 3:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    os.fork = fork


hangs_at_boot = mps.Server()
hangs_at_boot.handler(echo)


@hangs_at_boot.post_fork
def _hang(server: mps.Server, worker: Any) -> None:
    while True:             # a database connect with no timeout, say
        time.sleep(1)
