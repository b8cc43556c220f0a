"""Ingest benchmark: our MQTT ingest server against Mosquitto and amqtt, under the same load.

N concurrent publishers each send QoS 1 PUBLISH packets with 200-byte payloads, pipelined up to a
bounded window of unacknowledged packets per client, to each server in turn: `IngestServer` with a
no-op durable stage, a Mosquitto broker and an amqtt broker, each with TLS (mutual, a device
certificate from our ``certs`` package) and without. Every server runs in its own process, so its
CPU time (``/proc/PID/stat`` utime + stime) and peak RSS (``VmHWM`` in ``/proc/PID/status``) are
its own; the load generator runs in separate worker processes. A fresh server process serves each
run; runs are interleaved (run 1 of every server and TLS mode, then run 2, ...) and medians are
reported. The CPU that other processes use during each measured window is measured too
(``/proc/stat``); a window disturbed by more than ``--max-other`` cores is measured again.

Each client connects (clean session), sends ``--warmup`` publishes and waits for their PUBACKs;
then every client is told to go at once and the measured window runs until the last PUBACK of
``--events`` publishes per client. A client keeps at most ``--window`` publishes unacknowledged
and tops up in chunks of ``--refill``. The figures are printed; goals are checked, never asserted.

Usage, from the repository root::

    python -m bench.ingest                      # 8 publishers x 10,000 events, 3 runs, TLS on+off
    python -m bench.ingest --publishers 16 --events 20000 --runs 5 --tls off
    python -m bench.ingest --servers ours --profile /tmp/prof   # cProfile of our server

Figures and how to read them: docs/benchmarks.md. The two internal modes ``serve`` and ``load``
are how this script starts its own server and load-generator processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.publisher import Publisher
from bench.wire import connect_packet, publish_packet, utf8

SCRIPT = Path(__file__).resolve()
SERVERS = ("ours", "mosquitto", "amqtt")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
TOPIC = "devices/bench/telemetry"
PAYLOAD_BYTES = 200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The goals this benchmark checks (printed, never asserted).
GOAL_VS_AMQTT = 2.0
GOAL_VS_MOSQUITTO = 0.5
GOAL_CPU_US = 40.0


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- MQTT packets, built by hand ----------------------------------------------------------------


def _publish_packets(count: int) -> list[bytes]:
    """QoS 1 PUBLISH packets with packet ids 1..count (reused cyclically by every client)."""
    payload = bytes(i % 251 for i in range(PAYLOAD_BYTES))
    topic = utf8(TOPIC)
    return [publish_packet(topic, packet_id, payload) for packet_id in range(1, count + 1)]


# -- the load generator (``load`` mode) ---------------------------------------------------------


def _client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context


async def _load_main(args: argparse.Namespace) -> None:
    """Connect, warm up, say ``ready``, wait for ``go`` on stdin, publish, say ``done``, then
    stay (so the orchestrator can still read this process's CPU time) until stdin closes."""
    loop = asyncio.get_running_loop()
    context = _client_context(args.ca, args.cert, args.key) if args.ca else None
    packets = _publish_packets(min(65535, max(4096, args.window * 8)))
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    publishers: list[Publisher] = []
    try:
        for index in range(args.clients):
            client_id = f"bench-{args.name}-{index}"
            _, publisher = await loop.create_connection(
                lambda client_id=client_id: Publisher(
                    connect_packet(client_id), packets, args.window, args.refill, client_id
                ),
                HOST,
                args.port,
                ssl=context,
                server_hostname="localhost" if context else None,
            )
            publishers.append(publisher)
            await asyncio.wait_for(publisher.connected, 30)
        if args.warmup:
            await asyncio.gather(*(p.publish(args.warmup) for p in publishers))
        _out("ready")
        if (await stdin.readline()).strip() != b"go":
            return
        start = time.perf_counter()
        await asyncio.gather(*(p.publish(args.events) for p in publishers))
        elapsed = time.perf_counter() - start
        _out(f"done {args.events * len(publishers)} {elapsed:.6f}")
        await stdin.read()
    except Exception as exc:  # reported to the orchestrator, which shows it
        _out(f"error {exc!r}")
    finally:
        for publisher in publishers:
            publisher.close()
        await asyncio.sleep(0.05)


# -- the servers under test (``serve`` mode for ours and amqtt) ---------------------------------


class _NoopStage:
    async def store(self, events: Sequence[object]) -> None:
        return None


def _server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    return context


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def _serve_ours(args: argparse.Namespace) -> None:
    from mqtt_ingest import Anonymous, IngestServer, Limits

    context = _server_context(args.ca, args.cert, args.key) if args.ca else None
    server = IngestServer(
        stage=_NoopStage(),
        authenticator=Anonymous(),
        host=HOST,
        port=args.port,
        ssl_context=context,
        limits=Limits(stop_deadline=1.0),
    )
    async with server:
        _out(f"port {server.port}")
        await _until_sigterm()


async def _serve_amqtt(args: argparse.Namespace) -> None:
    from amqtt.broker import Broker

    listener: dict[str, object] = {"type": "tcp", "bind": f"{HOST}:{args.port}"}
    if args.ca:
        # amqtt's listener asks for a client certificate (CERT_OPTIONAL) and verifies it
        # against cafile; our clients always present one.
        listener |= {"ssl": True, "cafile": args.ca, "certfile": args.cert, "keyfile": args.key}
    config = {
        "listeners": {"default": listener},
        # Only what a broker needs to accept anonymous clients: no packet/event logging
        # plugins and no $SYS publisher, so amqtt is measured at its leanest.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    _out(f"port {args.port}")
    try:
        await _until_sigterm()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 5)


def _serve_main(args: argparse.Namespace) -> None:
    """Run a server until SIGTERM. With ``--profile``, cProfile runs between SIGUSR1 and SIGUSR2
    (the orchestrator sends them around the measured window) and its stats go to that file."""
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
        signal.signal(signal.SIGUSR2, lambda *_: profile.disable())
    try:
        asyncio.run(_serve_ours(args) if args.kind == "ours" else _serve_amqtt(args))
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)


# -- measuring processes ------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _system_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``: everything but idle, iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


async def _wait_quiet(max_load: float, patience: float) -> float:
    """Wait (up to ``patience`` seconds) until other processes use less than ``max_load`` cores;
    returns the load last seen. The processes of this benchmark are idle when this is called."""
    deadline = time.monotonic() + patience
    while True:
        before = _system_busy()
        await asyncio.sleep(0.5)
        load = (_system_busy() - before) / 0.5
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
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(SCRIPT.parents[1]), env.get("PYTHONPATH")])
    )
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


@dataclass(frozen=True)
class _Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path
    device_key: Path


def _make_pki(directory: Path) -> _Pki:
    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    device = ca.issue_device("bench-device")
    return _Pki(ca.cert_path, server.cert_path, server.key_path, device.cert_path, device.key_path)


def _mosquitto_config(port: int, pki: _Pki | None, nodelay: bool) -> str:
    lines = [
        "user root",  # we run as root: stay root so the 0600 keys stay readable
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        f"set_tcp_nodelay {'true' if nodelay else 'false'}",
        f"listener {port} {HOST}",
        "allow_anonymous true",
    ]
    if pki is not None:
        lines += [
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
        ]
    return "\n".join(lines) + "\n"


class _Failed(Exception):
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
class _Settings:
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
    pki: _Pki
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
    kind: str, tls: bool, settings: _Settings, label: str
) -> tuple[asyncio.subprocess.Process, Path, int]:
    pki = settings.pki if tls else None
    last = ""
    for attempt in range(3):
        port = _free_port()
        log_path = settings.workdir / f"{label}-{attempt}.log"
        if kind == "mosquitto":
            config = settings.workdir / f"{label}.conf"
            config.write_text(_mosquitto_config(port, pki, settings.nodelay))
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
    raise _Failed(f"{label}: the server did not start:\n{last}")


async def _start_workers(
    port: int, tls: bool, settings: _Settings, label: str
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
        raise _Failed(f"load generator: no '{word}' within {within:.0f}s") from None
    parts = line.decode().split()
    if not parts or parts[0] != word:
        raise _Failed(f"load generator: expected '{word}', got {line.decode().strip()!r}")
    return parts[1:]


async def _one_run(kind: str, tls: bool, run: int, settings: _Settings) -> Sample:
    label = f"{kind}-tls-{'on' if tls else 'off'}-run{run}"
    server, server_log, port = await _start_server(kind, tls, settings, label)
    workers: list[asyncio.subprocess.Process] = []
    try:
        workers = await _start_workers(port, tls, settings, label)
        await asyncio.gather(*(_expect(w, "ready", settings.timeout) for w in workers))
        await _wait_quiet(settings.max_other, settings.quiet_wait)
        system0 = _system_busy()
        profiling = settings.profile is not None and kind == "ours"
        if profiling:
            server.send_signal(signal.SIGUSR1)
        server_cpu0 = _cpu_seconds(server.pid)
        loadgen_cpu0 = sum(_cpu_seconds(w.pid) for w in workers)
        start = time.perf_counter()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        done = await asyncio.gather(*(_expect(w, "done", settings.timeout) for w in workers))
        seconds = time.perf_counter() - start
        if profiling:
            server.send_signal(signal.SIGUSR2)
        server_cpu = _cpu_seconds(server.pid) - server_cpu0
        loadgen_cpu = sum(_cpu_seconds(w.pid) for w in workers) - loadgen_cpu0
        other_cpu = max(0.0, _system_busy() - system0 - server_cpu - loadgen_cpu)
        peak = _peak_rss(server.pid)
        events = sum(int(parts[0]) for parts in done)
    except _Failed as exc:
        raise _Failed(f"{label}: {exc}\n--- server log ---\n{_tail(server_log)}") from None
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


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    server: str
    tls: bool
    rate: float
    rate_min: float
    rate_max: float
    cpu_us: float
    peak_mb: float
    loadgen: float
    other: float
    runs: int


def _summarise(samples: Sequence[Sample]) -> list[Row]:
    groups: dict[tuple[str, bool], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.server, sample.tls].append(sample)
    rows = []
    for (server, tls), group in groups.items():
        rates = [s.rate for s in group]
        rows.append(
            Row(
                server,
                tls,
                statistics.median(rates),
                min(rates),
                max(rates),
                statistics.median(s.cpu_us for s in group),
                statistics.median(s.peak_rss for s in group) / 2**20,
                statistics.median(s.loadgen_load for s in group),
                max(s.other_load for s in group),
                len(group),
            )
        )
    order = {name: i for i, name in enumerate(SERVERS)}
    rows.sort(key=lambda r: (r.tls, order[r.server]))
    return rows


def _paired(samples: Sequence[Sample], other: str, tls: bool) -> str:
    """Ours/other per run (the two ran minutes apart at most): median and range."""
    rates = {(s.server, s.run): s.rate for s in samples if s.tls == tls}
    ratios = [
        rates["ours", run] / rates[other, run]
        for (server, run) in rates
        if server == "ours" and (other, run) in rates
    ]
    if not ratios:
        return ""
    return (
        f" [per-run pairs: median {statistics.median(ratios):.2f}x, "
        f"{min(ratios):.2f} - {max(ratios):.2f}]"
    )


def _report(rows: Sequence[Row], samples: Sequence[Sample]) -> None:
    _out("| server | TLS | events/s (median) | min - max | server CPU us/event | peak RSS MB "
         "| load-gen cores | other cores (max) | runs |")  # fmt: skip
    _out("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        _out(
            f"| {r.server} | {'on' if r.tls else 'off'} | {r.rate:,.0f} "
            f"| {r.rate_min:,.0f} - {r.rate_max:,.0f} | {r.cpu_us:.1f} | {r.peak_mb:.1f} "
            f"| {r.loadgen:.2f} | {r.other:.2f} | {r.runs} |"
        )
    _out()
    by_key = {(r.server, r.tls): r for r in rows}
    for tls in (False, True):
        ours = by_key.get(("ours", tls))
        if ours is None:
            continue
        mode = "TLS on " if tls else "TLS off"
        parts = []
        amqtt = by_key.get(("amqtt", tls))
        if amqtt is not None:
            ratio = ours.rate / amqtt.rate
            met = "met" if ratio >= GOAL_VS_AMQTT else "MISSED"
            parts.append(
                f"ours/amqtt = {ratio:.2f}x (goal >= {GOAL_VS_AMQTT}x: {met})"
                + _paired(samples, "amqtt", tls)
            )
        mosquitto = by_key.get(("mosquitto", tls))
        if mosquitto is not None:
            ratio = ours.rate / mosquitto.rate
            met = "met" if ratio >= GOAL_VS_MOSQUITTO else "MISSED"
            parts.append(
                f"ours/mosquitto = {ratio:.2f}x (goal >= {GOAL_VS_MOSQUITTO}x: {met})"
                + _paired(samples, "mosquitto", tls)
            )
        met = "met" if ours.cpu_us <= GOAL_CPU_US else "MISSED"
        parts.append(f"ours CPU = {ours.cpu_us:.1f} us/event (goal <= {GOAL_CPU_US:.0f}: {met})")
        _out(f"{mode}: " + ";\n         ".join(parts))
    busy = [r for r in rows if r.loadgen >= 0.9]
    if busy:
        names = ", ".join(f"{r.server}/TLS {'on' if r.tls else 'off'}" for r in busy)
        _out(
            f"Note: the load generator was busy >= 0.9 cores for {names}: those rates may be "
            "limited by the generator (or by the two servers sharing the machine's cores), "
            "not by the server."
        )


def _profile_report(directory: Path, top: int = 25) -> None:
    for path in sorted(directory.glob("*.prof")):
        stats = pstats.Stats(str(path))
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(entry[2] for entry in raw.values()) or 1.0
        _out(f"\nProfile {path.name} (tottime shares of {total:.2f}s profiled CPU; cProfile "
             "inflates Python-level calls):")  # fmt: skip
        ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
        for (filename, line, name), (_, calls, tottime, cumtime, _) in ranked:
            where = _short(filename)
            _out(
                f"  {tottime / total:6.1%}  tot {tottime:7.3f}s  cum {cumtime:7.3f}s  "
                f"{calls:>9} calls  {where}:{line}({name})"
            )
        _out("  Cumulative (time inside, callees included) of mqtt_ingest, amqtt and keep-alive:")
        mine = [
            item
            for item in raw.items()
            if any(m in item[0][0] for m in ("mqtt_ingest/", "amqtt/", "asyncio/timeouts.py"))
        ]
        for (filename, line, name), (_, calls, _, cumtime, _) in sorted(
            mine, key=lambda item: item[1][3], reverse=True
        )[:15]:
            _out(f"  {cumtime / total:6.1%}  {calls:>9} calls  {_short(filename)}:{line}({name})")
        by_area: dict[str, float] = defaultdict(float)
        for (filename, _, name), entry in raw.items():
            by_area[_area(filename, name)] += entry[2]
        _out("  By area (tottime, areas >= 0.5%):")
        for area, seconds in sorted(by_area.items(), key=lambda item: item[1], reverse=True):
            if seconds / total >= 0.005:
                _out(f"    {seconds / total:6.1%}  {area}")


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _area(filename: str, name: str) -> str:
    if filename == "~":
        if "poll" in name:
            return "epoll wait (idle time and the syscall)"
        if "ssl" in name.lower():
            return "ssl (C: read/write/encrypt)"
        if "socket" in name or "send" in name or "recv" in name:
            return "socket syscalls (C)"
        return "other builtins (C)"
    for area in ("mqtt_ingest/", "amqtt/", "asyncio/"):
        if area in filename:
            return area + Path(filename).name
    return _short(filename)


# -- entry points -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="QoS 1 ingest benchmark: ours vs Mosquitto vs amqtt, TLS on and off.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--publishers", type=int, default=8, help="concurrent publishing clients")
    parser.add_argument("--events", type=int, default=10000, help="measured events per publisher")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up events per publisher")
    parser.add_argument("--window", type=int, default=32, help="unacked publishes per client")
    parser.add_argument(
        "--refill",
        type=int,
        default=0,
        help="top a client's window up once this many slots are free (0: half the window)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per server and TLS mode")
    parser.add_argument("--tls", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated subset of " + "/".join(SERVERS),
    )
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per phase")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.2,
        help="cores other processes may use during a measurement before it is retried",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the machine to be quiet before each measurement",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a measurement disturbed by others"
    )
    parser.add_argument(
        "--mosquitto-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set_tcp_nodelay in the Mosquitto config (asyncio sets TCP_NODELAY itself)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run our server under cProfile, write .prof files here and print the top functions "
        "(slows our server down: its figures are then not comparable)",
    )
    return parser


async def _run_main(args: argparse.Namespace) -> int:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        _out(f"unknown servers: {', '.join(sorted(unknown))}")
        return 2
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.tls]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        settings = _Settings(
            publishers=args.publishers,
            events=args.events,
            warmup=args.warmup,
            window=args.window,
            refill=max(1, min(args.refill or args.window // 2, args.window)),
            workers=max(1, min(args.workers, args.publishers)),
            timeout=args.timeout,
            max_other=args.max_other,
            quiet_wait=args.quiet_wait,
            retries=args.retries,
            nodelay=args.mosquitto_nodelay,
            workdir=workdir,
            pki=_make_pki(workdir / "pki"),
            profile=args.profile,
        )
        _out(
            f"{args.publishers} publishers x {args.events} QoS 1 events ({PAYLOAD_BYTES}-byte "
            f"payloads, window {args.window}, {args.warmup} warm-up) per run; {args.runs} runs; "
            f"{settings.workers} load-generator process(es); {os.cpu_count()} CPUs; "
            f"Python {sys.version.split()[0]}"
        )
        samples: list[Sample] = []
        for run in range(1, args.runs + 1):
            for tls in modes:
                for kind in servers:
                    sample = await _measure(kind, tls, run, settings)
                    if sample is not None:
                        samples.append(sample)
        _out()
        if samples:
            _report(_summarise(samples), samples)
        if args.profile is not None:
            _profile_report(args.profile)
    return 0 if samples else 1


async def _measure(kind: str, tls: bool, run: int, settings: _Settings) -> Sample | None:
    """One sample, re-run (up to ``settings.retries`` times) if other processes disturbed it."""
    sample: Sample | None = None
    for attempt in range(settings.retries + 1):
        try:
            sample = await _one_run(kind, tls, run, settings)
        except _Failed as exc:
            _out(f"FAILED: {exc}")
            return None
        disturbed = sample.other_load > settings.max_other
        _out(
            f"run {run} TLS {'on ' if tls else 'off'} {kind:<9} "
            f"{sample.rate:>9,.0f} events/s  {sample.cpu_us:6.1f} us/event  "
            f"peak RSS {sample.peak_rss / 2**20:6.1f} MB  "
            f"load-gen {sample.loadgen_load:.2f} cores  other {sample.other_load:.2f} cores"
            + (
                "  (disturbed" + (": again)" if attempt < settings.retries else ": kept)")
                if disturbed
                else ""
            )
        )
        if not disturbed:
            break
    return sample


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        parser = argparse.ArgumentParser(prog="bench.ingest serve")
        parser.add_argument("kind", choices=("ours", "amqtt"))
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--ca")
        parser.add_argument("--cert")
        parser.add_argument("--key")
        parser.add_argument("--profile")
        _serve_main(parser.parse_args(argv[1:]))
        return 0
    if argv and argv[0] == "load":
        parser = argparse.ArgumentParser(prog="bench.ingest load")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--name", default="w0")
        parser.add_argument("--clients", type=int, required=True)
        parser.add_argument("--events", type=int, required=True)
        parser.add_argument("--warmup", type=int, default=0)
        parser.add_argument("--window", type=int, default=32)
        parser.add_argument("--refill", type=int, default=1)
        parser.add_argument("--ca")
        parser.add_argument("--cert")
        parser.add_argument("--key")
        asyncio.run(_load_main(parser.parse_args(argv[1:])))
        return 0
    return asyncio.run(_run_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
