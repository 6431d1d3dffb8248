"""Installing on a machine without a C compiler still gives a working mps."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import recv_all, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_install_without_a_compiler_falls_back_to_python(tmp_path):
    env = {**os.environ, "CC": "/bin/false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # A pristine copy: an earlier `pip install .` leaves a built .so in build/,
    # which setuptools would happily reuse.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", ".venv", ".git", "*.so", "__pycache__", "*.egg-info", "bin", ".*_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                            str(tmp_path / "wheels"), str(source)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "mps could not build its C scoreboard core" in build.stdout + build.stderr
    (wheel,) = (tmp_path / "wheels").glob("mps-*.whl")

    venv.create(tmp_path / "venv", with_pip=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=300,
                   env=env)
    probe = subprocess.run([py, "-c", "from mps.scoreboard import c_available; "
                                      "print(c_available())"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False"

    refused = subprocess.run([py, "-m", "mps", "serve", "--backend", "c"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "backend 'c' is not available" in refused.stderr

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([py, "-m", "mps", "serve", "--bind", "127.0.0.1:0",
                                 "--start-servers", "1", "--min-spare", "1", "--max-spare", "1",
                                 "--max-children", "2"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = int(wait_until(lambda: (m := re.search(r"listening at [^ ]*:(\d+)",
                                                       log.read_text())) and m.group(1),
                              what="the fallback server to listen"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"no compiler")
            assert recv_all(s).endswith(b": no compiler")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "using the pure-Python scoreboard" in log.read_text()
