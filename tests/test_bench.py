"""Each `mps bench` subcommand runs on a tiny configuration and emits
well-formed output, from a directory outside the checkout, against the
installed package.  Speed itself is measured by the benchmarks, never here."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mps
from mps.scoreboard import c_available

Bench = Callable[..., "subprocess.CompletedProcess[str]"]

FLAGS = {
    "locks": ["--procs", "--seconds", "--reps", "--json"],
    "serve": ["--clients", "--seconds", "--reps", "--kinds", "--json"],
    "http": ["--clients", "--seconds", "--reps", "--servers", "--shapes", "--uwsgi", "--json"],
    "spike": ["--clients", "--backend", "--plot", "--settings", "--json"],
    "scale": ["--sizes", "--reps", "--status-every", "--idle-seconds", "--load-clients",
              "--load-seconds", "--plot", "--json"],
}
HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
               or shutil.which("clang"))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="mps bench serve needs a C compiler")


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the session: each C program is built once."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture
def bench(tmp_path: Path, bench_cache: Path) -> Bench:
    """Run `mps bench ARGS` with a temporary, empty working directory."""
    def run(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "MPS_BENCH_CACHE": str(bench_cache), **env}
        full_env.pop("MPS_BENCH_DIR", None)
        return subprocess.run([sys.executable, "-m", "mps", "bench", *args],
                              capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=str(tmp_path))
    return run


def flags_without_help(help_text: str) -> list[str]:
    """The option entries of an argparse --help text that have no help line."""
    lines = help_text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if m and not m.group(2):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.match(r"^ {6,}[^ -]", following):    # help wrapped to the next line
                bare.append(m.group(1))
    return bare


def test_bench_help_lists_every_subcommand(bench: Bench) -> None:
    r = bench("--help")
    assert r.returncode == 0, r.stderr
    for name in FLAGS:
        assert re.search(rf"^ +{name} +\w", r.stdout, re.M), f"{name} not listed:\n{r.stdout}"
    assert "MPS_BENCH_CACHE" in r.stdout


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_bench_flag_has_a_help_line(bench: Bench, command: str) -> None:
    r = bench(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: mps bench {command}")
    for flag in FLAGS[command]:
        assert re.search(rf"^  {flag}\b", r.stdout, re.M), f"{flag} missing:\n{r.stdout}"
    assert flags_without_help(r.stdout) == [], r.stdout


def test_flags_without_help_finds_a_bare_flag() -> None:
    text = "options:\n  -h, --help  show help\n  --bare\n  --long-one {a,b}\n" \
           "                        wrapped help\n  --x X       help\n"
    assert flags_without_help(text) == ["--bare"]


def test_bench_locks_runs_outside_the_checkout(bench: Bench, bench_cache: Path) -> None:
    r = bench("locks", "--procs", "1,2", "--seconds", "0.05", "--reps", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ns per accounting operation")
    columns = lines[1].split()
    assert columns[0] == "procs" and "python" in columns
    rows = [line.split() for line in lines[2:] if re.match(r"^ +\d+ ", line)]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert len(row) == len(columns) and all(float(v) > 0 for v in row[1:])
    package = Path(mps.__file__).parent
    assert [p.name for p in package.rglob("lockbench*")] == ["lockbench.c"], \
        "compiled into the installed package"
    if c_available() and HAVE_CC:
        assert list(bench_cache.glob("lockbench-*")), "lockbench not compiled into the cache"


def test_bench_locks_json_shape_and_no_lost_updates(bench: Bench) -> None:
    r = bench("locks", "--procs", "1,2", "--seconds", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"results", "machine"}
    assert doc["machine"]["nproc"] == os.cpu_count()
    rows = doc["results"]
    expected = {"python"} | ({"c", "cffi-floor"} if c_available() else set()) \
        | ({"c-raw"} if c_available() and HAVE_CC else set())
    for procs in (1, 2):
        mine = {r["backend"]: r for r in rows if r["procs"] == procs}
        assert set(mine) == expected
        for row in mine.values():
            assert set(row) == {"backend", "procs", "ns_per_op"}
            assert isinstance(row["ns_per_op"], float) and row["ns_per_op"] > 0


def test_without_a_compiler_serve_says_so_in_one_line_and_locks_runs(
        bench: Bench, tmp_path: Path) -> None:
    empty_cache = str(tmp_path / "empty-cache")
    r = bench("serve", "--clients", "2", "--seconds", "0.1", "--reps", "1",
              CC="/bin/false", MPS_BENCH_CACHE=empty_cache)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no working C compiler" in r.stderr and "/bin/false" in r.stderr

    r = bench("locks", "--procs", "1", "--seconds", "0.05", "--reps", "1", "--json",
              CC="/bin/false", MPS_BENCH_CACHE=empty_cache)
    assert r.returncode == 0, r.stderr
    backends = {row["backend"] for row in json.loads(r.stdout)["results"]}
    assert backends == {"python"} | ({"c", "cffi-floor"} if c_available() else set())
    if c_available():       # only then would the C-only floor have been tried
        assert r.stderr.count("\n") == 1, r.stderr
        assert "c-raw (the C-only floor) skipped: no working C compiler" in r.stderr
    assert not [p for p in Path(empty_cache).rglob("*") if p.is_file()]


@needs_cc
def test_bench_serve_runs_every_server_kind(bench: Bench) -> None:
    r = bench("serve", "--clients", "2", "--seconds", "0.3", "--reps", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kinds = {row["kind"] for row in doc["results"]}
    assert kinds == {"c-ref", "mps-python", "py-naive"} | ({"mps-c"} if c_available() else set())
    for row in doc["results"]:
        assert row["conns"] > 0 and row["errors"] == 0, row
        assert row["cpu_us_per_conn"] >= 0 and row["p50_us"] <= row["p99_us"]


@needs_cc
def test_bench_serve_report_has_ratio_tables(bench: Bench) -> None:
    r = bench("serve", "--clients", "2", "--seconds", "0.2", "--reps", "1",
              "--kinds", "c-ref,mps-python")
    assert r.returncode == 0, r.stderr
    assert "| mps-python |" in r.stdout and "CPU ratio to c-ref" in r.stdout


def test_bench_spike_accepts_the_whole_burst(bench: Bench) -> None:
    r = bench("spike", "--clients", "8", "--json", "--settings",
              "--start-servers 2 --min-spare 1 --max-spare 4 --max-children 8 --backlog 64")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["accepted"] == 8 and doc["all_accepted_s"] > 0
    totals = [total for _, total in doc["children_over_time"]]
    assert max(totals) == 8 and totals[0] < 8      # the pool grew to absorb the burst
    assert len(doc["accepted_at_s"]) == 8


@needs_cc
def test_bench_serve_reports_the_ratio_to_py_naive_and_the_targets(bench: Bench) -> None:
    r = bench("serve", "--clients", "2", "--seconds", "0.2", "--reps", "1",
              "--kinds", "mps-python,py-naive,c-ref")
    assert r.returncode == 0, r.stderr
    assert "CPU ratio to py-naive" in r.stdout and "conn/s ratio to py-naive" in r.stdout
    table = r.stdout[r.stdout.index("### targets"):].splitlines()
    rows = [line.split("|")[1:-1] for line in table if line.startswith("| ")][1:]
    assert [cells[0].strip() for cells in rows] == [
        "CPU per connection mps-c / py-naive", "connections/s mps-c / c-ref"]
    # mps-c did not run: its targets are skipped, not invented.
    assert all(cells[-1].strip() == "SKIP" for cells in rows), rows


SCALE_KEYS = {"size", "rep", "startup", "memory", "idle", "master", "load", "spike"}


@needs_cc
@pytest.mark.skipif(not c_available(), reason="mps bench scale runs the C backend")
def test_bench_scale_tiny_json_and_report(bench: Bench, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    r = bench("scale", "--sizes", "4,8", "--idle-seconds", "0.5", "--load-clients", "4",
              "--load-seconds", "0.3", "--json", "--plot", str(plots), timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"results", "naive", "targets", "settings", "machine"}
    assert doc["settings"]["sizes"] == [4, 8]
    assert [row["size"] for row in doc["results"]] == [4, 8]
    for row in doc["results"]:
        n = row["size"]
        assert SCALE_KEYS <= set(row), SCALE_KEYS - set(row)
        polls = [s["poll"] for s in row["startup"]]
        assert polls == ["status", "board"], polls
        for s in row["startup"]:
            assert 0 < s["first_child_s"] <= s["all_forked_s"] <= s["all_idle_s"]
            counts = [c for _, c, _ in s["series"]]
            assert max(counts) == n and counts == sorted(counts)    # forks only, no exits
        assert row["memory"]["children"] == n
        assert 0 < row["memory"]["uss_kib_min"] <= row["memory"]["uss_kib"] \
            <= row["memory"]["uss_kib_max"]
        assert row["memory"]["child_private_by_mapping_kib"]
        assert row["idle"]["children"] == n and row["idle"]["children_gone"] == 0
        assert row["idle"]["total_pct"] >= row["idle"]["master_pct"] >= 0
        master = row["master"]
        assert len(master["status_latency_ms"]) == 10
        assert master["c_only"]["snapshot_ns"]["count"] == 2000
        watch = master["lock_watch"]
        if watch is not None:       # glibc: the master's holds were seen (timed or not)
            assert watch["master_holds_ns"]["count"] + watch["holds_not_timed"] > 0, watch
        load = row["load"]
        assert load["conns"] > 0 and load["errors"] == 0 and load["cpu_us_per_conn"] > 0
        assert load["lock_wait_ns"]["count"] > 0
        spike = row["spike"]
        assert spike["accepted"] == n and spike["all_accepted_s"] > 0
        assert spike["children_at_burst"] < spike["children_peak"] == n
    assert doc["naive"]["py-naive"]["uss_kib"] > 0 and doc["naive"]["py-minimal"]["uss_kib"] > 0
    statuses = {(t["target"], t["size"]): t["status"] for t in doc["targets"]}
    assert len(statuses) == 4 * 2 and set(statuses.values()) <= {"PASS", "MISS", "SKIP"}
    assert sorted(p.name for p in plots.glob("*.png")) == [
        "scale-idle-cpu.png", "scale-load.png", "scale-memory.png", "scale-spike.png",
        "scale-startup.png"] or "no plots" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["nonsense"], ["locks", "serve", "http", "spike", "scale"]),
    ([], ["locks", "serve", "http", "spike", "scale"]),
    (["scale", "--sizes", "0"], ["--sizes"]),
    (["scale", "--status-every", "0.1,x"], ["--status-every"]),
    (["locks", "--procs", "0"], ["--procs"]),
    (["locks", "--seconds", "nan"], ["--seconds"]),
    (["serve", "--kinds", "c-ref,apache"], ["--kinds", "apache"]),
    (["spike", "--backend", "rust"], ["--backend"]),
    (["http", "--servers", "mps,apache"], ["--servers", "apache"]),
    (["http", "--shapes", "close,close"], ["--shapes"]),
])
def test_bench_usage_error_is_one_line(bench: Bench, args: list[str], words: list[str]) -> None:
    r = bench(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert all(word in r.stderr for word in words), r.stderr


# --------------------------------------------------------------- http

HTTP_ROW_KEYS = {"kind", "server", "shape", "rep", "requests", "requests_per_s", "errors",
                 "cpu_us_per_req", "p50_us", "p99_us", "connections", "retries", "unfinished",
                 "per_client", "min_per_client", "zero_clients", "max_gap_us", "uss_kib",
                 "pss_kib", "uss_kib_fresh", "workers", "loadgen_cpu_us_per_req",
                 "idle_us_per_req"}


@needs_cc
def test_bench_http_mps_alone_json(bench: Bench) -> None:
    r = bench("http", "--servers", "mps", "--clients", "4", "--seconds", "0.5", "--reps", "1",
              "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"results", "targets", "settings", "machine"}
    assert doc["settings"]["servers"] == ["mps"]
    rows = doc["results"]
    assert sorted(row["shape"] for row in rows) == ["close", "keepalive"]
    for row in rows:
        assert HTTP_ROW_KEYS <= set(row), HTTP_ROW_KEYS - set(row)
        assert row["kind"] == "mps" and row["rep"] == 0
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["cpu_us_per_req"] > 0 and row["p50_us"] <= row["p99_us"]
        counts = row["per_client"]
        assert len(counts) == 4 and sum(counts) <= row["requests"]
        assert row["min_per_client"] == min(counts)
        assert row["zero_clients"] == counts.count(0)
        assert row["workers"] == 4 and 0 < row["uss_kib"] <= row["pss_kib"] * 4
        assert row["uss_kib_fresh"] > 0
        # The loadgen makes a connection per request or writes one per
        # response: it never costs nothing.
        assert row["loadgen_cpu_us_per_req"] > 0 and row["idle_us_per_req"] >= 0
    close = next(row for row in rows if row["shape"] == "close")
    assert close["connections"] == close["requests"]    # one connection per request
    statuses = {(t["target"], t["shape"]): t["status"] for t in doc["targets"]}
    assert set(statuses.values()) <= {"PASS", "MISS", "SKIP"}
    # Ratios to servers that did not run are skipped, not invented.
    for (target, _), status in statuses.items():
        if "gunicorn" in target or "uwsgi" in target:
            assert status == "SKIP", (target, status)
        else:
            assert status in ("PASS", "MISS"), (target, status)


@needs_cc
def test_bench_http_report_and_a_missing_uwsgi_in_one_line(bench: Bench, tmp_path: Path) -> None:
    r = bench("http", "--servers", "mps,uwsgi", "--uwsgi", str(tmp_path / "no-uwsgi"),
              "--shapes", "close", "--clients", "2", "--seconds", "0.3", "--reps", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "uWSGI skipped" in r.stderr, r.stderr
    assert "no-uwsgi" in r.stderr
    assert "\n| mps |" in r.stdout and "\n| uwsgi" not in r.stdout
    cores = r.stdout[r.stdout.index("### where the CPU went"):].splitlines()
    mps_row = next(line for line in cores if line.startswith("| mps |")).split("|")[1:-1]
    assert len(mps_row) == 5 and all(float(c) >= 0 for c in mps_row[2:]), mps_row
    table = r.stdout[r.stdout.index("### targets"):].splitlines()
    rows = [line.split("|")[1:-1] for line in table if line.startswith("| ")][1:]
    assert rows, r.stdout
    for cells in rows:
        assert len(cells) == 5 and cells[-1].strip() in ("PASS", "MISS", "SKIP"), cells
    statuses = {cells[0].strip(): cells[-1].strip() for cells in rows}
    assert statuses["mps USS per idle worker after the load, MiB"] in ("PASS", "MISS")
    assert statuses["mps USS per idle worker freshly started, MiB"] in ("PASS", "MISS")


# --------------------------------------------------------------- the load generator's HTTP modes

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
REPLIES = {
    "ok": OK,
    "not-found": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    "garbage": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
    "extra": OK + b"surprise",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "until-close": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nok",
}


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return b""
        data += chunk
    return data


class TinyServer:
    """A threaded HTTP stand-in whose replies and keep-alive behaviour a test picks:
    ``reply`` for each request, then close, except after OK; on a kept-alive
    connection, after ``answer`` responses, close without answering (0: never)."""

    def __init__(self, reply: bytes, answer: int = 0) -> None:
        self.reply, self.answer = reply, answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        served = 0
        try:
            while request := read_head(conn):
                if self.answer and served == self.answer:
                    break       # an idle keep-alive connection closed under the request
                conn.sendall(self.reply)
                served += 1
                if self.reply != OK or b"connection: close" in request.lower():
                    break       # keep-alive only for the good reply
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(scope="session")
def loadgen(bench_cache: Path) -> str:
    if not HAVE_CC:
        pytest.skip("the load generator needs a C compiler")
    env = {**os.environ, "MPS_BENCH_CACHE": str(bench_cache)}
    out = subprocess.run([sys.executable, "-c", "from mps.bench import build; "
                          "print(build('loadgen'))"], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    return out.stdout.strip()


@pytest.fixture
def tiny() -> Iterator[Callable[..., TinyServer]]:
    servers: list[TinyServer] = []

    def start(reply: bytes, answer: int = 0) -> TinyServer:
        servers.append(TinyServer(reply, answer))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def run_loadgen(program: str, port: int, mode: str, *extra: str) -> dict[str, object]:
    out = subprocess.run([program, "--port", str(port), "--http", mode, "--clients", "2",
                          "--seconds", "0.2", "--timeout", "2", *extra],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


@pytest.mark.parametrize("reply, cause", [
    ("not-found", "status"), ("garbage", "bad_reply"), ("chunked", "bad_reply"),
    ("short", "closed"), ("extra", "bad_reply"), ("two-lengths", "bad_reply"),
])
@pytest.mark.parametrize("mode", ["close", "keepalive"])
def test_loadgen_counts_a_bad_response_as_an_error(
        loadgen: str, tiny: Callable[..., TinyServer], reply: str, cause: str,
        mode: str) -> None:
    doc = run_loadgen(loadgen, tiny(REPLIES[reply]).port, mode)
    causes = doc["causes"]
    assert isinstance(causes, dict)
    assert doc["requests"] == 0 and doc["errors"] == causes[cause] > 0, doc


@pytest.mark.parametrize("reply", ["ok", "until-close"])
def test_loadgen_http_close_one_connection_per_response(
        loadgen: str, tiny: Callable[..., TinyServer], reply: str) -> None:
    doc = run_loadgen(loadgen, tiny(REPLIES[reply]).port, "close")
    assert doc["mode"] == "close" and doc["errors"] == 0, doc
    assert doc["requests"] == doc["connections"] > 0
    per_client = doc["per_client"]
    assert isinstance(per_client, list) and len(per_client) == 2


def test_loadgen_keepalive_reuses_the_connection(
        loadgen: str, tiny: Callable[..., TinyServer]) -> None:
    doc = run_loadgen(loadgen, tiny(OK).port, "keepalive")
    assert doc["errors"] == 0 and doc["retries"] == 0, doc
    assert doc["connections"] == 2 and doc["requests"] > 2
    assert doc["zero_clients"] == 0


def test_loadgen_keepalive_reconnects_and_resends_when_the_server_closes(
        loadgen: str, tiny: Callable[..., TinyServer]) -> None:
    # The server answers once per connection, then closes under the next
    # request: the client resends on a new connection (a retry, not an error).
    doc = run_loadgen(loadgen, tiny(OK, answer=1).port, "keepalive")
    assert doc["errors"] == 0, doc
    requests, retries = doc["requests"], doc["retries"]
    assert isinstance(requests, int) and isinstance(retries, int) and requests > 0
    assert doc["connections"] >= requests and retries >= requests - 2  # 2 clients in flight


def test_loadgen_counts_a_starved_client(loadgen: str) -> None:
    # One connection at a time is served, for as long as it stays open, as a
    # prefork server without a keep-alive policy does: the other client waits
    # the whole run, and shows as a client with no response, not an error.
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve_one() -> None:
        conn, _ = sock.accept()
        with conn:
            while read_head(conn):
                conn.sendall(OK)
    threading.Thread(target=serve_one, daemon=True).start()
    try:
        doc = run_loadgen(loadgen, port, "keepalive")
    finally:
        sock.close()
    assert doc["errors"] == 0, doc
    assert doc["zero_clients"] == 1 and doc["min_per_client"] == 0
    assert doc["unfinished"] == 1
    assert isinstance(doc["max_gap_us"], int) and doc["max_gap_us"] >= 190_000
