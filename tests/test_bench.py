"""Each `mps bench` subcommand runs on a tiny configuration and emits
well-formed output.  Speed itself is measured by the benchmarks, never here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mps.scoreboard import c_available

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "MPS_BENCH_DIR": str(ROOT / "benchmarks")}


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mps", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=str(ROOT))


def test_bench_locks_json_shape_and_no_lost_updates():
    r = bench("locks", "--procs", "1,2", "--seconds", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"results", "machine"}
    assert doc["machine"]["nproc"] == os.cpu_count()
    rows = doc["results"]
    expected = {"python"} | ({"c", "c-raw", "cffi-floor"} if c_available() else set())
    for procs in (1, 2):
        mine = {r["backend"]: r for r in rows if r["procs"] == procs}
        assert set(mine) == expected
        for row in mine.values():
            assert set(row) == {"backend", "procs", "ns_per_op"}
            assert isinstance(row["ns_per_op"], float) and row["ns_per_op"] > 0


def test_bench_serve_runs_every_server_kind():
    r = bench("serve", "--clients", "2", "--seconds", "0.3", "--reps", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kinds = {row["kind"] for row in doc["results"]}
    assert kinds == {"c-ref", "mps-python", "py-naive"} | ({"mps-c"} if c_available() else set())
    for row in doc["results"]:
        assert row["conns"] > 0 and row["errors"] == 0, row
        assert row["cpu_us_per_conn"] >= 0 and row["p50_us"] <= row["p99_us"]


def test_bench_serve_report_has_ratio_tables():
    r = bench("serve", "--clients", "2", "--seconds", "0.2", "--reps", "1",
              "--kinds", "c-ref,mps-python")
    assert r.returncode == 0, r.stderr
    assert "| mps-python |" in r.stdout and "CPU ratio to c-ref" in r.stdout


def test_bench_spike_accepts_the_whole_burst(tmp_path):
    r = bench("spike", "--clients", "8", "--json", "--settings",
              "--start-servers 2 --min-spare 1 --max-spare 4 --max-children 8 --backlog 64")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["accepted"] == 8 and doc["all_accepted_s"] > 0
    totals = [total for _, total in doc["children_over_time"]]
    assert max(totals) == 8 and totals[0] < 8      # the pool grew to absorb the burst
    assert len(doc["accepted_at_s"]) == 8


def test_bench_usage_error_is_one_line():
    r = bench("nonsense")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "locks" in r.stderr
