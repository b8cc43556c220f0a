"""``edge-agent``'s command line run as a subprocess against a config file: for the CLI's own tests
(tests/test_agent_cli.py) and the tests that read `status`, `token` and the like through it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from tests.harness.process import console_script

__all__ = ["EDGE_AGENT", "acli", "cli"]

EDGE_AGENT = console_script("edge-agent")


def cli(config: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_AGENT, "--config", str(config), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def acli(
    config: Path, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, config, *args, stdin=stdin)
