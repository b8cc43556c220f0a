"""bench.drain's programs under test, each in its own process with its output in a log file:
Mosquitto, ``cloud-sink run`` and ``edge-agent run``, started until their readiness line."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.child import REPO_ROOT
from bench.drain_config import HOST, Pki, mosquitto_conf, sink_toml

__all__ = [
    "BIN",
    "SINK_READY",
    "Process",
    "make_dir",
    "online_at",
    "start_agent",
    "start_mosquitto",
    "start_sink",
]

BIN = Path(sys.executable).parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

AGENT_READY = re.compile(r"listener on 127\.0\.0\.1:(?P<port>\d+)")
AGENT_ONLINE = re.compile(r"^(?P<at>\S+ \S+) INFO edge_agent\.uplink: uplink: online to", re.M)
SINK_READY = re.compile(r"cloud-sink ready: listening on 127\.0\.0\.1:(?P<port>\d+)")
MOSQUITTO_READY = re.compile(r"mosquitto version \S+ running")


def free_port() -> int:
    """A free loopback port now (Mosquitto 2.0.11 cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A program with its output in a log file, started until a line matches ``ready``."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        ready: re.Pattern[str],
        *,
        within: float = 30.0,
    ) -> Process:
        with log_path.open("ab") as log_file:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        started = cls(name, child, log_path)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = ready.search(started.log())
            if found:
                if "port" in found.groupdict():
                    started.port = int(found.group("port"))
                return started
            if child.returncode is not None:
                break
            await asyncio.sleep(0.02)
        await started.stop()
        raise RuntimeError(f"{name} did not start:\n{started.log()[-3000:]}")

    async def stop(self, grace: float = 15.0) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -1


def make_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def start_mosquitto(directory: Path, pki: Pki) -> Process:
    make_dir(directory)
    for _ in range(3):  # a port taken between free_port() and bind(): try another
        port = free_port()
        config = directory / "mosquitto.conf"
        config.write_text(mosquitto_conf(port, pki) + "\n")
        try:
            broker = await Process.start(
                "mosquitto", [MOSQUITTO, "-c", str(config)], directory / "mosquitto.log",
                MOSQUITTO_READY,
            )  # fmt: skip
        except RuntimeError:
            continue
        broker.port = port
        return broker
    raise RuntimeError("mosquitto did not start in 3 attempts")


async def start_sink(directory: Path, pki: Pki, linger_ms: float | None) -> tuple[Process, Path]:
    make_dir(directory)
    core = directory / "core.db"
    config = directory / "sink.toml"
    config.write_text(sink_toml(pki, core, linger_ms))
    sink = await Process.start(
        "cloud-sink",
        [str(BIN / "cloud-sink"), "--config", str(config), "run", "--listen-port", "0"],
        directory / "sink.log",
        SINK_READY,
    )
    return sink, core


async def start_agent(config: Path, log_path: Path, profile: Path | None = None) -> Process:
    """``edge-agent run``; with ``profile``, the same CLI under cProfile (``python -m bench.drain
    _profiled``)."""
    argv = ["--config", str(config), "run", "--listen-port", "0"]
    if profile is not None:
        command = [sys.executable, "-m", "bench.drain", "_profiled", str(profile), *argv]
    else:
        command = [str(BIN / "edge-agent"), *argv]
    return await Process.start("edge-agent", command, log_path, AGENT_READY)


def online_at(agent: Process) -> float | None:
    """Wall-clock time of the agent's first "online" log line (logging's local asctime)."""
    found = AGENT_ONLINE.search(agent.log())
    if found is None:
        return None
    stamp = dt.datetime.strptime(found.group("at"), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()  # naive: local time, as logging wrote it
