"""The README's demo command works end to end and leaves nothing running."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stopped_by_a_signal_leaves_nothing_behind(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A closed terminal (SIGHUP) or a kill (SIGTERM) left both services running, in sessions of
    their own, and the work directory with the CA's private key in /tmp."""
    demo = subprocess.Popen(
        [sys.executable, str(DEMO), "--online", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert demo.stdout is not None
    seen = ""
    while "edge agent on" not in seen:
        line = demo.stdout.readline()
        assert line, f"the demo ended early: {seen}"
        seen += line
    demo.send_signal(signum)
    rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 128 + signum, seen + rest
    assert "stopped the agent (exit 0) and the sink (exit 0)" in rest
    assert list(tmp_path.iterdir()) == []  # the work directory is gone
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == "", "demo processes left running"


def test_a_restart_is_ready_only_once_its_own_run_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is shared by a service's runs: the first run's ready line made a restart that
    failed look ready at once (and the drain figure include the restart)."""
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo", demo)  # its dataclasses look their module up
    spec.loader.exec_module(demo)
    log = tmp_path / "sink.log"
    log.write_text("sink: listening on 127.0.0.1:4242\n")  # what the first run wrote
    failing = demo.Process("sink", [sys.executable, "-c", "print('boom')"], "listening on", log)
    with pytest.raises(SystemExit, match=r"did not start; its log:\nboom\n$"):
        asyncio.run(failing.start())
    ready = demo.Process(
        "sink", [sys.executable, "-c", "print('listening on x'); import time; time.sleep(60)"],
        "listening on", log,
    )  # fmt: skip

    async def start_and_stop() -> object:
        await ready.start()
        return await ready.stop()

    assert asyncio.run(start_and_stop()) == -signal.SIGTERM
