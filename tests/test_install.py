"""`python -m build` makes an sdist and a wheel from a pristine copy; the sdist
installs into a fresh venv with a C compiler (C backend) and without one (the
pure-Python backend), and each install serves and runs `mps bench locks` from
a directory that is not the checkout.

The installs build in pip's isolated environment, which takes setuptools and
cffi from the package index, as any user's `pip install mps-*.tar.gz` does.
"""
from __future__ import annotations

import email
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import recv_all, wait_until

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPS_BENCH_CACHE")}
ENV["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
NO_CC = {"CC": "/bin/false"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built once for the module."""
    tmp = tmp_path_factory.mktemp("dists")
    # A pristine copy: an earlier `pip install .` leaves a built .so in build/,
    # which setuptools would happily reuse.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", ".venv", ".git", "*.so", "__pycache__", "*.egg-info", "bin",
        ".*_cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"),
                        str(source)], capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = (tmp / "dist").glob("mps-*.tar.gz")
    (wheel,) = (tmp / "dist").glob("mps-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.mark.slow
def test_sdist_carries_what_building_and_testing_need(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"pyproject.toml", "setup.py", "build_ffi.py", "MANIFEST.in", "README.md",
              "LICENSE", "src/_mpscore.c", "src/_mpshttp.c", "src/_mpsaccept.c",
              "src/_mpschild.h", "src/mps/py.typed", "benchmarks/RESULTS.md",
              "scripts/update_readme.py", ".ci/run"}
    needed |= {f"src/mps/_bench/{p.name}" for p in (ROOT / "src/mps/_bench").glob("*.c")}
    needed |= {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    assert {"tests/apps.py", "tests/conftest.py", "src/mps/_bench/loadgen.c"} <= needed
    assert needed <= names, sorted(needed - names)


@pytest.mark.slow
def test_wheel_carries_the_package_data_and_the_metadata(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        (meta_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(meta_name))
    assert {"mps/py.typed", "mps/_bench/_mpscore.c", "mps/_bench/loadgen.c",
            "mps/_bench/lockbench.c", "mps/_bench/ref_prefork.c"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/mps").rglob("*.py")}
    assert modules <= names, f"left out of the wheel: {sorted(modules - names)}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Source", "Issues"}


def install_sdist(sdist: Path, where: Path, env: dict[str, str]) -> tuple[str, str]:
    """A fresh venv with the sdist pip-installed; (its python, pip's output)."""
    venv.create(where, with_pip=True)
    py = str(where / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-v", str(sdist)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return py, r.stdout + r.stderr


def serve_once(py: str, tmp: Path, backend: str) -> str:
    """Start `mps serve`, echo one line through it, stop it; the log."""
    log = tmp / f"serve-{backend}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([py, "-m", "mps", "serve", "--bind", "127.0.0.1:0",
                                 "--backend", backend, "--start-servers", "1",
                                 "--min-spare", "1", "--max-spare", "1", "--max-children", "2"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp), env=ENV,
                                start_new_session=True)
    try:
        try:
            port = int(wait_until(lambda: (m := re.search(r"listening at [^ ]*:(\d+)",
                                                           log.read_text())) and m.group(1),
                                  timeout=30, what="the installed server to listen"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{log.read_text()[-3000:]}") from None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"from the sdist")
            assert recv_all(s).endswith(b": from the sdist")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return log.read_text()


def bench(py: str, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`mps bench ARGS` of the installed package, run outside the checkout."""
    return subprocess.run([py, "-m", "mps", "bench", *args], capture_output=True, text=True,
                          timeout=120, cwd=str(tmp),
                          env={**ENV, "MPS_BENCH_CACHE": str(tmp / "bench-cache"), **env})


def lock_backends(r: subprocess.CompletedProcess[str]) -> set[str]:
    assert r.returncode == 0, r.stderr
    return {row["backend"] for row in json.loads(r.stdout)["results"]}


LOCKS = ("locks", "--procs", "1", "--seconds", "0.05", "--reps", "1", "--json")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
def test_sdist_installs_with_a_compiler_and_serves_on_the_c_backend(
        dists: dict[str, Path], tmp_path: Path) -> None:
    py, _ = install_sdist(dists["sdist"], tmp_path / "venv", ENV)
    probe = subprocess.run([py, "-c", "from mps.scoreboard import c_available, _Acceptor; "
                                      "print(c_available(), _Acceptor is not None)"],
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert probe.stdout.strip() == "True True", probe.stderr
    serve_once(py, tmp_path, "c")
    assert lock_backends(bench(py, tmp_path, *LOCKS)) == {"c", "python", "cffi-floor", "c-raw"}
    assert list((tmp_path / "bench-cache").glob("lockbench-*"))


@pytest.mark.slow
def test_sdist_installs_without_a_compiler_and_serves_on_python(
        dists: dict[str, Path], tmp_path: Path) -> None:
    py, output = install_sdist(dists["sdist"], tmp_path / "venv", {**ENV, **NO_CC})
    assert "mps could not build a C extension" in output
    probe = subprocess.run([py, "-c", "from mps.scoreboard import c_available; "
                                      "print(c_available())"],
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert probe.stdout.strip() == "False", probe.stderr

    refused = subprocess.run([py, "-m", "mps", "serve", "--backend", "c"],
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert refused.returncode == 2 and "backend 'c' is not available" in refused.stderr
    assert "using the pure-Python scoreboard" in serve_once(py, tmp_path, "auto")

    assert lock_backends(bench(py, tmp_path, *LOCKS, **NO_CC)) == {"python"}
    r = bench(py, tmp_path, "serve", "--seconds", "0.1", **NO_CC)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no working C compiler" in r.stderr and "Traceback" not in r.stderr


def test_the_c_extensions_are_built_where_a_compiler_exists():
    # Without a compiler the install falls back to the Python backend (by
    # design, tested above); with one, a C core that fails to build must not
    # hide behind that fallback -- every C-backend test would then vanish.
    from mps.scoreboard import c_available
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here: the Python backend is the expected one "
                    "(apt-get install gcc to build the C core)")
    assert c_available(), "a C compiler exists but mps._mpscore was not built: " \
                          "see the pip install output for the compiler's error"
    from mps.http.message import SPEEDUPS
    assert SPEEDUPS, "a C compiler exists but mps.http._speedups was not built (or " \
                     "MPS_NO_SPEEDUPS is set): see the pip install output"
