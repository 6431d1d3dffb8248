"""The package is `mypy --strict` clean (house style: full annotations)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--config-file",
                        str(ROOT / "pyproject.toml"), str(ROOT / "src" / "mps")],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Success" in r.stdout
