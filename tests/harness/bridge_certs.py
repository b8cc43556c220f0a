"""``bridge-certs`` and ``openssl`` run as subprocesses, and a PKI directory's files as a dict (to
show that a command wrote nothing): what every test of the bridge-certs tool uses
(tests/test_pki*.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness.process import console_script

__all__ = ["BRIDGE_CERTS", "openssl", "run", "tree"]

BRIDGE_CERTS = console_script("bridge-certs")


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BRIDGE_CERTS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
