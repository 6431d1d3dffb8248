"""Shared fixtures: real mps masters on 127.0.0.1 ephemeral ports.

Every master is started in its own session from a socket the test bound
itself (``--bind fd://N``), so the test knows the port before the server
runs, and is killed with its whole process group at teardown even when the
test fails.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mps.scoreboard import c_available

TESTS = Path(__file__).resolve().parent
APPS = TESTS / "apps.py"

_serial = itertools.count()

BACKENDS = ["c", "python"] if c_available() else ["python"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children_of(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``, from /proc."""
    out = set()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = {int(x) for x in f.read().split()}
    except FileNotFoundError:
        return set()
    return {p for p in out if pid_alive(p)}


class Master:
    """One ``mps serve`` process under test."""

    def __init__(self, tmp: Path, app: str, backend: str, settings: dict[str, Any],
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 bind: str | None = None, wsgi: str | None = None) -> None:
        """``bind=None``: the test binds the listener and passes it as fd://N
        (the master treats it as shared and never changes it); otherwise the
        master binds ``bind`` itself (say 127.0.0.1:0) and owns the socket.
        ``wsgi``: serve ``mps serve --wsgi TARGET`` instead of APP."""
        tag = f"{os.getpid()}-{next(_serial)}"
        self.status_path = str(tmp / f"status-{tag}.sock")
        self.log_path = tmp / f"master-{tag}.log"
        pass_fds: list[int] = []
        listener = None
        if bind is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            pass_fds = [listener.fileno()]
            bind = f"fd://{listener.fileno()}"
        elif bind.startswith("fd://"):     # a listener the test keeps (a hand-off)
            pass_fds = [int(bind[5:])]
        target = ["--wsgi", wsgi] if wsgi is not None else [app]
        args = [sys.executable, "-m", "mps", "serve", *target, "--bind", bind,
                "--backend", backend, "--status-socket", self.status_path]
        for name, value in settings.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            else:
                args += [flag, str(value)]
        args += extra_args or []
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})}, cwd=str(TESTS))
        self.pid = self.proc.pid
        if listener is not None:
            self.port = listener.getsockname()[1]
            listener.close()   # the master holds its own copy now
        elif bind.startswith("unix:"):
            self.port = 0
        elif bind.startswith("fd://"):
            with socket.socket(fileno=os.dup(pass_fds[0])) as shared:
                self.port = shared.getsockname()[1]
        else:
            self.port = int(wait_until(self._listening_port, 15, what="the master to listen"))

    def _listening_port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"master exited early ({self.proc.returncode}):\n{self.output()}")
        doc = self.try_status()
        return int(doc["listening"].rsplit(":", 1)[1]) if doc else None

    # -- observing
    def status(self) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.status_path)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        return json.loads(data)

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except (OSError, ValueError):
            return None

    def wait_ready(self, idle: int | None = None, timeout: float = 15.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited early ({self.proc.returncode}):\n{self.output()}")
            doc = self.try_status()
            if doc is None:
                return None
            want = doc["settings"]["min_spare"] if idle is None else idle
            return doc if doc["children"]["idle"] >= want else None
        return wait_until(ready, timeout, what="the pool to be ready")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> set[int]:
        return children_of(self.pid)

    # -- talking
    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def echo(self, payload: bytes = b"hello", timeout: float = 10.0) -> bytes:
        with self.connect(timeout) as s:
            s.sendall(payload)
            return recv_all(s)

    # -- stopping
    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: the master and its whole session, whatever state they are in."""
        pids = self.child_pids()
        for pid in [self.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)     # the session this test created
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="children to die")
        self.log.close()


def consistent(m: Master) -> dict[str, Any] | None:
    """The status document when the scoreboard agrees with /proc, else None:
    idle_counter == idle slots, slot pids == live children, nobody starting."""
    doc = m.try_status()
    if doc is None:
        return None
    idle = sum(1 for s in doc["slots"] if s["state"] == "idle")
    ok = (doc["idle_counter"] == idle == doc["children"]["idle"]
          and {s["pid"] for s in doc["slots"]} == m.child_pids()
          and doc["children"]["starting"] == 0)
    return doc if ok else None


class Load:
    """Steady concurrent line-echo load from a few threads, every attempt classified.

    ``refused``: the connection never started (refused or not accepted in
    time by a server that is stopping).  ``failed``: it started and did not get
    its full reply -- what a fault must keep to the connections it touches.
    """

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = self.refused = 0
        self.slowest_connect = 0.0     # a dropped SYN shows here as >= 1 s
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        wait_until(lambda: self.ok >= 20, what="load to flow")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def wait_for(self, more: int) -> None:
        target = self.ok + more
        wait_until(lambda: self.ok >= target, timeout=20, what=f"{more} more connections")

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                self.slowest_connect = max(self.slowest_connect, time.monotonic() - began)
            except OSError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.01)
                continue
            try:
                with s:
                    s.sendall(b"ping\n")
                    reply = recv_all(s)
                if not reply.endswith(b": ping\n"):
                    raise ValueError(f"bad reply {reply[:40]!r}")
                with self._lock:
                    self.ok += 1
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failed.append(repr(exc))


def recv_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def run_mps(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 30.0) -> Result:
    """Run ``python -m mps ARGS`` to completion; kill its session if it overstays."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MPS_")}
    proc = subprocess.Popen([sys.executable, "-m", "mps", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**clean, **(env or {})}, cwd=str(cwd) if cwd else None,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.returncode is None:     # overstayed (or the test failed): no leftovers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_master(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    """Factory: start_master(app, backend, **settings) -> a running Master;
    ``wsgi="module:app"`` serves ``mps serve --wsgi module:app`` instead of APP."""
    masters: list[Master] = []

    def start(app: str = "mps.examples:echo", backend: str = "auto",
              env: dict[str, str] | None = None, extra_args: list[str] | None = None,
              wsgi: str | None = None, **settings: Any) -> Master:
        bind = settings.pop("bind", None)   # None: an fd:// listener the test made
        m = Master(tmp_path, app, backend, settings, env, extra_args, bind, wsgi)
        masters.append(m)
        return m

    yield start
    for m in masters:
        m.kill_all()
