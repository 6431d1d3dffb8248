"""The command line as an operator meets it: ``python -m mps ...`` in a real
process, exit statuses of SPEC §8, one line on stderr and never a traceback
for an operator mistake."""
from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import mps
from conftest import APPS, Master, Result, run_mps

TIMEOUT = 30.0
from mps.scoreboard import c_available

def assert_one_line(r: Result, code: int, *needles: str) -> str:
    """Exit ``code`` with exactly one stderr line containing every needle."""
    assert "Traceback" not in r.err, r.err
    assert r.code == code, f"exit {r.code}, stderr:\n{r.err}"
    assert len(r.err_lines) == 1, f"want one line on stderr, got:\n{r.err}"
    line = r.err_lines[0]
    for needle in needles:
        assert needle in line, line
    return line


# Where a bug would let a refused command start serving, keep it harmless.
SAFE = ("--bind", "127.0.0.1:0", "--start-servers", "0", "--min-spare", "0")


# ----------------------------------------------------------------- settings: exit 2


@pytest.mark.parametrize("args, name", [
    (["--min-spare", "40", "--max-spare", "10"], "min_spare"),
    (["--backlog", "-1"], "backlog"),
    (["--bind", "nonsense"], "bind"),
    (["--bind", "127.0.0.1:99999"], "bind"),
    (["--bind", "unix:"], "bind"),
    (["--backend", "rust"], "backend"),
    (["--max-children", "abc"], "max_children"),
    (["--start-servers", "65"], "start_servers"),
    (["--max-children", "100", "--backlog", "50", "--start-servers", "1"], "max_children"),
    (["--timeout", "-1"], "timeout"),
    (["--graceful-timeout", "soon"], "graceful_timeout"),
    (["--max-requests", "-3"], "max_requests"),
    (["--log-level", "loud"], "log_level"),
    (["--pid-file", "/nonexistent/dir/mps.pid"], "pid_file"),
])
def test_bad_setting_flag_exits_2_with_one_line(args: list[str], name: str,
                                                tmp_path: Path) -> None:
    r = run_mps("serve", *args, cwd=tmp_path)
    assert_one_line(r, 2, f"setting {name}=")
    assert r.out == ""


@pytest.mark.parametrize("env, args, name, unparsable", [
    ({"MPS_BACKLOG": "x"}, [], "backlog", True),
    ({"MPS_MAX_CHILDREN": "many"}, [], "max_children", True),
    ({"MPS_DAEMON": "perhaps"}, [], "daemon", True),
    ({"MPS_MIN_SPARE": "40"}, ["--max-spare", "10"], "min_spare", False),
    ({"MPS_BIND": "localhost"}, [], "bind", False),
])
def test_bad_setting_in_the_environment_exits_2_with_one_line(
        env: dict[str, str], args: list[str], name: str, unparsable: bool,
        tmp_path: Path) -> None:
    r = run_mps("serve", *args, env=env, cwd=tmp_path)
    line = assert_one_line(r, 2, f"setting {name}=")
    if unparsable:
        assert next(iter(env)) in line     # names where the bad text came from


def test_backlog_beyond_a_c_int_is_a_setting_error(tmp_path: Path) -> None:
    # Accepted by the table today, then listen() raises OverflowError, which
    # is not an OSError: the operator gets a traceback and exit 1.
    r = run_mps("serve", "--backlog", "3000000000", "--max-children", "2", "--max-spare", "1",
                *SAFE, cwd=tmp_path)
    assert_one_line(r, 2, "backlog")


@pytest.mark.skipif(not c_available(), reason="the C core is not built")
def test_huge_pools_are_refused_by_name_before_binding(tmp_path: Path) -> None:
    # backlog is capped at 65535 (the kernel's own ceiling) and max_children by
    # backlog, so no pool can exceed what the scoreboard can map.
    r = run_mps("serve", "--backend", "c", "--max-children", "2000000",
                "--backlog", "2000000", "--max-spare", "1", *SAFE, cwd=tmp_path)
    assert_one_line(r, 2, "backlog", "65535")
    r = run_mps("serve", "--max-children", "2000", "--max-spare", "1", *SAFE, cwd=tmp_path)
    assert_one_line(r, 2, "max_children", "backlog")


# ----------------------------------------------------------------- usage: exit 2


@pytest.mark.parametrize("args, needle", [
    (["serve", "--nope"], "--nope"),
    (["serve", "--max-spare"], "--max-spare"),
    (["frobnicate"], "frobnicate"),
    ([], "command"),
    (["status"], "PATH"),
])
def test_usage_mistakes_exit_2_with_one_line(args: list[str], needle: str,
                                             tmp_path: Path) -> None:
    r = run_mps(*args, cwd=tmp_path)
    assert_one_line(r, 2, needle)


def test_version() -> None:
    r = run_mps("--version")
    assert r.code == 0, r.err
    assert r.out.strip() == f"mps {mps.__version__}"


# ----------------------------------------------------------------- app: exit 4


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_spec, needles", [
    (lambda d: "nosuchmodule:x", ["nosuchmodule"]),
    (lambda d: "missing.py:h", ["missing.py"]),
    (lambda d: "no_colon_here", ["no_colon_here"]),
    (lambda d: str(write(d / "raises.py", "raise RuntimeError('broken at import')\n"))
     + ":handle", ["RuntimeError", "broken at import"]),
    (lambda d: str(write(d / "syntax.py", "def handle(conn, addr)\n    pass\n")) + ":handle",
     ["SyntaxError"]),
    (lambda d: str(write(d / "exits.py", "import sys\nsys.exit(3)\n")) + ":handle",
     ["exits.py"]),
    (lambda d: f"{APPS}:nothere", ["nothere"]),
    (lambda d: f"{APPS}:not_callable", ["not callable"]),
    (lambda d: "mps.examples:nothere", ["nothere"]),
])
def test_app_that_cannot_be_loaded_exits_4_with_one_line(
        make_spec: Callable[[Path], str], needles: list[str], tmp_path: Path) -> None:
    r = run_mps("serve", make_spec(tmp_path), *SAFE, cwd=tmp_path)
    assert_one_line(r, 4, *needles)
    assert r.out == ""


# ----------------------------------------------------------------- runtime: exit 1


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_mps("serve", "--bind", f"127.0.0.1:{port}", "--start-servers", "0",
                    "--min-spare", "0", cwd=tmp_path)
    finally:
        taken.close()
    assert_one_line(r, 1, "in use", str(port))


def test_status_of_a_missing_socket_exits_1_with_one_line(tmp_path: Path) -> None:
    r = run_mps("status", "/nonexistent/path", cwd=tmp_path)
    assert_one_line(r, 1, "/nonexistent/path")
    assert r.out == ""


def test_status_of_a_dead_masters_socket_exits_1_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(str(path))           # bound, never listening: connect is refused
        r = run_mps("status", str(path), "--json", cwd=tmp_path)
    finally:
        stale.close()
    assert_one_line(r, 1, str(path))


def test_status_of_a_socket_that_answers_garbage_exits_1_with_one_line(
        tmp_path: Path) -> None:
    path = str(tmp_path / "garbage.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(TIMEOUT)

    def answer() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"this is not json")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        r = run_mps("status", path, cwd=tmp_path)
    finally:
        thread.join(TIMEOUT)
        server.close()
    assert_one_line(r, 1, path)


# ----------------------------------------------------------------- status of a live master


STATES = {"starting", "idle", "busy", "exiting"}
TOTALS = {"connections", "spawned", "reaped", "crashed", "recycled", "timed_out",
          "max_children_reached", "counter_repairs"}


def started(start_master: Callable[..., Master], backend: str) -> Master:
    m = start_master(backend=backend, start_servers=2, min_spare=1, max_spare=3,
                     max_children=4, max_requests=0)
    m.wait_ready()
    assert m.echo(b"hi").endswith(b": hi")
    return m


def test_status_json_against_a_running_master(start_master: Callable[..., Master],
                                              backend: str, tmp_path: Path) -> None:
    m = started(start_master, backend)
    r = run_mps("status", m.status_path, "--json", cwd=tmp_path)
    assert r.code == 0, r.err
    assert r.err == ""
    doc = json.loads(r.out)

    assert isinstance(doc["pid"], int) and doc["pid"] == m.pid
    assert doc["backend"] == backend
    assert isinstance(doc["uptime_s"], (int, float)) and doc["uptime_s"] >= 0

    settings = doc["settings"]
    assert isinstance(settings, dict)
    assert (settings["min_spare"], settings["max_spare"], settings["max_children"]) == (1, 3, 4)
    assert settings["start_servers"] == 2

    children = doc["children"]
    assert set(children) >= {"total", "idle", "busy", "starting", "exiting"}
    assert all(isinstance(children[k], int) and children[k] >= 0 for k in children)
    assert children["total"] == sum(children[s] for s in STATES)
    assert 1 <= children["total"] <= 4
    assert isinstance(doc["idle_counter"], int)
    assert doc["idle_counter"] == children["idle"]     # one snapshot: consistent

    totals = doc["totals"]
    assert set(totals) >= TOTALS
    assert all(isinstance(totals[k], int) and totals[k] >= 0 for k in TOTALS)
    assert totals["connections"] >= 1
    assert totals["spawned"] >= 2
    assert totals["counter_repairs"] == 0

    slots = doc["slots"]
    assert isinstance(slots, list) and len(slots) == children["total"]
    live = m.child_pids()
    for s in slots:
        assert set(s) >= {"slot", "pid", "state", "connections", "state_age_s"}
        assert isinstance(s["slot"], int) and 0 <= s["slot"] < 4
        assert isinstance(s["pid"], int) and s["pid"] in live
        assert s["state"] in STATES
        assert isinstance(s["connections"], int) and s["connections"] >= 0
        assert isinstance(s["state_age_s"], (int, float)) and s["state_age_s"] >= 0
    assert len({s["slot"] for s in slots}) == len(slots)
    assert sum(s["connections"] for s in slots) <= totals["connections"]
    assert sum(1 for s in slots if s["state"] == "idle") == children["idle"]


def test_status_plain_has_a_scoreboard_line(start_master: Callable[..., Master],
                                            backend: str, tmp_path: Path) -> None:
    m = started(start_master, backend)
    r = run_mps("status", m.status_path, cwd=tmp_path)
    assert r.code == 0, r.err
    assert f"mps master {m.pid}" in r.out
    boards = [line for line in r.out.splitlines() if line.startswith("scoreboard")]
    assert len(boards) == 1, r.out
    match = re.fullmatch(r"scoreboard\s+([._SWG]+)", boards[0].rstrip())
    assert match, boards[0]
    board = match.group(1)
    assert len(board) == 4                  # one character per slot (max_children)
    assert board.count("_") >= 1
    assert board.count(".") + board.count("_") + board.count("W") + board.count("S") \
        + board.count("G") == 4


def test_an_unknown_server_keyword_in_the_app_is_a_setting_error(tmp_path: Path) -> None:
    app = tmp_path / "kwapp.py"
    app.write_text("import mps\napp = mps.Server(no_such_setting=1)\n"
                   "@app.handler\ndef handle(conn, addr):\n    pass\n")
    result = run_mps("serve", f"{app}:app", cwd=tmp_path)
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "no_such_setting" in result.err
