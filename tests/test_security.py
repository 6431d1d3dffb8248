"""Security contract tests: privilege drop, no files in /tmp, the status socket
and pid file never follow or clobber what an attacker planted, and network
input never reaches a log line unescaped or unbounded.

Everything runs real ``mps serve`` processes (the ``start_master`` fixture, or
``run_mps`` below for commands expected to exit at once) and inspects them
through /proc.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

import mps
from conftest import Master, pid_alive, run_mps, wait_until

TIMEOUT = 30.0
NOBODY = "nobody"
NOGROUP = "nogroup"
#: A small pool: enough to see children, quick to start.
POOL = dict(start_servers=2, min_spare=1, max_spare=2, max_children=4)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="--user/--group switch identity, which needs root (tests run as root in CI)")


# ----------------------------------------------------------------- helpers


def one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, f"want exactly one line, got:\n{text}"
    return lines[0]


def proc_ids(pid: int) -> dict[str, list[int]]:
    """The Uid:, Gid: and Groups: lines of /proc/PID/status, as ints."""
    out: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(x) for x in rest.split()]
    return out


def started_master(start_master: Callable[..., Master], **kwargs: object) -> Master:
    """A master whose pool is up (idle children >= min_spare)."""
    m = start_master(**kwargs)
    m.wait_ready()
    return m


def stopped(m: Master) -> str:
    """The one line a master that refused to start wrote, after it exited 1."""
    assert m.wait_exit(TIMEOUT) == 1, m.output()
    return one_line(m.output())


# ----------------------------------------------------------------- --user / --group


@needs_root
def test_user_nobody_runs_children_as_nobody_and_keeps_the_master_root(
        start_master: Callable[..., Master]) -> None:
    import pwd
    try:
        nobody = pwd.getpwnam(NOBODY)
    except KeyError:
        pytest.skip(f"this machine has no {NOBODY!r} user")
    m = started_master(start_master, user=NOBODY, **POOL)

    def children_dropped() -> set[int] | None:
        pids = m.child_pids()
        if len(pids) < POOL["min_spare"]:
            return None
        ids = {pid: proc_ids(pid) for pid in pids}
        # A child just forked is root until it boots; wait for every one.
        return pids if all(i["Uid"] == [nobody.pw_uid] * 4 for i in ids.values()) else None

    pids = wait_until(children_dropped, what="every child to run as nobody")
    for pid in pids:
        ids = proc_ids(pid)
        assert ids["Uid"][:2] == [nobody.pw_uid, nobody.pw_uid]       # real, effective
        assert ids["Gid"][:2] == [nobody.pw_gid, nobody.pw_gid]
        assert set(ids["Groups"]) <= {nobody.pw_gid}, ids   # root's groups dropped
    assert proc_ids(m.pid)["Uid"][:2] == [0, 0]
    reply = m.echo(b"hello")
    pid_text, _, data = reply.partition(b": ")
    assert data == b"hello"
    assert proc_ids(int(pid_text))["Uid"][1] == nobody.pw_uid


@needs_root
def test_group_nogroup_sets_the_childrens_gid(start_master: Callable[..., Master]) -> None:
    import grp
    try:
        gid = grp.getgrnam(NOGROUP).gr_gid
    except KeyError:
        pytest.skip(f"this machine has no {NOGROUP!r} group")
    m = started_master(start_master, group=NOGROUP, **POOL)

    def children_switched() -> set[int] | None:
        pids = m.child_pids()
        ok = len(pids) >= POOL["min_spare"] and \
            all(proc_ids(p)["Gid"] == [gid] * 4 for p in pids)
        return pids if ok else None

    for pid in wait_until(children_switched, what="every child to run with gid nogroup"):
        assert proc_ids(pid)["Gid"][:2] == [gid, gid]
    assert proc_ids(m.pid)["Gid"][:2] == [0, 0]
    assert m.echo(b"x").endswith(b": x")


@pytest.mark.parametrize("flag, name", [("--user", "user"), ("--group", "group")])
def test_unknown_user_or_group_exits_2_with_one_line(flag: str, name: str,
                                                     tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    r = run_mps("serve", flag, "no_such_user_xyz", "--bind", f"unix:{sock}", cwd=tmp_path)
    line = one_line(r.err)
    assert r.code == 2, r
    assert f"setting {name}=" in line and "no_such_user_xyz" in line, line
    assert not sock.exists()


@needs_root
@pytest.mark.parametrize("user", [None, NOBODY])
def test_busy_child_dies_with_the_master_also_under_user(
        user: str | None, start_master: Callable[..., Master]) -> None:
    # The child asks for PR_SET_PDEATHSIG, but the kernel clears that setting
    # when the child's uid/gid change: it must be requested *after* the
    # privilege drop, or a child busy in a long handler outlives its master.
    settings = dict(POOL, user=user) if user else dict(POOL)
    m = started_master(start_master, app="apps:boom", **settings)
    with m.connect() as client:
        client.sendall(b"hang")

        def busy_pid() -> int | None:
            doc = m.try_status()
            busy = [s["pid"] for s in (doc or {}).get("slots", []) if s["state"] == "busy"]
            return busy[0] if busy else None

        pid = wait_until(busy_pid, what="a child to be busy in the hanging handler")
        m.signal(signal.SIGKILL)
        m.wait_exit()
        wait_until(lambda: not pid_alive(pid), timeout=10,
                   what=f"busy child {pid} (user {user}) to exit after the master died")


# ----------------------------------------------------------------- nothing in /tmp


def _exempt_roots() -> list[str]:
    """Code the processes legitimately map: the interpreter, its venv, mps itself."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.abspath(mps.__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        roots.add(sysconfig.get_paths()[key])
    return [os.path.realpath(r) + os.sep for r in roots]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _fd_paths(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass    # closed meanwhile
    return out


def _maps(pid: int) -> list[tuple[str, str, str]]:
    """(perms, inode, path) of every mapping with a path."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6:
                out.append((parts[1], parts[4], parts[5].rstrip("\n")))
    return out


ANON_SHARED = re.compile(r"^(/dev/zero \(deleted\)|\[anon_shmem.*\]|/memfd:.*)$")


def test_nothing_in_tmp_or_dev_shm_and_the_scoreboard_is_anonymous(
        backend: str, start_master: Callable[..., Master]) -> None:
    m = started_master(start_master, app="apps:echo", backend=backend, **POOL)
    assert m.echo(b"ping").endswith(b": ping")
    child = sorted(m.child_pids())[0]
    own = {os.path.realpath(m.status_path), os.path.realpath(str(m.log_path))}
    exempt = _exempt_roots()
    shared: dict[int, set[str]] = {}
    for pid in (m.pid, child):
        paths = list(_fd_paths(pid).values())
        maps = _maps(pid)
        paths += [path for _, _, path in maps]
        for path in paths:
            if not path.startswith("/") or path in own:
                continue
            if any(_under(os.path.realpath(path), root) for root in exempt):
                continue
            for bad in ("/tmp", "/dev/shm"):
                assert not _under(path, bad), f"pid {pid} has {path} open or mapped"
        # Every writable shared mapping is anonymous memory, never a named
        # file (glibc maps its read-only gconv cache shared; that is no state).
        shared_maps = [(inode, path) for perms, inode, path in maps
                       if perms[1] == "w" and perms[3] == "s"]
        for inode, path in shared_maps:
            assert ANON_SHARED.match(path), f"pid {pid} maps a file shared, writable: {path}"
        shared[pid] = {inode for inode, _ in shared_maps}
    # ... and the child maps the master's scoreboard (inherited through fork).
    assert shared[m.pid] & shared[child], shared
    if backend == "python":
        for pid in (m.pid, child):
            assert any(p.startswith("/memfd:") for p in _fd_paths(pid).values()), pid


# ----------------------------------------------------------------- status socket


def _with_status_at(start_master: Callable[..., Master], path: Path) -> Master:
    """A master whose --status-socket is ``path`` (the later flag wins)."""
    m = start_master(app="apps:echo", extra_args=["--status-socket", str(path)], **POOL)
    m.status_path = str(path)
    return m


def test_status_socket_has_mode_0600(start_master: Callable[..., Master]) -> None:
    m = started_master(start_master, **POOL)
    info = os.lstat(m.status_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)


def test_stale_status_socket_is_replaced(start_master: Callable[..., Master],
                                         tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))        # a crashed master's leftover: nobody listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(str(path))
    m = _with_status_at(start_master, path)
    doc = m.wait_ready()            # answered on that very path
    assert doc["pid"] == m.pid
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_regular_file_at_status_socket_path_is_refused_and_kept(
        start_master: Callable[..., Master], tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    path.write_bytes(b"precious data\n")
    m = _with_status_at(start_master, path)
    line = stopped(m)
    assert "status_socket" in line and str(path) in line, line
    assert path.read_bytes() == b"precious data\n"


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_status_socket_path_is_refused(
        dangling: bool, start_master: Callable[..., Master], tmp_path: Path) -> None:
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"precious data\n")
    path = tmp_path / "status.sock"
    path.symlink_to(target)
    m = _with_status_at(start_master, path)
    line = stopped(m)
    assert "status_socket" in line, line
    assert path.is_symlink() and os.readlink(path) == str(target)
    if dangling:
        assert not os.path.lexists(target)
    else:
        assert target.read_bytes() == b"precious data\n"


def test_status_socket_of_a_live_master_is_not_stolen(
        start_master: Callable[..., Master]) -> None:
    first = started_master(start_master, **POOL)
    inode = os.lstat(first.status_path).st_ino
    second = _with_status_at(start_master, Path(first.status_path))
    line = stopped(second)
    assert "status_socket" in line and "in use" in line, line
    assert os.lstat(first.status_path).st_ino == inode
    assert first.status()["pid"] == first.pid
    assert first.echo(b"still").endswith(b": still")


# ----------------------------------------------------------------- pid file


def test_pid_file_holds_the_master_pid_and_goes_on_graceful_stop(
        start_master: Callable[..., Master], tmp_path: Path) -> None:
    pid_file = tmp_path / "mps.pid"
    m = start_master(extra_args=["--pid-file", str(pid_file)], **POOL)
    wait_until(lambda: pid_file.exists(), what="the pid file")
    assert pid_file.read_text() == f"{m.pid}\n"
    assert not pid_file.is_symlink()
    m.wait_ready()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mps.pid.")] == []
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0, m.output()
    assert not pid_file.exists()


def test_symlink_at_pid_file_path_is_replaced_not_followed(
        start_master: Callable[..., Master], tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious data\n")
    pid_file = tmp_path / "mps.pid"
    pid_file.symlink_to(target)
    m = start_master(extra_args=["--pid-file", str(pid_file)], **POOL)
    wait_until(lambda: not pid_file.is_symlink() and pid_file.exists(),
               what="the link to be replaced by the pid file")
    assert pid_file.read_text() == f"{m.pid}\n"
    assert target.read_bytes() == b"precious data\n"
    m.wait_ready()
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0, m.output()
    assert not os.path.lexists(pid_file)
    assert target.read_bytes() == b"precious data\n"


# ----------------------------------------------------------------- network input in logs


FORGED = "2026-01-01 00:00:00,000 [1] [master] INFO FORGED"

APP = '''\
def handler(conn, addr):
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    raise {exc}("bad request: " + data.decode("utf-8", "replace"))
'''


@pytest.mark.parametrize("exc", ["ValueError", "SystemExit"])
def test_network_input_reaches_the_log_escaped_and_bounded(
        exc: str, start_master: Callable[..., Master], tmp_path: Path) -> None:
    # SystemExit is not an Exception: a handler raising it leaves the child,
    # and that path must escape the message just the same.
    app = tmp_path / "forging_app.py"
    app.write_text(APP.format(exc=exc))
    m = started_master(start_master, app=f"{app}:handler", **POOL)
    payload = ("\n" + FORGED + "\r\n\x1b[31mred\x1b[0m" + "A" * 10_000).encode()
    with m.connect() as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        while client.recv(65536):
            pass
    wait_until(lambda: "FORGED" in m.output(), what="the handler's failure in the log")
    log = m.output()
    for line in log.splitlines():
        assert not line.startswith(FORGED[:23]), f"forged log line:\n{line}"
        assert len(line) <= 1000, f"log line of {len(line)} characters"
    assert "\x1b" not in log, "a terminal escape reached the log"
    assert m.status()["children"]["total"] >= 1     # the pool survived it


def test_a_slow_client_is_served_not_dropped(
        backend: str, start_master: Callable[..., Master]) -> None:
    # Idle children wake from accept() every second (the listener's
    # SO_RCVTIMEO); an accepted socket inherits that option, so unless mps
    # clears it a handler's recv() fails with EAGAIN after 1 s of client
    # silence and the connection is dropped.  The pause is the scenario.
    import time
    m = started_master(start_master, app="apps:echo", backend=backend, **POOL)
    with m.connect() as client:
        time.sleep(1.5)
        client.sendall(b"late")
        reply = client.recv(4096)
    assert reply.endswith(b": late"), (reply, m.output()[-2000:])
    assert "handler failed" not in m.output()

