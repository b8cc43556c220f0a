"""The README's demo command works end to end and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).parent.parent / "scripts" / "demo.py"


def test_demo_runs_the_outage_and_counts_zero_lost() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--online", "3", "--offline", "5"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "link=backoff" in out  # the outage was seen
    assert "drained in" in out
    assert "demo: 0 lost" in out
    assert "stopped the agent (exit 0) and the sink (exit 0)" in out
    leftovers = subprocess.run(
        ["pgrep", "-f", "bridge-demo-"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == "", "demo processes left running"
