"""The files under contrib/ are checked by the tools that will read them."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing: apt-get install systemd")
def test_systemd_units_verify_cleanly(tmp_path: Path) -> None:
    # Instantiate the templates as systemd would (mps@demo.*) and let
    # systemd-analyze read them: an unknown key or a bad value is reported.
    units = []
    for template in ("mps@.service", "mps@.socket"):
        unit = tmp_path / template.replace("@.", "@demo.")
        unit.write_text((CONTRIB / "systemd" / template).read_text())
        units.append(str(unit))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "mps@demo" in line and "Failed to prepare filename" not in line]
    assert complaints == [], "\n".join(complaints)


def test_the_service_reloads_and_stops_through_mps() -> None:
    service = (CONTRIB / "systemd" / "mps@.service").read_text()
    assert "Type=notify" in service and "KillMode=mixed" in service
    assert " reload --status-socket " in service and "WatchdogSec=" in service
