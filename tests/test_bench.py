"""Each `mps bench` subcommand runs on a tiny configuration and emits
well-formed output, from a directory outside the checkout, against the
installed package.  Speed itself is measured by the benchmarks, never here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mps
from mps.scoreboard import c_available

Bench = Callable[..., "subprocess.CompletedProcess[str]"]

FLAGS = {
    "locks": ["--procs", "--seconds", "--reps", "--json"],
    "serve": ["--clients", "--seconds", "--reps", "--kinds", "--json"],
    "spike": ["--clients", "--backend", "--plot", "--settings", "--json"],
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


@pytest.mark.parametrize("args, words", [
    (["nonsense"], ["locks", "serve", "spike"]),
    ([], ["locks", "serve", "spike"]),
    (["locks", "--procs", "0"], ["--procs"]),
    (["locks", "--seconds", "nan"], ["--seconds"]),
    (["serve", "--kinds", "c-ref,apache"], ["--kinds", "apache"]),
    (["spike", "--backend", "rust"], ["--backend"]),
])
def test_bench_usage_error_is_one_line(bench: Bench, args: list[str], words: list[str]) -> None:
    r = bench(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert all(word in r.stderr for word in words), r.stderr
