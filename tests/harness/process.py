"""Subprocess fixture: start a program on port 0, wait for readiness, crash it, restart it.

A managed program reports readiness by printing a line that matches ``ready`` (a regex with a
``port`` group when it chose its own port); its stdout and stderr go to a log file so a chatty
program never blocks on a full pipe. ``{port}`` in the argv is replaced by ``0`` on the first
start and by the port the program reported on every restart, so clients can reconnect to the same
address, and the data directory (whatever the argv names) is kept.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

__all__ = ["ManagedProcess", "ProcessFactory", "console_script", "process_factory"]

DEFAULT_READY_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 10.0


def console_script(name: str) -> str:
    """The path of one of our console scripts in the running virtual environment."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError(
            f"console script {name!r} is not installed next to {sys.executable}"
        )
    return found


def rss_kib(pid: int | str = "self") -> int:
    """VmRSS of a process (this one by default) in KiB, from ``/proc/PID/status``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


class ProcessError(AssertionError):
    """The program did not start, or did not stop the way the test expected."""


class ManagedProcess:
    """One program under test; not started until `start`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: str | re.Pattern[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int = 0,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> None:
        self.argv = list(argv)
        self.ready = re.compile(ready) if isinstance(ready, str) else ready
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.port = port
        self.ready_timeout = ready_timeout
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def output(self, *, since_start: bool = False) -> str:
        """What the program printed (all runs, or only the current one)."""
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self._log_offset if since_start else 0 :].decode("utf-8", "replace")

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise ProcessError("the process was never started")
        return self._popen

    # -- lifecycle (blocking; the a* variants run them off the event loop) ---------------------

    def start(self) -> None:
        """Start the program and wait until it prints its ready line."""
        if self.running:
            raise ProcessError(f"{self.argv[0]} is running already (pid {self.pid})")
        argv = [part.replace("{port}", str(self.port)) for part in self.argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # signals from the terminal reach pytest, not this child
            )
        self.starts += 1
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            match = self.ready.search(self.output(since_start=True))
            if match:
                if "port" in self.ready.groupindex and match.group("port"):
                    self.port = int(match.group("port"))
                return
            if self._require().poll() is not None:
                raise ProcessError(
                    f"{self.argv[0]} exited with {self._require().returncode} before it was "
                    f"ready; output:\n{self.output(since_start=True)[-4000:]}"
                )
            time.sleep(0.02)
        self.kill9()
        raise ProcessError(
            f"{self.argv[0]} printed nothing matching {self.ready.pattern!r} within "
            f"{self.ready_timeout}s; output:\n{self.output(since_start=True)[-4000:]}"
        )

    def kill9(self) -> int:
        """SIGKILL: a crash with no chance to clean up. Returns the exit status (-9)."""
        popen = self._require()
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        return popen.wait(timeout=DEFAULT_STOP_TIMEOUT)

    def sigterm(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM and wait; still running after ``timeout``: killed, and the test fails."""
        popen = self._require()
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        try:
            return popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=DEFAULT_STOP_TIMEOUT)
            raise ProcessError(f"{self.argv[0]} ignored SIGTERM for {timeout}s") from None

    def signal(self, signum: signal.Signals) -> None:
        self._require().send_signal(signum)

    def wait(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        return self._require().wait(timeout=timeout)

    def restart(self) -> None:
        """Start again with the same argv, port and data directory (after a crash or a stop)."""
        if self.running:
            raise ProcessError("stop the process (kill9 or sigterm) before restarting it")
        self.start()

    def close(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if needed; never raises."""
        if self._popen is None or self._popen.poll() is not None:
            return
        self._popen.send_signal(signal.SIGTERM)
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout=DEFAULT_STOP_TIMEOUT)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    async def asigterm(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        return await asyncio.to_thread(self.sigterm, timeout)

    async def await_exit(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        return await asyncio.to_thread(self.wait, timeout)


class ProcessFactory:
    """Creates `ManagedProcess` objects for one test and stops them all at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._processes: list[ManagedProcess] = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        ready: str | re.Pattern[str],
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int = 0,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        start: bool = True,
    ) -> ManagedProcess:
        label = name or Path(argv[0]).name
        process = ManagedProcess(
            argv,
            ready=ready,
            log_path=self.directory / f"{label}-{len(self._processes)}.log",
            env=env,
            cwd=cwd,
            port=port,
            ready_timeout=ready_timeout,
        )
        self._processes.append(process)
        if start:
            process.start()
        return process

    def close(self) -> None:
        for process in self._processes:
            process.close()


@pytest.fixture
def process_factory(tmp_path: Path) -> Iterator[ProcessFactory]:
    factory = ProcessFactory(tmp_path / "processes")
    try:
        yield factory
    finally:
        factory.close()
