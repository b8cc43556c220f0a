"""The README's demo command works end to end and leaves nothing running."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).parent.parent / "scripts" / "demo.py"


@pytest.fixture
def demo_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo", demo)  # its dataclasses look their module up
    spec.loader.exec_module(demo)
    return demo


def left_running(work: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


@pytest.fixture
def nothing_left(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left running in ``tmp_path`` is killed after it (by pid)."""
    yield
    for pid in left_running(tmp_path):
        os.kill(pid, signal.SIGKILL)


def stand_in_demo(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    """scripts/demo.py's own ``main`` (signals, clean-up, the temporary directory in
    ``tmp_path``) around ``body``, which defines ``fake_demo(work, online, offline)`` in place of
    the demo's PKI, sink and agent (``demo`` is the module). In a session of its own, so that a
    signal to its process group is a terminal's Ctrl-C."""
    script = f"""
import asyncio, importlib.util, signal, sys
spec = importlib.util.spec_from_file_location("demo", {str(DEMO)!r})
demo = importlib.util.module_from_spec(spec)
sys.modules["demo"] = demo
spec.loader.exec_module(demo)
{textwrap.dedent(body)}
demo.demo = fake_demo
sys.argv = ["demo.py"]
sys.exit(demo.main())
"""
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )


def read_until(process: subprocess.Popen[str], text: str) -> str:
    assert process.stdout is not None
    seen = ""
    while text not in seen:
        line = process.stdout.readline()
        assert line, f"ended before {text!r}: {seen}"
        seen += line
    return seen


SLOW_TO_STOP = """
import signal, sys, time
def term(*_):
    time.sleep(30)  # the agent waits for its in-flight acks; this one for long
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("listening on", flush=True)
time.sleep(600)
"""

IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("listening on", flush=True)
time.sleep(600)
"""


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_demo_stopped_by_a_signal_leaves_nothing_behind(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A closed terminal (SIGHUP) or a kill (SIGTERM) left both services running, in sessions of
    their own, and the work directory with the CA's private key in /tmp. Ctrl-C (SIGINT) stops
    the demo the same way."""
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


@pytest.mark.usefixtures("nothing_left")
def test_demo_ctrl_c_twice_while_stopping_leaves_nothing_behind(tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C again while the demo stops the agent: asyncio.run's second
    KeyboardInterrupt cut the clean-up short, the sink (a session of its own) was never
    signalled and kept running while its directory was deleted."""
    demo = subprocess.Popen(
        [sys.executable, str(DEMO), "--online", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C goes to the demo's process group
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    seen = read_until(demo, "edge agent on")
    os.killpg(demo.pid, signal.SIGINT)
    seen += read_until(demo, "stopping the agent")
    os.killpg(demo.pid, signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 130, seen + rest
    assert list(tmp_path.iterdir()) == []
    assert left_running(tmp_path) == [], seen + rest


@pytest.mark.usefixtures("nothing_left")
def test_a_second_ctrl_c_kills_a_service_slow_to_stop_instead_of_abandoning_it(
    tmp_path: Path,
) -> None:
    """The same with a service that takes 30 s to stop on SIGTERM, so that the second Ctrl-C
    surely comes while the clean-up waits for it: it is killed at once, and the exit is 130."""
    demo = stand_in_demo(
        tmp_path,
        f"""
        SERVICE = {SLOW_TO_STOP!r}

        async def fake_demo(work, online, offline):
            svc = demo.Process("svc", [sys.executable, "-c", SERVICE, str(work)],
                               "listening on", work / "svc.log")
            try:
                await svc.start()
                demo.say("READY")
                await asyncio.sleep(600)
            finally:
                demo.say("demo: stopping the agent and the sink")
                demo.say(f"svc exit {{await svc.stop()}}")
            return 0
        """,
    )
    seen = read_until(demo, "READY")
    os.killpg(demo.pid, signal.SIGINT)
    seen += read_until(demo, "stopping the agent")
    time.sleep(0.3)  # in the middle of the wait for the service
    start = time.monotonic()
    os.killpg(demo.pid, signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 130, seen + rest
    assert f"svc exit {-signal.SIGKILL}" in rest
    assert time.monotonic() - start < 10
    assert list(tmp_path.iterdir()) == []
    assert left_running(tmp_path) == [], seen + rest


@pytest.mark.usefixtures("nothing_left")
def test_services_the_loop_left_running_are_gone_before_the_directory(tmp_path: Path) -> None:
    """However the event loop ended (here a KeyboardInterrupt raised with no clean-up at all, as
    asyncio.run's own Ctrl-C handling did), main() stops every service started, SIGKILL for one
    that ignores SIGTERM, before it deletes the directory they run in."""
    demo = stand_in_demo(
        tmp_path,
        f"""
        demo.REAP_GRACE = 0.5
        SERVICE = {IGNORES_SIGTERM!r}

        async def fake_demo(work, online, offline):
            svc = demo.Process("svc", [sys.executable, "-c", SERVICE, str(work)],
                               "listening on", work / "svc.log")
            await svc.start()
            raise KeyboardInterrupt
        """,
    )
    out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130, out
    assert left_running(tmp_path) == [], out
    assert list(tmp_path.iterdir()) == []


def test_a_buffer_that_never_empties_ends_the_demo_with_a_message(tmp_path: Path) -> None:
    """The wait for the agent to deliver its last events ran out as a TimeoutError traceback."""
    demo = stand_in_demo(
        tmp_path,
        """
        from edge_agent.buffer import Buffer, NewEvent

        async def fake_demo(work, online, offline):
            data = work / "agent-data"
            async with await Buffer.open(data) as buffer:
                await buffer.append_one(NewEvent("t", b"x", 1, 0, 0, None, "reject"))
            await demo.until_delivered(data, 0.3)
            return 0
        """,
    )
    out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 1, out
    assert "demo: 1 events still in the agent's buffer 0.3 s after the sensors stopped" in out
    assert "Traceback" not in out
    assert "demo: kept" in out  # the logs to look at


def test_the_sinks_port_stays_the_demos_while_the_sink_is_down(demo_module: ModuleType) -> None:
    """The sink comes back after 20 s on the port it had: a port only probed free at the start
    could be given to another program (a test's bind(0), an outgoing connection) meanwhile."""
    with demo_module.reserve_port() as reservation:
        port = demo_module.port_of(reservation)
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            assert other.getsockname()[1] != port

        async def serve_and_stop() -> None:  # as the sink does: asyncio's server
            server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
            server.close()
            await server.wait_closed()

        asyncio.run(serve_and_stop())
        asyncio.run(serve_and_stop())  # the restart


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("cloud-sink", "cloud_sink.cli"),
        ("edge-agent", "edge_agent.cli"),
        ("bridge-certs", "certs.cli"),
    ],
)
def test_services_run_without_console_scripts_next_to_the_interpreter(
    demo_module: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, module: str
) -> None:
    """``BIN = dirname(sys.executable)`` failed with a traceback when the console scripts are
    installed elsewhere (pip --user, a system Python): the demo runs the module it imports."""
    assert demo_module.command(name, module) == [str(demo_module.BIN / name)]  # a virtualenv
    monkeypatch.setattr(demo_module, "BIN", tmp_path)
    argv = demo_module.command(name, module)
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"usage: {name}" in done.stdout


def test_a_restart_is_ready_only_once_its_own_run_says_so(
    tmp_path: Path, demo_module: ModuleType
) -> None:
    """The log is shared by a service's runs: the first run's ready line made a restart that
    failed look ready at once (and the drain figure include the restart)."""
    demo = demo_module
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
