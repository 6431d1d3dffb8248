"""Deploying new code in place: USR2 / ``mps reload`` (issue 9).

Every test serves an app *file* in tmp_path whose replies carry a version
read at import time; a deploy rewrites the file and asks the master to
upgrade.  The master re-executes itself with the same command line, so the
new image imports the changed file.  Real processes, sockets and signals on
127.0.0.1 throughout.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Load, Master, Result, consistent, pid_alive, recv_all, run_mps, wait_until
from mps.errors import EXIT_BOOT

#: A small pool: upgrades fork and retire every child.
SMALL = {"start_servers": 3, "min_spare": 2, "max_spare": 4, "max_children": 8}
#: A deploy writes a new file of the same size ("v1" -> "v2"), possibly in
#: the second the old one was imported: Python's bytecode cache (keyed by
#: mtime in whole seconds and size) would then serve the old code.  That is
#: Python's cache, not the upgrade, so the tests keep no cache.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}

RAW_APP = '''\
import os
import mps

VERSION = {version!r}
server = mps.Server({keywords})


@server.handler
def handle(conn, addr):
    """Line echo: "VERSION PID: LINE".  "hold" answers, then holds the child
    until the client closes."""
    data = b""
    while not data.endswith(b"\\n"):
        chunk = conn.recv(64)
        if not chunk:
            return
        data += chunk
    conn.sendall(b"%s %d: %s" % (VERSION.encode(), os.getpid(), data))
    if data == b"hold\\n":
        while conn.recv(1024):
            pass


@server.on_starting
def starting(server):
    # The upgrade's check never runs on_starting; the new image does.
    crash = {crash!r}
    if crash and os.path.exists(crash):
        if open(crash).read() == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError("the new image cannot start (on purpose)")
{tail}
'''

WSGI_APP = '''\
import os
from wsgiref.validate import validator

VERSION = {version!r}


@validator
def app(environ, start_response):
    body = b"%s %d\\n" % (VERSION.encode(), os.getpid())
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

BROKEN = {
    # kind: (what the release does wrong, the check's exit status, a word of the reason)
    "import": ("import mps_no_such_module_on_purpose\n", 4, "ModuleNotFoundError"),
    "syntax": ("def broken(:\n", 4, "SyntaxError"),
    "setting": ("", 2, "backlog"),
}


def write_app(path: Path, version: str, keywords: str = "", crash: str = "",
              tail: str = "", head: str = "") -> None:
    path.write_text(head + RAW_APP.format(version=version, keywords=keywords, crash=crash,
                                          tail=tail))


def version_of(m: Master) -> bytes:
    """The version that answers a new connection."""
    with m.connect() as s:
        s.sendall(b"probe\n")
        return recv_all(s).split(b" ", 1)[0]


def wait_for_switch(m: Master, new: bytes, since: float, streak: int = 10,
                    timeout: float = 5.0) -> tuple[float, float]:
    """Probe until ``streak`` connections in a row answer ``new``: (seconds
    from ``since`` to the first new reply, to the end of the old ones)."""
    state = {"run": 0, "first": 0.0, "last_old": since}

    def switched() -> bool:
        now = time.monotonic()
        if version_of(m) == new:
            state["first"] = state["first"] or now
            state["run"] += 1
        else:
            state["run"] = 0
            state["last_old"] = now
        return state["run"] >= streak

    wait_until(switched, timeout, interval=0.005, what=f"replies from {new.decode()}")
    return state["first"] - since, state["last_old"] - since


def serves(m: Master, version: bytes) -> None:
    """New connections get ``version``.  Right after an upgrade is done, an old
    child retired while it was already in accept() may serve one more
    connection with the old code: allowed, briefly."""
    wait_until(lambda: version_of(m) == version, 5, what=f"replies from {version.decode()}")


def upgrade_done(m: Master, serial: int) -> Callable[[], dict[str, Any] | None]:
    def done() -> dict[str, Any] | None:
        if m.proc.poll() is not None:
            raise AssertionError(f"master exited ({m.proc.returncode}):\n{m.output()}")
        doc = m.try_status()
        ok = doc and doc["upgrade"]["serial"] == serial and doc["upgrade"]["state"] == "done"
        return doc if ok else None
    return done


class PidFileWatch:
    """Reads the pid file in a loop: it must always exist and name the master."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> PidFileWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen[self.path.read_text().strip()] += 1
            except OSError as exc:
                self.seen[repr(exc)] += 1
            time.sleep(0.002)


def log_lines(m: Master, needle: str) -> list[str]:
    return [line for line in m.output().splitlines() if needle in line]


def old_generation_left(m: Master) -> dict[str, Any]:
    """The status document once the old generation has left."""
    return wait_until(lambda: (d := m.try_status()) and not d["old_generation"] and d,
                      what="the old generation to leave")


# ------------------------------------------------- a changed release, raw


def test_usr2_serves_the_new_release_with_no_failed_connection(start_master, backend,
                                                              tmp_path):
    app = tmp_path / "app.py"
    pid_file = tmp_path / "mps.pid"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", backend=backend, bind="127.0.0.1:0", env=NO_PYC,
                     pid_file=pid_file, **SMALL)
    m.wait_ready()
    old_children = m.child_pids()
    assert version_of(m) == b"v1"
    with Load(m.port, threads=4) as load, PidFileWatch(pid_file) as watch:
        load.wait_for(50)
        write_app(app, "v2")
        began = time.monotonic()
        m.signal(signal.SIGUSR2)
        first, last_old = wait_for_switch(m, b"v2", began)
        doc = wait_until(upgrade_done(m, 1), what="the upgrade to be done")
        load.wait_for(100)          # served by the new generation only
    print(f"\nUSR2 ({backend}): first new reply after {first * 1000:.0f} ms, last old "
          f"reply {last_old * 1000:.0f} ms after the signal; {load.ok} connections, "
          f"slowest connect {load.slowest_connect * 1000:.1f} ms")
    assert load.failed == [] and load.refused == 0
    assert last_old < 5.0
    # The same master, the same pid file, never missing meanwhile.
    assert doc["pid"] == m.pid and m.proc.poll() is None
    assert dict(watch.seen).keys() == {str(m.pid)}, watch.seen
    assert doc["generation"] == 1 and doc["backend"] == backend
    # The old children left; the new ones serve.
    wait_until(lambda: not any(pid_alive(p) for p in old_children),
               what="the old generation to leave")
    doc = wait_until(lambda: consistent(m), what="the board to agree with /proc")
    assert doc["old_generation"] == [] and not (m.child_pids() & old_children)
    assert doc["totals"]["crashed"] == 0


# ------------------------------------------------- a changed release, WSGI


class HttpLoad:
    """Steady HTTP load from a few threads with http.client: some keep the
    connection alive, the others open a new one per request.  Each request
    has its own path, so the access log shows what the server read.

    ``failed``: a request fully sent that got no (or a bad) response.  On a
    kept-alive connection that the server closed between requests (an old
    child leaving), the request is retried on a new connection -- what
    clients do -- only when not one byte of a response came; the access log
    then proves the server never read it (see served_once)."""

    def __init__(self, port: int, keep_alive: int = 2, fresh: int = 1) -> None:
        self.port = port
        self.ok = self.refused = self.retried = 0
        self.failed: list[str] = []
        self.versions: collections.Counter[bytes] = collections.Counter()
        self.answered: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i, i < keep_alive), daemon=True)
                        for i in range(keep_alive + fresh)]

    def __enter__(self) -> HttpLoad:
        for t in self.threads:
            t.start()
        wait_until(lambda: self.ok >= 20 or self.failed, what="HTTP load to flow")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_for(self, more: int) -> None:
        target = self.ok + more
        wait_until(lambda: self.ok >= target or self.failed, timeout=20,
                   what=f"{more} more responses")

    def run(self, index: int, keep_alive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self.stop.is_set():
            n += 1
            conn = self.one(conn, f"/r/{index}/{n}", keep_alive)
        if conn is not None:
            conn.close()

    def one(self, conn: http.client.HTTPConnection | None, path: str,
            keep_alive: bool) -> http.client.HTTPConnection | None:
        for _ in range(3):
            if conn is not None and (conn.sock is None or select.select([conn.sock], [], [], 0)[0]):
                conn.close()        # closed by the server (or data nobody asked for)
                conn = None
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                try:
                    conn.connect()
                except OSError:
                    with self.lock:
                        self.refused += 1
                    time.sleep(0.01)
                    return None
            headers = {} if keep_alive else {"Connection": "close"}
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                conn = None
                if reused and not isinstance(exc, http.client.IncompleteRead):
                    with self.lock:
                        self.retried += 1
                    continue
                self.fail(f"{path}: {exc!r}")
                return None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self.fail(f"{path}: {exc!r}")
                return None
            if resp.status != 200 or not body.startswith(b"v"):
                self.fail(f"{path}: {resp.status} {body[:60]!r}")
            else:
                with self.lock:
                    self.ok += 1
                    self.versions[body.split(b" ", 1)[0]] += 1
                    self.answered.append(path)
            if not keep_alive or resp.will_close:
                conn.close()
                return None
            return conn
        self.fail(f"{path}: closed before a response three times in a row")
        return None

    def fail(self, what: str) -> None:
        with self.lock:
            self.failed.append(what)
        time.sleep(0.01)


def served_once(answered: list[str], log: Path) -> None:
    """Every answered path is in the access log once: a retried request was
    never read by the server (it would show twice)."""
    def logged() -> collections.Counter[str] | None:
        text = log.read_text() if log.exists() else ""
        seen = collections.Counter(line.split(" ", 1)[0] for line in text.splitlines())
        return seen if set(answered) <= set(seen) else None
    seen = wait_until(logged, timeout=5, what="every answered request in the access log")
    assert {p: n for p, n in seen.items() if n > 1} == {}


def test_usr2_serves_the_new_wsgi_release_with_no_failed_request(start_master, tmp_path):
    app = tmp_path / "site.py"
    access = tmp_path / "access.log"
    app.write_text(WSGI_APP.format(version="v1"))
    m = start_master(wsgi=f"{app}:app", bind="127.0.0.1:0", env=NO_PYC, **SMALL,
                     access_log=access, access_log_format="%U %s")
    m.wait_ready()
    with HttpLoad(m.port) as load:
        load.wait_for(100)
        app.write_text(WSGI_APP.format(version="v2"))
        began = time.monotonic()
        m.signal(signal.SIGUSR2)
        doc = wait_until(upgrade_done(m, 1), what="the upgrade to be done")
        done = time.monotonic() - began
        before = load.versions[b"v2"]
        load.wait_for(100)
        new_only = load.versions[b"v2"] - before
        load.wait_for(100)
        old_at_end = load.versions[b"v1"]
        load.wait_for(100)
    print(f"\nWSGI USR2: done after {done * 1000:.0f} ms; {load.ok} responses "
          f"({dict(load.versions)}), {load.retried} retried after an idle close")
    assert load.failed == [] and load.refused == 0
    assert load.versions[b"v1"] >= 100 and new_only >= 100
    assert load.versions[b"v1"] == old_at_end       # no old reply in the last 100
    assert doc["pid"] == m.pid and doc["generation"] == 1
    served_once(load.answered, access)


# ------------------------------------------------------- a broken release


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_release_is_refused_and_the_old_code_serves_on(start_master, tmp_path, kind):
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, **SMALL)
    m.wait_ready()
    before = m.status()
    mistake, code, word = BROKEN[kind]
    with Load(m.port, threads=4) as load:
        load.wait_for(50)
        if kind == "setting":
            write_app(app, "v2", keywords="backlog=0")
        else:
            write_app(app, "v2", head=mistake)
        r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        load.wait_for(50)
    assert r.code == code, (r, m.output())
    assert r.out == ""
    assert len(r.err_lines) == 1 and word in r.err and "upgrade refused" in r.err, r.err
    refused = log_lines(m, "upgrade refused")
    assert len(refused) == 1 and word in refused[0], m.output()
    assert "Traceback" not in m.output()
    assert load.failed == [] and load.refused == 0
    assert version_of(m) == b"v1"
    doc = m.status()
    assert doc["generation"] == before["generation"] == 0
    assert doc["upgrade"] | {"loaded_at": 0} == {
        "serial": 1, "state": "failed", "code": code, "reason": doc["upgrade"]["reason"],
        "loaded_at": 0}
    assert doc["upgrade"]["loaded_at"] == before["upgrade"]["loaded_at"]
    assert doc["totals"]["crashed"] == 0
    # Nothing else changed: the next good release goes through.
    write_app(app, "v3")
    r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
    assert r.code == 0, (r, m.output())
    serves(m, b"v3")


class ScriptMaster(Master):
    """``python app.py ARGS``: a script that calls Server.run() itself."""

    def __init__(self, tmp: Path, script: Path, args: list[str]) -> None:
        self.status_path = str(tmp / "status-script.sock")
        self.log_path = tmp / "script.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--bind", "127.0.0.1:0",
             "--status-socket", self.status_path, *args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **NO_PYC}, cwd=str(tmp))
        self.pid = self.proc.pid
        self.port = int(wait_until(self._listening_port, 15, what="the script to listen"))


@pytest.fixture
def start_script(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def start(script: Path, *args: str) -> Master:
        m = ScriptMaster(tmp_path, script, list(args))
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill_all()


MAIN = 'if __name__ == "__main__":\n    server.run()\n'


def test_a_script_with_a_bad_setting_is_refused_and_a_good_one_upgrades(start_script,
                                                                        tmp_path):
    app = tmp_path / "app.py"
    write_app(app, "v1", keywords="start_servers=2, min_spare=1", tail=MAIN)
    m = start_script(app, "--max-children", "4")
    m.wait_ready(idle=2)
    with Load(m.port, threads=2) as load:
        write_app(app, "v2", keywords="start_servers=2, min_spare=1, backlog=0", tail=MAIN)
        bad = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        load.wait_for(20)
        assert version_of(m) == b"v1"
        write_app(app, "v3", keywords="start_servers=2, min_spare=1", tail=MAIN)
        good = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        load.wait_for(20)
    assert bad.code == 2 and "backlog" in bad.err, bad
    assert len(log_lines(m, "upgrade refused")) == 1, m.output()
    assert good.code == 0, (good, m.output())
    serves(m, b"v3")
    assert m.status()["pid"] == m.pid
    assert load.failed == [] and load.refused == 0


# ---------------------------------------------------- mps reload / mps stop


def test_reload_exits_0_and_names_the_generation(start_master, tmp_path):
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, **SMALL)
    m.wait_ready()
    write_app(app, "v2")
    r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
    assert r.code == 0, (r, m.output())
    assert r.out.strip() == f"mps: master {m.pid} serves generation 1" and r.err == ""
    # Done: the new generation is ready (its own board), and serves.
    doc = m.status()
    assert (doc["generation"], doc["upgrade"]["state"]) == (1, "done")
    assert doc["children"]["idle"] >= SMALL["start_servers"]
    serves(m, b"v2")


def test_reload_with_only_a_pid_file_finds_the_status_socket(start_master, tmp_path):
    app = tmp_path / "app.py"
    pid_file = tmp_path / "mps.pid"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, pid_file=pid_file, **SMALL)
    m.wait_ready()
    write_app(app, "v2")
    r = run_mps("reload", "--pid-file", str(pid_file), "--timeout", "30")
    assert r.code == 0, (r, m.output())
    assert f"serves generation 1" in r.out
    serves(m, b"v2")
    assert pid_file.read_text().strip() == str(m.pid)


def test_stop_waits_until_the_master_is_gone(start_master, tmp_path):
    pid_file = tmp_path / "mps.pid"
    m = start_master(app="apps.py:echo", pid_file=pid_file, **SMALL)
    m.wait_ready()
    children = m.child_pids()
    r = run_mps("stop", "--pid-file", str(pid_file), "--timeout", "30")
    assert r.code == 0, (r, m.output())
    # Gone when it returns: at most a zombie for its parent (this test) to reap.
    assert not pid_alive(m.pid)
    assert m.wait_exit(5) == 0
    assert not any(pid_alive(p) for p in children)
    assert not pid_file.exists()


def test_stop_times_out_with_1_while_a_graceful_stop_cannot_finish(start_master, tmp_path):
    pid_file = tmp_path / "mps.pid"
    m = start_master(app="apps.py:hold", pid_file=pid_file, graceful_timeout=30, **SMALL)
    m.wait_ready()
    with m.connect() as held:
        held.recv(64)           # a child is busy with us until we close
        began = time.monotonic()
        r = run_mps("stop", "--status-socket", m.status_path, "--timeout", "1")
        took = time.monotonic() - began
        assert r.code == 1, r
        assert r.err.strip() == f"mps: error: master {m.pid} is still running after 1s"
        assert 1.0 <= took < 10 and pid_alive(m.pid)
    # The held connection ends: the stop it asked for completes.
    assert m.wait_exit(15) == 0


def test_a_second_reload_waits_for_the_first_upgrade_to_finish(start_master, tmp_path):
    # The master ignores USR2 while old children are still leaving: the
    # second deploy waits for them instead of timing out.
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, graceful_timeout=30, **SMALL)
    m.wait_ready()
    with m.connect() as held:
        held.sendall(b"hold\n")
        assert held.recv(64).startswith(b"v1 ")
        write_app(app, "v2")
        first = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        assert first.code == 0, (first, m.output())
        write_app(app, "v3")
        second: list[Any] = []
        thread = threading.Thread(target=lambda: second.append(
            run_mps("reload", "--status-socket", m.status_path, "--timeout", "15")))
        thread.start()
        time.sleep(0.5)
        assert second == [] and m.status()["generation"] == 1    # waiting, not signalled
    thread.join(30)
    assert second and second[0].code == 0, (second, m.output())
    assert "serves generation 2" in second[0].out
    assert "ignored" not in m.output()
    serves(m, b"v3")


def test_reload_and_stop_name_a_master_that_is_not_running(tmp_path):
    pid_file = tmp_path / "mps.pid"
    pid_file.write_text("999999999\n")
    for command in ("reload", "stop"):
        r = run_mps(command, "--pid-file", str(pid_file))
        assert r.code == 1 and "not running" in r.err, r


# ------------------------------------------------------ twenty in a row


def fd_targets(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            pass
    return sorted(re.sub(r"\[\d+\]", "[]", t) for t in out)


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


def zombies_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    return [k for k in kids if not pid_alive(k)]


def test_twenty_upgrades_in_a_row_leak_nothing(start_master, backend, tmp_path):
    app = tmp_path / "app.py"
    write_app(app, "v0")
    pool = {"start_servers": 2, "min_spare": 1, "max_spare": 2, "max_children": 4}
    m = start_master(app=f"{app}:handle", backend=backend, env=NO_PYC, **pool)
    m.wait_ready()
    wait_until(lambda: consistent(m), what="a settled pool")
    fds, rss = fd_targets(m.pid), rss_kib(m.pid)
    began = time.monotonic()
    for n in range(1, 21):
        write_app(app, f"v{n}")
        r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        assert r.code == 0, (n, r, m.output())
        serves(m, f"v{n}".encode())
    took = time.monotonic() - began

    def settled() -> dict[str, Any] | None:
        doc = consistent(m)
        return doc if doc and not doc["old_generation"] and not zombies_of(m.pid) else None
    doc = wait_until(settled, what="the last old generation to leave")
    fds_after, rss_after = fd_targets(m.pid), rss_kib(m.pid)
    print(f"\n20 upgrades ({backend}) in {took:.1f} s: master fds {len(fds)} -> "
          f"{len(fds_after)}, VmRSS {rss} -> {rss_after} KiB")
    assert doc["generation"] == 20 and doc["upgrade"]["serial"] == 20
    assert doc["pid"] == m.pid
    assert fds_after == fds
    assert rss_after - rss < 8 * 1024
    assert zombies_of(m.pid) == []
    assert {s["pid"] for s in doc["slots"]} == m.child_pids()
    assert doc["totals"]["crashed"] == 0


# ------------------------------------------------- the new image crashes


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_new_image_that_crashes_leaves_no_child_behind(start_master, tmp_path, how):
    app = tmp_path / "app.py"
    marker = tmp_path / "crash"
    write_app(app, "v1", crash=str(marker))
    m = start_master(app=f"{app}:handle", env=NO_PYC, **SMALL)
    m.wait_ready()
    children = m.child_pids()
    assert children
    marker.write_text(how)      # the check passes; the new image's on_starting fails
    m.signal(signal.SIGUSR2)
    code = m.wait_exit(10)
    wait_until(lambda: not any(pid_alive(p) for p in children), timeout=5,
               what=f"the old children {sorted(children)} to die with their master")
    assert code == (-signal.SIGKILL if how == "kill" else 1), m.output()
    if how == "raise":
        assert "the new image cannot start (on purpose)" in m.output()
    assert "passed its check" in m.output()


# ------------------------------------------------ status during an upgrade


def test_status_shows_the_old_generation_until_it_leaves(start_master, tmp_path):
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, graceful_timeout=30, **SMALL)
    m.wait_ready()
    before = m.status()
    with m.connect() as held:
        held.sendall(b"hold\n")
        version, pid = held.recv(64).split(b":")[0].split()
        old_pid = int(pid)
        assert version == b"v1"
        write_app(app, "v2")
        r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        assert r.code == 0, (r, m.output())
        shown = run_mps("status", "--json", m.status_path)
        assert shown.code == 0, shown
        doc = json.loads(shown.out)
        assert [(s["pid"], s["state"]) for s in doc["old_generation"]] == [(old_pid, "busy")]
        new = {s["pid"] for s in doc["slots"]}
        assert old_pid not in new and len(new) >= SMALL["start_servers"]
        assert doc["generation"] == 1
        up = doc["upgrade"]
        assert (up["serial"], up["state"], up["reason"]) == (1, "done", "")
        assert up["loaded_at"] > before["upgrade"]["loaded_at"]
        plain = run_mps("status", m.status_path)
        assert f"old generation (leaving): 1 children, pids {old_pid}" in plain.out, plain.out
        assert "last upgrade #1: done" in plain.out
        assert pid_alive(old_pid)
        serves(m, b"v2")
    # The client leaves: so does its old child.
    doc = old_generation_left(m)
    assert not pid_alive(old_pid)
    assert doc["upgrade"]["state"] == "done" and doc["generation"] == 1
    assert "the last child of the old generation has left" in m.output()


def board_memfd(pid: int) -> Path:
    """The master's scoreboard, through /proc (the memfd it created)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "memfd:mps" in os.readlink(fd):
                return fd
        except OSError:
            continue
    raise AssertionError(f"no scoreboard memfd among pid {pid}'s descriptors")


def test_a_release_with_another_board_layout_still_upgrades(start_master, tmp_path):
    """The release after a scoreboard layout change cannot read the old
    image's board: it upgrades all the same, and the old children (one busy
    on a held connection) finish and leave, known by pid alone."""
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", backend="c", env=NO_PYC, graceful_timeout=30,
                     **SMALL)
    m.wait_ready()
    with m.connect() as held:
        held.sendall(b"hold\n")
        version, pid = held.recv(64).split(b":")[0].split()
        old_pid = int(pid)
        assert version == b"v1"
        # As a release with another layout would see it: the version word
        # (after the 4-byte magic) is not this code's.
        with open(board_memfd(m.pid), "r+b") as board:
            board.seek(4)
            board.write(struct.pack("=I", 0xFFFF))
        write_app(app, "v2")
        r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        assert r.code == 0, (r, m.output())
        doc = m.status()
        assert [(s["pid"], s["state"]) for s in doc["old_generation"]] == [(old_pid, "unknown")]
        assert doc["generation"] == 1 and doc["upgrade"]["state"] == "done"
        assert "is not one this release can read" in m.output()
        serves(m, b"v2")
        assert pid_alive(old_pid)       # its connection is served to the end
    doc = old_generation_left(m)
    assert not pid_alive(old_pid)
    assert doc["totals"]["crashed"] == 0 and m.proc.poll() is None


CANNOT_BOOT = '''

@server.post_fork
def cannot_boot(server, worker):
    # The check imports the release but never forks: only the new children see this.
    if os.path.exists({flag!r}):
        raise RuntimeError("this child cannot boot (on purpose)")
'''


def deploy_a_release_that_cannot_boot(m: Master, app: Path, flag: Path) -> Result:
    """v2, whose children cannot boot while ``flag`` exists, deployed over
    v1: the reload reports the upgrade failed."""
    flag.write_text("")
    write_app(app, "v2", tail=CANNOT_BOOT.format(flag=str(flag)))
    r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
    assert r.code == EXIT_BOOT, (r, m.output())
    return r


def serving_v1(start_master: Callable[..., Master], tmp_path: Path) -> tuple[Master, Path, Path]:
    """A pool serving v1 of an app; the app's path, and the flag that
    deploy_a_release_that_cannot_boot will use."""
    app, flag = tmp_path / "app.py", tmp_path / "broken"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, **SMALL)
    m.wait_ready()
    return m, app, flag


def test_an_upgrade_whose_children_cannot_boot_keeps_the_old_generation_serving(
        start_master, tmp_path):
    """post_fork fails in every new child: the upgrade is reported failed
    and the old children serve on (a plain start would stop: nothing else
    serves); once the cause is gone, the retried boot completes the upgrade."""
    m, app, flag = serving_v1(start_master, tmp_path)
    with Load(m.port, threads=4) as load:
        load.wait_for(50)
        r = deploy_a_release_that_cannot_boot(m, app, flag)
        assert "cannot boot" in r.err and "old generation serves on" in r.err, r.err
        load.wait_for(100)      # the old code still serves, the master lives
        assert version_of(m) == b"v1" and m.proc.poll() is None
        doc = m.status()
        assert doc["upgrade"]["state"] == "failed" and doc["upgrade"]["code"] == EXIT_BOOT
        held = {s["pid"] for s in doc["old_generation"]}
        # Held: they serve past max_requests (128) rather than recycle away.
        load.wait_for(20 * 128)
        assert held and {s["pid"] for s in m.status()["old_generation"]} == held
        assert all(pid_alive(p) for p in held)
        flag.unlink()       # the cause goes away: the next retried boot succeeds
        wait_for_switch(m, b"v2", time.monotonic(), timeout=20)   # (retries every 5 s)
        load.wait_for(50)
    assert load.failed == [] and load.refused == 0
    doc = old_generation_left(m)
    assert doc["upgrade"]["state"] == "done" and doc["generation"] == 1
    assert not any(pid_alive(p) for p in held)


def test_a_usr2_to_the_whole_group_leaves_recycling_alone(start_master, tmp_path):
    """`systemctl kill -s USR2` signals every process of the service: the
    children ignore it (the upgrade's hold is a word on the board, set only
    by a master about to re-execute), so a refused upgrade leaves
    max_requests working."""
    app = tmp_path / "app.py"
    write_app(app, "v1")
    m = start_master(app=f"{app}:handle", env=NO_PYC, max_requests=5, max_requests_jitter=0,
                     **SMALL)
    m.wait_ready()
    write_app(app, "v2", head=BROKEN["import"][0])     # its check refuses it
    assert os.getpgid(m.pid) == m.pid                  # (never our own group)
    os.killpg(m.pid, signal.SIGUSR2)
    wait_until(lambda: (d := m.try_status()) and d["upgrade"]["state"] == "failed",
               what="the upgrade to be refused")
    pids = set()
    for _ in range(40):     # 5 connections a child: more than one child can serve
        with m.connect() as conn:
            conn.sendall(b"x\n")
            pids.add(int(conn.recv(64).split(b":")[0].split()[1]))
    assert len(pids) > SMALL["max_spare"], pids      # they recycled
    assert m.proc.poll() is None


def test_a_fixed_release_replaces_one_whose_children_cannot_boot(start_master, tmp_path):
    """The release whose children cannot boot has a bug, not a passing
    cause: the next reload hands the old generation (still serving, held)
    to the fixed release, which takes over with no restart and no failed
    connection."""
    m, app, flag = serving_v1(start_master, tmp_path)
    with Load(m.port, threads=4) as load:
        load.wait_for(50)
        deploy_a_release_that_cannot_boot(m, app, flag)
        held = {s["pid"] for s in m.status()["old_generation"]}
        write_app(app, "v3")            # the fix (the flag stays: v2 would still fail)
        r = run_mps("reload", "--status-socket", m.status_path, "--timeout", "30")
        assert r.code == 0, (r, m.output())
        serves(m, b"v3")
        load.wait_for(50)
    assert load.failed == [] and load.refused == 0
    doc = old_generation_left(m)
    assert doc["upgrade"]["state"] == "done" and doc["generation"] == 2
    assert held and not any(pid_alive(p) for p in held)
    assert m.proc.poll() is None and doc["pid"] == m.pid
