"""Smaller slips a new user hits first (issue 7, item 14), each in a real process."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TESTS, Master, children_of, pid_alive, recv_all, run_mps, wait_until

SMALL = ["--start-servers", "2", "--min-spare", "1", "--max-spare", "2", "--max-children", "4"]
SAFE = ("--bind", "127.0.0.1:0", "--start-servers", "0", "--min-spare", "0")


def help_entry(text: str, flag: str) -> str:
    """One flag's entry in the settings section of --help, whitespace folded."""
    folded = " ".join(text.split())
    found = re.compile(re.escape(flag) + "[ ,]").search(folded, folded.index("settings (also"))
    assert found, text
    start = found.start()
    end = folded.find(" --", start + len(flag) + 1)
    if folded.startswith(", --no-", end - 1):     # --daemon, --no-daemon
        end = folded.find(" --", end + 1)
    return folded[start:] if end < 0 else folded[start:end]


# ----------------------------------------------------------------- --help


def test_script_help_shows_the_apps_own_defaults(tmp_path: Path) -> None:
    script = tmp_path / "myapp.py"
    script.write_text(textwrap.dedent(f"""
        import mps
        app = mps.Server(start_servers=3, timeout=5, daemon=True,
                         pid_file={str(tmp_path / "app%.pid")!r})
        app.handler(lambda conn, addr: None)
        app.run()
    """))
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "(default: 3)" in help_entry(r.stdout, "--start-servers")
    assert "(default: 5)" in help_entry(r.stdout, "--timeout")
    assert "(default: on)" in help_entry(r.stdout, "--daemon")
    assert "app%.pid)" in help_entry(r.stdout, "--pid-file")   # a % does not break argparse
    assert "(default: 64)" in help_entry(r.stdout, "--max-children")   # not set: mps's


@pytest.mark.parametrize("flag, default", [("--timeout", "0.0"), ("--max-requests-jitter", "0"),
                                           ("--single", "off"), ("--bind", "127.0.0.1:8000")])
def test_serve_help_shows_zero_defaults(flag: str, default: str) -> None:
    r = run_mps("serve", "--help")
    assert r.code == 0, r.err
    assert f"(default: {default})" in help_entry(r.out, flag)


# ----------------------------------------------------------------- usage hints


@pytest.mark.parametrize("args, hint", [
    (["serve", "--nope"], "`mps serve --help`"),
    (["serve", "mps.examples:echo", "extra"], "`mps serve --help`"),
    (["status", "/some/path", "--nope"], "`mps status --help`"),
    (["--nope"], "`mps --help`"),
])
def test_an_unknown_argument_points_at_the_commands_own_help(args: list[str], hint: str,
                                                             tmp_path: Path) -> None:
    r = run_mps(*args, cwd=tmp_path)
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    assert hint in r.err and args[-1] in r.err, r.err


# ----------------------------------------------------------------- import errors


def _broken_app(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("def connect():\n    raise RuntimeError('db down')\n")
    (tmp_path / "broken.py").write_text("import helper\n\nhelper.connect()\n")


@pytest.mark.parametrize("spec", ["broken:handle", "broken.py:handle"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_import_error_shows_the_users_traceback_at_debug(spec: str, how: str,
                                                         tmp_path: Path) -> None:
    _broken_app(tmp_path)
    if how == "flag":
        r = run_mps("serve", spec, "--log-level", "debug", *SAFE, cwd=tmp_path)
    else:
        r = run_mps("serve", spec, *SAFE, cwd=tmp_path, env={"MPS_LOG_LEVEL": "debug"})
    assert r.code == 4, r.err
    lines = r.err_lines
    assert lines[0] == "Traceback (most recent call last):", r.err
    assert re.search(r'broken\.py", line 3, in <module>', r.err), r.err
    assert re.search(r'helper\.py", line 2, in connect', r.err), r.err
    assert lines[-2] == "RuntimeError: db down", r.err
    assert lines[-1].startswith("mps: error: cannot import app") and "db down" in lines[-1]
    assert "importlib" not in r.err and "mps/handlers.py" not in r.err, r.err


def test_import_error_is_one_line_below_debug(tmp_path: Path) -> None:
    _broken_app(tmp_path)
    r = run_mps("serve", "broken:handle", "--log-level", "info", *SAFE, cwd=tmp_path,
                env={"MPS_LOG_LEVEL": "debug"})      # the flag wins
    assert r.code == 4 and len(r.err_lines) == 1 and "db down" in r.err, r.err


# ----------------------------------------------------------------- wording


def test_the_startup_line_says_one_child(start_master: Callable[..., Master]) -> None:
    m = start_master(start_servers=1, min_spare=1, max_spare=2, max_children=2)
    m.wait_ready()
    assert re.search(r"\(backend \w+, 1 child\)", m.output()), m.output()


# ----------------------------------------------------------------- Ctrl-C in --single


def _listening_port(log: Path) -> int:
    def port() -> int | None:
        match = re.search(r"listening at [^ ]*:(\d+)", log.read_text(errors="replace"))
        return int(match.group(1)) if match else None
    return int(wait_until(port, what="the address in the log"))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("started", ["terminal", "background"])
def test_ctrl_c_in_single_mode_exits_0_like_the_pool(busy: bool, started: str, backend: str,
                                                     tmp_path: Path) -> None:
    # "background": started by a script with `&`, which leaves SIGINT ignored
    # (the pool's master handles INT whatever it inherited; so does --single).
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mps", "serve", "apps:hold", "--single", "--backend",
             backend, "--bind", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(TESTS),
            preexec_fn=_ignore_sigint if started == "background" else None)
    client = None
    try:
        port = _listening_port(log)
        if busy:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert client.recv(64) == b"%d\n" % proc.pid     # the handler holds it now
        proc.send_signal(signal.SIGINT)                     # what Ctrl-C sends
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in log.read_text()


# ----------------------------------------------------------------- --daemon and inherited fds


def _daemon(tmp_path: Path, bind: str, pass_fds: list[int]) -> tuple[int, Path]:
    """Launch ``mps serve --daemon``; the daemon's pid and its log file."""
    pid_file = tmp_path / "mps.pid"
    log = tmp_path / "mps.log"
    launcher = subprocess.run(
        [sys.executable, "-m", "mps", "serve", "--daemon", "--bind", bind, "--pid-file",
         str(pid_file), "--log-file", str(log), *SMALL],
        pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, timeout=30, cwd=str(TESTS))
    assert launcher.returncode == 0, launcher.stderr
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                         what="the pid file"))
    return pid, log


def _fd_targets(pid: int) -> set[str]:
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def test_daemon_closes_descriptors_inherited_from_the_launcher(tmp_path: Path) -> None:
    # `out=$(mps serve --daemon ...)`, a CI step, `ssh host mps serve --daemon`:
    # the launcher's pipe must reach EOF once the launcher exits, not when
    # the daemon does.
    read_end, write_end = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{write_end}")
    try:
        pid, log = _daemon(tmp_path, "127.0.0.1:0", pass_fds=[write_end])
        os.close(write_end)
        write_end = -1
        try:
            os.set_blocking(read_end, False)

            def eof() -> bool:
                try:
                    return os.read(read_end, 1) == b""
                except BlockingIOError:
                    return False
            wait_until(eof, timeout=5, what="EOF on the launcher's pipe")
            port = _listening_port(log)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"hi")
                assert recv_all(s).endswith(b": hi")
            for p in (pid, *children_of(pid)):
                assert pipe not in _fd_targets(p), p
        finally:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_daemon_keeps_an_inherited_listener(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    try:
        pid, log = _daemon(tmp_path, f"fd://{listener.fileno()}", [listener.fileno()])
        try:
            wait_until(lambda: "listening at" in log.read_text(), what="the daemon's log")
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"hi")
                    reply = recv_all(s)
                assert reply.endswith(b": hi") and int(reply.split(b":")[0]) != os.getpid()
        finally:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
    finally:
        listener.close()
