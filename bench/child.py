"""Helper processes of the benchmarks. A load generator or reference client runs as
``python -m bench.<name> _<command> ARG...`` in a process of its own (its CPU is then not the
measured program's, and it can be measured apart) and answers with one JSON line on stdout."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.report import out

__all__ = ["REPO_ROOT", "answer", "run_child"]

REPO_ROOT = Path(__file__).resolve().parents[1]


async def run_child(what: str, module: str, *args: str) -> dict[str, float]:
    """Run ``python -m module ARGS...`` from the repository root and return its answer (the last
    line of its stdout, parsed). Raises `RuntimeError` saying ``what`` failed when it exits with
    a status other than 0."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed (status {child.returncode})")
    result: dict[str, float] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def answer(result: Mapping[str, float]) -> None:
    """The child's side: its result as the one JSON line `run_child` reads."""
    out(json.dumps(result))
