"""The subprocess fixture itself: ready on an ephemeral port, kill -9, SIGTERM, restart in place."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.harness.process import ProcessError, ProcessFactory

pytestmark = pytest.mark.integration

ECHO = [sys.executable, "-m", "tests.harness.echo_server", "--port", "{port}"]
READY = r"listening on 127\.0\.0\.1:(?P<port>\d+) starts=(?P<starts>\d+)"


def echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(len(data))


def test_start_kill9_restart_keeps_port_and_data(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    proc = process_factory([*ECHO, "--data", str(data)], ready=READY, cwd=Path.cwd())
    first_port = proc.port
    assert first_port > 0
    assert echo(first_port, b"hello") == b"hello"

    assert proc.kill9() == -signal.SIGKILL
    assert not proc.running
    with pytest.raises(ConnectionRefusedError):
        echo(first_port, b"x")

    proc.restart()
    assert proc.port == first_port
    assert echo(proc.port, b"again") == b"again"
    assert (data / "starts").read_text() == "2"
    assert "starts=2" in proc.output(since_start=True)
    assert "starts=1" not in proc.output(since_start=True)
    assert proc.starts == 2


def test_sigterm_is_a_clean_exit(process_factory: ProcessFactory, tmp_path: Path) -> None:
    proc = process_factory([*ECHO, "--data", str(tmp_path / "d")], ready=READY, cwd=Path.cwd())
    assert proc.sigterm() == 0
    assert proc.output().rstrip().endswith("stopped")


def test_a_program_that_dies_early_fails_with_its_output(process_factory: ProcessFactory) -> None:
    with pytest.raises(ProcessError, match=r"exited with 3 before it was ready(.|\n)*boom"):
        process_factory(
            [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], ready="never"
        )


def test_a_program_that_never_gets_ready_is_killed(process_factory: ProcessFactory) -> None:
    proc = process_factory(
        [sys.executable, "-c", "import time; time.sleep(60)"], ready="never", start=False
    )
    proc.ready_timeout = 0.5
    with pytest.raises(ProcessError, match="printed nothing matching"):
        proc.start()
    assert not proc.running
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.asyncio
async def test_async_variants(process_factory: ProcessFactory, tmp_path: Path) -> None:
    proc = process_factory(
        [*ECHO, "--data", str(tmp_path / "d")], ready=READY, cwd=Path.cwd(), start=False
    )
    await proc.astart()
    assert proc.running
    assert await proc.asigterm() == 0
    await proc.arestart()
    assert proc.running
    proc.signal(signal.SIGTERM)
    assert await proc.await_exit() == 0
