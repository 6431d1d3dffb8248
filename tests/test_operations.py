"""Operating mps: daemon, pid file, logs, the Server API, debug mode, backends."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TESTS, pid_alive, recv_all, wait_until

SMALL = ["--start-servers", "2", "--min-spare", "1", "--max-spare", "2", "--max-children", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int, payload: bytes = b"hi", family: int = socket.AF_INET,
         host: str = "127.0.0.1") -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(payload)
        return recv_all(s)


def serve(args: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
    kw.setdefault("cwd", str(TESTS))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mps", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)  # type: ignore[call-overload]


def listening_port(log: Path) -> int:
    def port() -> int | None:
        if not log.exists():
            return None
        m = re.search(r"listening at [^ ]*:(\d+)", log.read_text(errors="replace"))
        return int(m.group(1)) if m else None
    return int(wait_until(port, what="the master to log its address"))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Teardown: kill the session we started, whatever happened."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def test_port_zero_logs_the_real_address_with_pid_and_slot(tmp_path):
    log = tmp_path / "out.log"
    proc = serve(["serve", "--bind", "127.0.0.1:0", *SMALL], log)
    try:
        port = listening_port(log)
        assert echo(port).endswith(b": hi")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    text = log.read_text()
    assert re.search(r"^\S+ \S+ \[%d\] \[master\] INFO " % proc.pid, text, re.M)


def test_ipv6_loopback_bind(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    log = tmp_path / "out.log"
    proc = serve(["serve", "--bind", "[::1]:0", *SMALL], log)
    try:
        port = listening_port(log)
        assert echo(port, family=socket.AF_INET6, host="::1").endswith(b": hi")
    finally:
        stop(proc)


def test_daemon_writes_and_removes_the_pid_file(tmp_path):
    pid_file = tmp_path / "mps.pid"
    log = tmp_path / "mps.log"
    port = free_port()
    launcher = subprocess.run(
        [sys.executable, "-m", "mps", "serve", "--bind", f"127.0.0.1:{port}", "--daemon",
         "--pid-file", str(pid_file), "--log-file", str(log), *SMALL],
        capture_output=True, timeout=30, cwd=str(TESTS))
    assert launcher.returncode == 0, launcher.stderr
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                         what="the pid file"))
    try:
        assert pid != launcher.returncode and pid_alive(pid)
        assert os.getsid(pid) != os.getsid(0)      # detached from our session
        wait_until(lambda: "listening at" in log.read_text(), what="the log file")
        reply = wait_until(lambda: _try_echo(port), what="the daemon to serve")
        assert reply.endswith(b": hi")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), what="the daemon to stop")
        assert not pid_file.exists()
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _try_echo(port: int) -> bytes | None:
    try:
        return echo(port)
    except OSError:
        return None


def test_server_api_script_with_argv_and_env(tmp_path):
    script = tmp_path / "myapp.py"
    script.write_text(textwrap.dedent("""
        import os
        import mps

        app = mps.Server(start_servers=2, min_spare=1, max_spare=2, max_children=3)

        @app.handler
        def handle(conn, addr):
            conn.sendall(b"api %d: %s" % (os.getpid(), conn.recv(64)))

        if __name__ == "__main__":
            app.run()
    """))
    log = tmp_path / "out.log"
    status = tmp_path / "st.sock"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--bind", "127.0.0.1:0", "--status-socket", str(status)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MPS_MAX_CHILDREN": "9", "MPS_GRACEFUL_TIMEOUT": "7"})
    try:
        port = listening_port(log)
        assert echo(port).startswith(b"api ")
        from mps.status import query
        settings = query(str(status))["settings"]
        assert settings["max_children"] == 3        # keyword beats environment
        assert settings["graceful_timeout"] == 7.0  # environment beats default
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)


def test_server_run_refuses_bad_settings_with_exit_2(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import mps\napp = mps.Server(min_spare=9, max_spare=3)\n"
                      "app.handler(lambda c, a: None)\napp.run()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "min_spare" in r.stderr and "Traceback" not in r.stderr


def test_single_process_debug_mode(tmp_path):
    log = tmp_path / "out.log"
    proc = serve(["serve", "--single", "--bind", "127.0.0.1:0"], log)
    try:
        port = listening_port(log)
        assert echo(port) == b"%d: hi" % proc.pid     # served by the process itself
        assert echo(port, b"again") == b"%d: again" % proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)


def test_backend_c_missing_is_a_clear_error(tmp_path):
    code = ("import sys; sys.modules['mps._mpscore'] = None\n"
            "from mps.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "serve", "--backend", "c", "--bind",
                        "127.0.0.1:0", *SMALL], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "backend 'c' is not available" in r.stderr and "Traceback" not in r.stderr


def test_backend_auto_falls_back_to_python_and_says_so_once(tmp_path):
    code = ("import sys; sys.modules['mps._mpscore'] = None\n"
            "from mps.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    log = tmp_path / "out.log"
    status = tmp_path / "st.sock"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--bind", "127.0.0.1:0",
                                 "--status-socket", str(status), *SMALL],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = listening_port(log)
        assert echo(port).endswith(b": hi")
        from mps.status import query
        assert query(str(status))["backend"] == "python"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    assert log.read_text().count("using the pure-Python scoreboard") == 1


def test_hup_reopens_the_log_file(tmp_path):
    log = tmp_path / "mps.log"
    rotated = tmp_path / "mps.log.1"
    out = tmp_path / "out.log"
    proc = serve(["serve", "--bind", "127.0.0.1:0", "--log-file", str(log), *SMALL], out)
    try:
        port = listening_port(log)
        assert echo(port).endswith(b": hi")
        log.rename(rotated)                     # what logrotate does
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.exists() and "HUP: log reopened" in log.read_text(),
                   what="a fresh log file")
        assert echo(port).endswith(b": hi")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    assert "listening at" in rotated.read_text()
    assert "exiting" in log.read_text()


def test_inherited_listener_is_handed_back_open_after_a_graceful_stop(tmp_path):
    # systemd-style socket handoff: the listener outlives each master.  A
    # graceful stop must not leave it refusing connections for the next one.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    args = ["serve", "--bind", f"fd://{fd}", *SMALL]
    try:
        first = serve(args, tmp_path / "first.log", pass_fds=[fd])
        try:
            wait_until(lambda: _try_echo(port), what="the first master")
            first.send_signal(signal.SIGTERM)
            assert first.wait(15) == 0
        finally:
            stop(first)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)  # queued, not dropped
        with waiting:
            waiting.sendall(b"between")
            second = serve(args, tmp_path / "second.log", pass_fds=[fd])
            try:
                assert recv_all(waiting).endswith(b": between")
            finally:
                stop(second)
    finally:
        listener.close()


# ----------------------------------------------------------------- every README form alike

MYAPP = textwrap.dedent("""
    import os
    import mps

    app = mps.Server(start_servers=3, min_spare=1, max_spare=3, max_children=5,
                     max_requests=77)

    def note(line):
        with open(os.environ["MYAPP_HOOK_LOG"], "a") as f:
            f.write(line + "\\n")

    @app.handler
    def handle(conn, addr):
        conn.sendall(b"myapp %d: %s" % (os.getpid(), conn.recv(64)))

    @app.on_starting
    def starting(server):
        note("on_starting %d %s" % (os.getpid(), server is app))

    @app.post_fork
    def forked(server, worker):
        note("post_fork %d" % worker.pid)

    if __name__ == "__main__":
        app.run()
""")

# What README "Writing a handler" shows, run from the app's folder (or its parent).
README_FORMS = {
    "python myapp.py": ["{python}", "myapp.py"],
    "mps serve myapp:app": ["{python}", "-m", "mps", "serve", "myapp:app"],
    "mps serve myapp:handle": ["{python}", "-m", "mps", "serve", "myapp:handle"],
    "mps serve path/to/myapp.py:handle": ["{python}", "-m", "mps", "serve",
                                          "path/to/myapp.py:handle"],
}


@pytest.mark.parametrize("form", list(README_FORMS))
def test_every_readme_form_runs_the_apps_server_settings_and_hooks(form, tmp_path):
    # `mps serve myapp:handle` used to serve the bare function: 32 children,
    # max_requests 128, and none of the hooks.
    folder = tmp_path / "path" / "to" if "path/to" in form else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "myapp.py").write_text(MYAPP)
    hooks = tmp_path / "hooks.log"
    status = tmp_path / "st.sock"
    log = tmp_path / "out.log"
    cmd = [sys.executable if a == "{python}" else a for a in README_FORMS[form]]
    cwd = folder if form == "python myapp.py" else tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPS_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--bind", "127.0.0.1:0", "--status-socket", str(status)], cwd=str(cwd),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**env, "MYAPP_HOOK_LOG": str(hooks)})
    try:
        port = listening_port(log)
        assert echo(port).startswith(b"myapp ")
        from mps.status import query
        settings = wait_until(lambda: _settings_once_full(str(status)),
                              what="three children")
        assert (settings["start_servers"], settings["max_requests"],
                settings["max_children"]) == (3, 77, 5)
        lines = wait_until(lambda: hooks.read_text().splitlines() if hooks.exists() and
                           hooks.read_text().count("post_fork") >= 3 else None,
                           what="the post_fork hooks")
        assert f"on_starting {proc.pid} True" in lines
        assert query(str(status))["children"]["total"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    assert "(backend " in log.read_text() and "WARNING" not in log.read_text()


def _settings_once_full(path: str) -> dict[str, object] | None:
    from mps.status import query
    try:
        doc = query(path)
    except Exception:
        return None
    return doc["settings"] if doc["children"]["idle"] >= 3 else None  # type: ignore[no-any-return]


def test_a_handler_shared_by_two_servers_is_served_alone_and_says_so_at_debug(tmp_path):
    (tmp_path / "two.py").write_text(textwrap.dedent("""
        import os
        import mps

        def handle(conn, addr):
            conn.sendall(b"two %d: %s" % (os.getpid(), conn.recv(64)))

        fast = mps.Server(handle, max_requests=5)
        slow = mps.Server(handle, max_requests=500)
    """))
    status = tmp_path / "st.sock"
    log = tmp_path / "out.log"
    proc = serve(["serve", "two:handle", "--bind", "127.0.0.1:0", "--status-socket",
                  str(status), "--log-level", "debug", *SMALL], log, cwd=str(tmp_path))
    try:
        port = listening_port(log)
        assert echo(port).startswith(b"two ")
        from mps.status import query
        assert query(str(status))["settings"]["max_requests"] == 128   # neither Server's
    finally:
        stop(proc)
    note = [line for line in log.read_text().splitlines() if "Servers (" in line]
    assert len(note) == 1 and "DEBUG" in note[0], log.read_text()
    assert "fast, slow" in note[0] and "two:fast" in note[0], note


def test_server_run_without_a_handler_is_one_line_and_exit_4(tmp_path):
    script = tmp_path / "nohandler.py"
    script.write_text("import mps\nmps.Server(start_servers=1).run()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 4, r.stderr
    assert r.stderr.count("\n") == 1 and "handler" in r.stderr and "Traceback" not in r.stderr
