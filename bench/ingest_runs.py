"""One measured run of ``bench.ingest``: a fresh server process and the load-generator
processes, started and stopped; what each process and the rest of the machine spent (``/proc``)
over the measured window."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.drain_config import HOST, Pki
from bench.ingest_servers import MOSQUITTO, mosquitto_config
from bench.procfs import cpu_seconds, system_busy

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- measuring processes ------------------------------------------------------------------------


async def _wait_quiet(max_load: float, patience: float) -> float:
    """Wait (up to ``patience`` seconds) until other processes use less than ``max_load`` cores;
    returns the load last seen. The processes of this benchmark are idle when this is called."""
    deadline = time.monotonic() + patience
    while True:
        before = system_busy()
        await asyncio.sleep(0.5)
        load = (system_busy() - before) / 0.5
        if load <= max_load or time.monotonic() >= deadline:
            return load


def _peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Children run as ``python -m bench.ingest``: the repository must be importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for name in (
        "PYTHONASYNCIODEBUG",
        "PYTHONDEVMODE",
        "PYTHONTRACEMALLOC",
        "PYTHONPROFILEIMPORTTIME",
    ):
        env.pop(name, None)
    return env


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- one measured run ----------------------------------------------------------------------------


class Failed(Exception):
    pass


async def _terminate(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _listening(port: int, process: asyncio.subprocess.Process, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.returncode is not None:
            return False
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


@dataclass
class Settings:
    publishers: int
    events: int
    warmup: int
    window: int
    refill: int
    workers: int
    timeout: float
    max_other: float
    quiet_wait: float
    retries: int
    nodelay: bool
    workdir: Path
    pki: Pki
    profile: Path | None


@dataclass(frozen=True)
class Sample:
    server: str
    tls: bool
    run: int
    events: int
    seconds: float
    server_cpu: float
    loadgen_cpu: float
    other_cpu: float  # everything else busy on the machine meanwhile (this script included)
    peak_rss: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.server_cpu / self.events * 1e6

    @property
    def loadgen_load(self) -> float:
        """Load-generator CPU, in cores busy over the measured window."""
        return self.loadgen_cpu / self.seconds

    @property
    def other_load(self) -> float:
        """CPU of every other process on the machine, in cores busy over the measured window."""
        return self.other_cpu / self.seconds


async def _start_server(
    kind: str, tls: bool, settings: Settings, label: str
) -> tuple[asyncio.subprocess.Process, Path, int]:
    pki = settings.pki if tls else None
    last = ""
    for attempt in range(3):
        port = _free_port()
        log_path = settings.workdir / f"{label}-{attempt}.log"
        if kind == "mosquitto":
            config = settings.workdir / f"{label}.conf"
            config.write_text(mosquitto_config(port, pki, settings.nodelay))
            argv = [MOSQUITTO, "-c", str(config)]
        else:
            argv = [sys.executable, "-m", "bench.ingest", "serve", kind, "--port", str(port)]
            if pki is not None:
                argv += ["--ca", str(pki.ca), "--cert", str(pki.server_cert)]
                argv += ["--key", str(pki.server_key)]
            if kind == "ours" and settings.profile is not None:
                argv += ["--profile", str(settings.profile / f"{label}.prof")]
        with _log_file(log_path) as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=_child_env(),
            )
        if await _listening(port, process, 30):
            return process, log_path, port
        await _terminate(process)
        last = _tail(log_path)
    raise Failed(f"{label}: the server did not start:\n{last}")


async def _start_workers(
    port: int, tls: bool, settings: Settings, label: str
) -> list[asyncio.subprocess.Process]:
    workers = []
    per_worker = [
        settings.publishers // settings.workers
        + (1 if i < settings.publishers % settings.workers else 0)
        for i in range(settings.workers)
    ]
    for index, clients in enumerate(c for c in per_worker if c):
        argv = [
            sys.executable,
            "-m",
            "bench.ingest",
            "load",
            "--port",
            str(port),
            "--name",
            f"w{index}",
        ]
        argv += ["--clients", str(clients), "--events", str(settings.events)]
        argv += ["--warmup", str(settings.warmup), "--window", str(settings.window)]
        argv += ["--refill", str(settings.refill)]
        if tls:
            pki = settings.pki
            argv += ["--ca", str(pki.ca), "--cert", str(pki.device_cert)]
            argv += ["--key", str(pki.device_key)]
        with _log_file(settings.workdir / f"{label}-load{index}.log") as log:
            workers.append(
                await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    env=_child_env(),
                )
            )
    return workers


async def _expect(worker: asyncio.subprocess.Process, word: str, within: float) -> list[str]:
    assert worker.stdout is not None
    try:
        line = await asyncio.wait_for(worker.stdout.readline(), within)
    except TimeoutError:
        raise Failed(f"load generator: no '{word}' within {within:.0f}s") from None
    parts = line.decode().split()
    if not parts or parts[0] != word:
        raise Failed(f"load generator: expected '{word}', got {line.decode().strip()!r}")
    return parts[1:]


async def one_run(kind: str, tls: bool, run: int, settings: Settings) -> Sample:
    label = f"{kind}-tls-{'on' if tls else 'off'}-run{run}"
    server, server_log, port = await _start_server(kind, tls, settings, label)
    workers: list[asyncio.subprocess.Process] = []
    try:
        workers = await _start_workers(port, tls, settings, label)
        await asyncio.gather(*(_expect(w, "ready", settings.timeout) for w in workers))
        await _wait_quiet(settings.max_other, settings.quiet_wait)
        system0 = system_busy()
        profiling = settings.profile is not None and kind == "ours"
        if profiling:
            server.send_signal(signal.SIGUSR1)
        server_cpu0 = cpu_seconds(server.pid)
        loadgen_cpu0 = sum(cpu_seconds(w.pid) for w in workers)
        start = time.perf_counter()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        done = await asyncio.gather(*(_expect(w, "done", settings.timeout) for w in workers))
        seconds = time.perf_counter() - start
        if profiling:
            server.send_signal(signal.SIGUSR2)
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        loadgen_cpu = sum(cpu_seconds(w.pid) for w in workers) - loadgen_cpu0
        other_cpu = max(0.0, system_busy() - system0 - server_cpu - loadgen_cpu)
        peak = _peak_rss(server.pid)
        events = sum(int(parts[0]) for parts in done)
    except Failed as exc:
        raise Failed(f"{label}: {exc}\n--- server log ---\n{_tail(server_log)}") from None
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()  # the worker disconnects its clients and exits
        for worker in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait(), 5)
            await _terminate(worker, 5)
        await _terminate(server)
    return Sample(kind, tls, run, events, seconds, server_cpu, loadgen_cpu, other_cpu, peak)
