"""The pid file: a live master's is refused before anything binds; a stale one
is replaced (issue 7, item 9)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Master, pid_alive, run_mps, wait_until
from mps.daemon import check_pid_file
from mps.errors import MpsError

SMALL = {"start_servers": 1, "min_spare": 1, "max_spare": 2, "max_children": 2}
SMALL_FLAGS = ["--start-servers", "1", "--min-spare", "1", "--max-spare", "2",
               "--max-children", "2"]


def names(pid_file: Path, pid: int) -> bool:
    return pid_file.exists() and pid_file.read_text().strip() == str(pid)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is no mps master."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("same_port", [False, True])
def test_a_second_master_is_refused_a_live_masters_pid_file(
        same_port: bool, start_master: Callable[..., Master], tmp_path: Path) -> None:
    pid_file = tmp_path / "mps.pid"
    first = start_master(pid_file=str(pid_file), **SMALL)
    first.wait_ready()
    wait_until(lambda: names(pid_file, first.pid), what="the first master's pid file")
    # Another port: it used to serve, take the file over, and delete it when
    # stopped.  The same port (the same command again): the pid file is
    # checked before binding, so the refusal names it, not the port.
    port = first.port if same_port else 0
    r = run_mps("serve", "--bind", f"127.0.0.1:{port}", "--pid-file", str(pid_file),
                *SMALL_FLAGS, cwd=tmp_path, timeout=15)
    assert "Traceback" not in r.err, r.err
    assert r.code == 1, r.err
    assert len(r.err_lines) == 1, r.err
    assert str(pid_file) in r.err and f"process {first.pid}" in r.err, r.err
    assert names(pid_file, first.pid)
    assert first.echo(b"still").endswith(b": still")


def test_a_stale_pid_file_is_replaced(start_master: Callable[..., Master],
                                      tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file = tmp_path / "mps.pid"
    pid_file.write_text(f"{dead.pid}\n")
    m = start_master(pid_file=str(pid_file), **SMALL)
    m.wait_ready()
    wait_until(lambda: names(pid_file, m.pid), what="the pid file to name the new master")


def test_a_pid_reused_since_the_file_was_written_is_stale(
        start_master: Callable[..., Master], sleeper: subprocess.Popen[bytes],
        tmp_path: Path) -> None:
    # The master crashed an hour ago and its pid now belongs to a process
    # that began after the file was written (a reboot, a container restart).
    pid_file = tmp_path / "mps.pid"
    pid_file.write_text(f"{sleeper.pid}\n")
    hour_ago = time.time() - 3600
    os.utime(pid_file, (hour_ago, hour_ago))
    m = start_master(pid_file=str(pid_file), **SMALL)
    m.wait_ready()
    wait_until(lambda: names(pid_file, m.pid), what="the pid file to name the new master")
    assert sleeper.poll() is None


# ----------------------------------------------------------------- check_pid_file


def test_check_refuses_a_live_process_that_predates_the_file(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    pid_file = tmp_path / "mps.pid"
    wait_until(lambda: pid_alive(sleeper.pid))
    time.sleep(0.05)    # the file is written after the process started, as a master's is
    pid_file.write_text(f"{sleeper.pid}\n")
    with pytest.raises(MpsError, match=f"{pid_file}.*process {sleeper.pid}"):
        check_pid_file(str(pid_file))


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-5\n", "99999999999999999999\n"])
def test_check_replaces_what_names_no_process(content: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "mps.pid"
    pid_file.write_text(content)
    check_pid_file(str(pid_file))


def test_check_replaces_our_own_pid_and_a_zombie(tmp_path: Path) -> None:
    pid_file = tmp_path / "mps.pid"
    pid_file.write_text(f"{os.getpid()}\n")     # a container restarted with the same pid
    check_pid_file(str(pid_file))
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: not pid_alive(zombie.pid), what="a zombie")
        pid_file.write_text(f"{zombie.pid}\n")
        check_pid_file(str(pid_file))
    finally:
        zombie.wait()


def test_check_does_not_hang_on_a_fifo_or_follow_a_link(sleeper: subprocess.Popen[bytes],
                                                        tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    check_pid_file(str(fifo))
    target = tmp_path / "elsewhere"
    target.write_text(f"{sleeper.pid}\n")
    link = tmp_path / "link.pid"
    link.symlink_to(target)
    check_pid_file(str(link))       # not a pid file we wrote: write_pid_file replaces the link
