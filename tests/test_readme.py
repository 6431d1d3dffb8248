"""The README is generated from the settings table and must not drift."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mps import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_settings_section_matches_the_table():
    block = README.split("<!-- settings:begin", 1)[1].split("-->\n", 1)[1]
    block = block.split("<!-- settings:end -->", 1)[0]
    assert block == config.settings_markdown(), \
        "README settings drifted: run `python scripts/update_readme.py`"


def test_metrics_reference_matches_the_table():
    from mps.metrics import metrics_markdown
    block = README.split("<!-- metrics:begin", 1)[1].split("-->\n", 1)[1]
    block = block.split("<!-- metrics:end -->", 1)[0]
    assert block == metrics_markdown(), \
        "README metrics reference drifted: run `python scripts/update_readme.py`"


def test_every_setting_has_a_flag_and_env_var_in_help():
    out = subprocess.run([sys.executable, "-m", "mps", "serve", "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    for f in config.fields():
        assert config.flag(f.name) in out
        assert config.env_var(f.name) in README


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    assert len(commands) == 2
    assert "mps serve mps.examples:echo" in commands[0]
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
