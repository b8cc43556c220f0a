"""One measured run of each part of ``bench.sink``: (1) throughput of the sink or Mosquitto
under the load generator, (2) a backend's bare client loop, (3) idle connections; the fresh sink
process each of them starts, and what is measured (CPU of processes and of the machine)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.drain_config import Pki
from bench.drain_processes import BIN, SINK_READY, Process, make_dir, start_mosquitto
from bench.procfs import cpu_seconds, memory_mb, system_busy
from bench.report import out
from bench.sink_backends import Names, broker_pids, delete_names, sink_toml, stored_count
from bench.sink_loadgen import REPO_ROOT, Device, LoadGen

# -- measuring ------------------------------------------------------------------------------------


def cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


@dataclass(frozen=True)
class Sample:
    target: str  # sqlite / amqp / nats / mosquitto, or bare-nats / bare-amqp
    fmt: str  # batch / raw; "w<window>" for bare loops
    run: int
    events: int
    seconds: float
    server_cpu: float  # the sink, Mosquitto, or the bare client
    loadgen_cpu: float
    broker_cpu: float  # RabbitMQ or nats-server
    other_cpu: float  # everything else on the machine
    rss_mb: float = math.nan  # the sink's / Mosquitto's VmHWM at the end

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def line(self) -> str:
        us = self.server_cpu / self.events * 1e6
        role = "client" if self.target.startswith("bare") else "server"
        rss = "" if math.isnan(self.rss_mb) else f", HWM {self.rss_mb:.1f} MB"
        return (
            f"{self.target:<9} {self.fmt:<6} {self.rate:>9,.0f} ev/s ({self.seconds:6.2f} s; "
            f"{role} {us:5.1f} µs/ev{rss}; cores: load-gen {self.loadgen_cpu / self.seconds:.2f},"
            f" broker {self.broker_cpu / self.seconds:.2f}, others "
            f"{self.other_cpu / self.seconds:.2f})"
        )


# -- the sink under test ---------------------------------------------------------------------------


@dataclass
class Settings:
    root: Path
    pki: Pki
    devices: list[Device]
    args: argparse.Namespace
    profile: Path | None = None


def per_envelope(args: argparse.Namespace) -> int:
    return int(args.envelope_events)


def messages_per_client(args: argparse.Namespace, fmt: str) -> int:
    per_message = per_envelope(args) if fmt == "batch" else 1
    return max(1, math.ceil(int(args.events) / int(args.publishers) / per_message))


async def start_sink(
    directory: Path, settings: Settings, backend: str, names: Names, max_connections: int
) -> tuple[Process, Path]:
    make_dir(directory)
    core = directory / "core.db"
    config = directory / "sink.toml"
    config.write_text(
        sink_toml(
            settings.pki,
            backend,
            names,
            core,
            max_connections,
            settings.args.sink_linger,
            settings.args.tls_read_buffer,
        )
    )
    argv = ["--config", str(config), "run", "--listen-port", "0"]
    if settings.profile is not None:
        command = [sys.executable, "-m", "bench.sink", "_profiled", str(settings.profile), *argv]
    else:
        command = [str(BIN / "cloud-sink"), *argv]
    sink = await Process.start("cloud-sink", command, directory / "sink.log", SINK_READY)
    return sink, core


def profiled_main(path: str, argv: list[str]) -> int:
    """``cloud-sink`` with cProfile enabled between SIGUSR1 and SIGUSR2 (the measured window)."""
    from cloud_sink.cli import main as sink_main

    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    signal.signal(signal.SIGUSR2, lambda *_: profiler.disable())
    try:
        return sink_main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


# -- (1) throughput, (2) bare loops ----------------------------------------------------------------


async def throughput_run(target: str, fmt: str, run: int, settings: Settings) -> Sample:
    """One measured window of the load generator against a fresh sink or Mosquitto."""
    args = settings.args
    directory = settings.root / f"{target}-{fmt}-{run}"
    names = Names()
    core = directory / "core.db"
    if target == "mosquitto":
        server = await start_mosquitto(directory, settings.pki)
    else:
        server, core = await start_sink(directory, settings, target, names, 1000)
    brokers = broker_pids().get(target, [])
    loadgen: LoadGen | None = None
    try:
        devices = directory / "devices.json"
        chosen = settings.devices[: args.publishers]
        devices.write_text(json.dumps([d.__dict__ for d in chosen]))
        messages = messages_per_client(args, fmt)
        if target == "mosquitto":
            messages *= args.mosquitto_scale  # its windows would be too short to time otherwise
        warmup = max(1, messages // 10) if fmt == "batch" else 2 * args.window
        spec: dict[str, object] = {
            "devices": str(devices), "ca": str(settings.pki.ca), "port": server.port,
            "format": fmt, "window": args.batch_window if fmt == "batch" else args.window,
            "messages": messages, "warmup": warmup, "per_envelope": per_envelope(args),
            "keep_alive": 60, "cyclic": target == "mosquitto",
        }  # fmt: skip
        loadgen, _ = await LoadGen.start(spec, args.timeout)
        await asyncio.sleep(0.5)
        cpu0 = (cpu_seconds(server.pid), cpu_seconds(loadgen.pid), cpu_of(brokers), system_busy())
        if settings.profile is not None:
            server.process.send_signal(signal.SIGUSR1)
        await loadgen.send("go")
        events_text, seconds_text = await loadgen.expect("done", args.timeout)
        if settings.profile is not None:
            server.process.send_signal(signal.SIGUSR2)
        server_cpu = cpu_seconds(server.pid) - cpu0[0]
        loadgen_cpu = cpu_seconds(loadgen.pid) - cpu0[1]
        broker_cpu = cpu_of(brokers) - cpu0[2]
        other = max(0.0, system_busy() - cpu0[3] - server_cpu - loadgen_cpu - broker_cpu)
        rss = memory_mb(server.pid)[1]
        events = int(events_text)
        sample = Sample(
            target, fmt, run, events, float(seconds_text), server_cpu, loadgen_cpu, broker_cpu,
            other, rss,
        )  # fmt: skip
    finally:
        if loadgen is not None:
            await loadgen.stop()
        status = await server.stop()
    if status != 0:
        out(f"  WARNING: {target} exited with status {status}:\n{server.log()[-2000:]}")
    if target != "mosquitto":
        try:
            expected = (warmup + messages) * len(chosen)
            expected *= per_envelope(args) if fmt == "batch" else 1
            stored = await stored_count(target, names, core)
            if stored != expected:
                out(f"  WARNING: the core queue holds {stored} events, {expected} were acked")
        finally:
            await delete_names(target, names)
    return sample


async def bare_run(backend: str, window: int, run: int, settings: Settings) -> Sample:
    names = Names()
    brokers = broker_pids().get(backend, [])
    count = settings.args.bare_events or settings.args.events
    try:
        broker0, busy0 = cpu_of(brokers), system_busy()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sink", "_bare",
            json.dumps({"backend": backend, "count": count, "window": window, "tag": names.tag}),
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await child.communicate()
        busy = system_busy() - busy0
        if child.returncode != 0:
            raise RuntimeError(f"the bare {backend} loop failed (status {child.returncode})")
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        if result["failed"]:
            out(f"  WARNING: {result['failed']} of {count} not confirmed")
        seconds, cpu = float(result["seconds"]), float(result["cpu"])
        broker = cpu_of(brokers) - broker0
        # The whole child's life is in `busy` (imports, building the messages): "others" is an
        # upper bound here.
        other = max(0.0, busy - broker - cpu) * seconds / max(seconds, busy)
        stored = await stored_count(backend, names, Path())
        if stored != count:
            out(f"  WARNING: the {backend} bare loop left {stored} messages, sent {count}")
    finally:
        await delete_names(backend, names)
    return Sample(f"bare-{backend}", f"w{window}", run, count, seconds, cpu, 0.0, broker, other)


# -- (3) idle connections ------------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    target: str
    connections: int
    connect_seconds: float
    rss_before: float
    rss_after: float
    rss_end: float
    alive: int
    lost: int
    pongs: int
    sockets: int
    cpu_hold: float  # cores used by the server while the connections idled

    @property
    def per_connection_kb(self) -> float:
        return (self.rss_end - self.rss_before) * 1024 / self.connections

    def line(self) -> str:
        return (
            f"{self.target:<9} {self.connections} connected in {self.connect_seconds:.1f} s; "
            f"VmRSS {self.rss_before:.1f} MB before, {self.rss_after:.1f} MB connected, "
            f"{self.rss_end:.1f} MB after the hold: {self.per_connection_kb:.1f} KB per "
            f"connection; after the hold {self.alive} alive, {self.lost} lost, {self.pongs} "
            f"PINGRESPs, {self.sockets} sockets open in the server; server CPU while idle "
            f"{self.cpu_hold:.3f} cores"
        )


def socket_count(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def idle_run(target: str, settings: Settings, devices: list[Device]) -> Idle:
    args = settings.args
    directory = settings.root / f"idle-{target}"
    names = Names()
    if target == "mosquitto":
        server = await start_mosquitto(directory, settings.pki)
    else:
        server, _ = await start_sink(directory, settings, "sqlite", names, len(devices) + 100)
    loadgen: LoadGen | None = None
    try:
        await asyncio.sleep(1.0)
        rss_before = memory_mb(server.pid)[0]
        listed = directory / "devices.json"
        listed.write_text(json.dumps([d.__dict__ for d in devices]))
        spec: dict[str, object] = {
            "devices": str(listed), "ca": str(settings.pki.ca), "port": server.port,
            "format": "raw", "window": 1, "messages": 1, "warmup": 0, "per_envelope": 1,
            "keep_alive": args.keep_alive, "ping": True, "concurrency": 50,
        }  # fmt: skip
        loadgen, connect_seconds = await LoadGen.start(spec, 600)
        await asyncio.sleep(2.0)
        rss_after = memory_mb(server.pid)[0]
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        await asyncio.sleep(args.hold)
        cpu_hold = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - t0)
        rss_end = memory_mb(server.pid)[0]
        sockets = socket_count(server.pid)
        await loadgen.send("status")
        alive, lost, pongs = (int(w) for w in await loadgen.expect("status", 60))
    finally:
        if loadgen is not None:
            await loadgen.stop()
        await server.stop()
    return Idle(
        target, len(devices), connect_seconds, rss_before, rss_after, rss_end, alive, lost,
        pongs, sockets, cpu_hold,
    )  # fmt: skip
