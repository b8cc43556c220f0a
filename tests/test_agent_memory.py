"""`edge-agent run` fixes glibc's mmap threshold; the operator's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "from edge_agent.memory import tune_malloc; print(tune_malloc())"


def run_probe(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_the_threshold_is_set_on_glibc() -> None:
    assert os.confstr("CS_GNU_LIBC_VERSION"), "this machine is expected to run glibc"
    assert run_probe() == "True"


def test_an_operator_setting_is_left_alone() -> None:
    assert run_probe(MALLOC_MMAP_THRESHOLD_="131072") == "False"
