"""Benchmark of the uplink's drain (issue #6), side by side with bare references in one run.

    python -m bench.drain [--events 200000] [--runs 3] [--window 100] ...

Everything runs on this machine, each program in its own process: ``edge-agent run`` (the console
script, with a generated config), ``cloud-sink run`` (sqlite core queue), Mosquitto (mutual TLS,
``set_tcp_nodelay true``), the bare reference clients and the paced producer. TLS material comes
from our ``certs`` package. Every event has a 200-byte payload and goes up at QoS 1 over mutual
TLS; the backlog is built with the buffer API before the agent starts, then copied for each run.

(a) raw mode: the agent drains ``--events`` to Mosquitto, one event per message, vs a bare
    aiomqtt loop publishing the same number of messages (same topics, payloads, window) to the
    same Mosquitto. Alternating, ``--runs`` times; medians and their ratio (goal >= 0.9x).
(b) batch mode: the agent drains ``--events`` through the sink into the sqlite core queue (goal
    >= 130,000 events/s end to end); reference: a bare aiomqtt loop publishing the same events as
    pre-encoded envelopes (``--format``; 500 events or 64 KiB, the agent's defaults) to the same
    sink, so the ratio says how much of the sink's capacity the agent reaches.
(c) the agent's RSS (``VmRSS`` from ``/proc/PID/status``, sampled while it drains, and ``VmHWM``)
    with ``--rss-events`` buffered (default 5 x ``--events``: 1,000,000), drained in batch mode
    through the sink (goal <= 64 MB); reference: the same agent idle and connected.
(d) end-to-end latency at ``--rate`` events/s for ``--latency-seconds`` (after a warm-up), with
    ``durability = "full"`` on both sides: a producer process publishes QoS 1 to the agent's local
    listener (send time in the payload, ``CLOCK_MONOTONIC``, which is system-wide); this process
    polls the core queue every 0.5 ms and takes each event's latency when it first sees its row
    (so a figure includes up to 0.5 ms of polling). Goal: p99 <= 18 ms.

Drain rates are measured from the agent's "online" log line (after CONNACK) to the moment the
last event is gone (a) from the agent's buffer (polled every 10 ms: deleted = acknowledged) or
(b) in the core queue; the bare loops from CONNACK to the last PUBACK. Figures are printed, never
asserted: a missed goal is reported as missed. ``--profile DIR`` adds one extra (a) and (b)
drain with the agent under cProfile (its event-loop thread) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import itertools
import json
import math
import os
import re
import secrets
import shutil
import socket
import sqlite3
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.child import REPO_ROOT, answer, run_child
from bench.load import PAYLOAD_BYTES, payloads, topics
from bench.report import out, percentile, print_profile, scratch, table, yes
from bench.wire import connect_packet, length, utf8
from mqtt_ingest.envelope import BATCH_FORMATS

BIN = Path(sys.executable).parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
DEVICE = "bench-dev"
AUDIENCE = "bench-sink"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Goals of issue #6 (printed, never asserted).
GOAL_RAW_RATIO = 0.9
GOAL_BATCH_RATE = 130_000
GOAL_RSS_MB = 64.0
GOAL_P99_MS = 18.0

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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of a process's main thread ("main": the agent's event loop) and of all its
    other threads together ("threads": the buffer's, mostly). Python 3.11 does not name its
    threads for the kernel, so they are told apart by thread id. A thread that ends between two
    readings drops out of the difference; the agent's threads live as long as it does."""
    seconds = {"main": 0.0, "threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        name = "main" if task.name == str(pid) else "threads"
        seconds[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (MiB)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", math.nan), values.get("VmHWM", math.nan)


# -- PKI and configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path
    device_key: Path

    def client_context(self) -> ssl.SSLContext:
        """As the agent builds it (`edge_agent.tls.client_context`)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.device_cert), str(self.device_key))
        return context


def make_pki(directory: Path) -> Pki:
    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    device = ca.issue_device(DEVICE)
    return Pki(ca.cert_path, server.cert_path, server.key_path, device.cert_path, device.key_path)


def batch_format(args: argparse.Namespace | None) -> str:
    """The batch envelope format of (b)-(d): ``--format``, else the agent's default."""
    from edge_agent.config import UplinkConfig

    if args is not None and args.format is not None:
        return str(args.format)
    return str(UplinkConfig.model_fields["format"].default)


def agent_toml(
    data_dir: Path,
    pki: Pki,
    port: int,
    *,
    raw: bool,
    window: int,
    durability: str,
    args: argparse.Namespace | None = None,
) -> str:
    """One catch-all rule (QoS 1, priority 0); raw: no password (Mosquitto checks the
    certificate), batch: device-signed tokens for the sink. The lingers are the agent's defaults
    unless ``--commit-linger`` / ``--batch-linger`` set them."""
    token = 'mode = "none"' if raw else f'audience = "{AUDIENCE}"'
    buffer_extra = uplink_batch = ""
    if args is not None and args.commit_linger is not None:
        buffer_extra = f'commit_linger = "{args.commit_linger:g}ms"\n'
    if args is not None and args.batch_linger is not None:
        uplink_batch = f'[uplink.batch]\nlinger = "{args.batch_linger:g}ms"\n\n'
    return (
        f'[agent]\ndevice_id = "{DEVICE}"\ndata_dir = {json.dumps(str(data_dir))}\n\n'
        f'[buffer]\ndurability = "{durability}"\nmax_events = 100_000_000\nmax_bytes = "64GiB"\n'
        f"{buffer_extra}\n"
        "[listener]\nport = 0\n\n"
        f'[uplink]\nhost = "localhost"\nport = {port}\n'
        f'format = "{"raw" if raw else batch_format(args)}"\nwindow = {window}\n\n'
        f"{uplink_batch}"
        f'[uplink.tls]\nca = "{pki.ca}"\ncert = "{pki.device_cert}"\nkey = "{pki.device_key}"\n\n'
        f"[uplink.token]\n{token}\n\n"
        '[[topics]]\nfilter = "#"\nqos = 1\n'
    )


def write_agent_config(
    root: Path,
    data_dir: Path,
    pki: Pki,
    port: int,
    args: argparse.Namespace,
    *,
    raw: bool,
    durability: str | None = None,
) -> Path:
    """``root/agent.toml`` with the run's window, lingers and durability (unless overridden)."""
    config = root / "agent.toml"
    config.write_text(
        agent_toml(
            data_dir,
            pki,
            port,
            raw=raw,
            window=args.window,
            durability=durability or args.durability,
            args=args,
        )
    )
    return config


def sink_toml(pki: Pki, core: Path, linger_ms: float | None) -> str:
    """The sink's defaults, but for ``[listener] batch_linger`` when ``--sink-linger`` sets it."""
    linger = "" if linger_ms is None else f'batch_linger = "{linger_ms:g}ms"\n'
    return (
        f'[listener]\nhost = "127.0.0.1"\nport = 0\nca = "{pki.ca}"\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n{linger}\n'
        f'[auth]\naudience = "{AUDIENCE}"\n\n'
        f'[backend]\ntype = "sqlite"\npath = {json.dumps(str(core))}\n'
    )


def mosquitto_conf(port: int, pki: Pki) -> str:
    return "\n".join(
        [
            "user root",  # run as root: stay root so that the 0600 keys stay readable
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",  # the readiness line
            "connection_messages false",
            "set_tcp_nodelay true",
            f"listener {port} {HOST}",
            "allow_anonymous true",
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    )


# -- processes -----------------------------------------------------------------------------------


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
    """``edge-agent run``; with ``profile``, the same CLI under cProfile (see `_profiled`)."""
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


# -- the backlog ---------------------------------------------------------------------------------


async def build_backlog(directory: Path, events: int, topic_names: list[str]) -> float:
    """``events`` events (round robin over the topics) in a fresh buffer; returns seconds."""
    from edge_agent.buffer import Buffer, NewEvent

    bodies = payloads()
    started = time.perf_counter()
    buffer = await Buffer.open(
        directory,
        durability="normal",
        max_events=events + 1,
        max_bytes=2**40,
        commit_linger=0,
        commit_max_events=50_000,
    )
    try:
        now_ms = int(time.time() * 1000)
        for first in range(0, events, 50_000):
            chunk = [
                NewEvent(
                    topic_names[n % len(topic_names)],
                    bodies[n % len(bodies)],
                    1,
                    0,
                    now_ms,
                    None,
                    "reject",
                )
                for n in range(first, min(events, first + 50_000))
            ]
            for outcome in await buffer.append(chunk):
                if not isinstance(outcome, int):
                    raise RuntimeError(f"backlog: {outcome}")
    finally:
        await buffer.aclose()
    return time.perf_counter() - started


def copy_backlog(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("agent.lock", "*.tmp"))


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(
        path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=5
    )


def buffer_empty(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is None


def core_count(db: sqlite3.Connection) -> int:
    """Rows in the core queue (positions are assigned 1, 2, ... and never deleted here)."""
    value = db.execute("SELECT max(position) FROM events").fetchone()[0]
    return int(value or 0)


# -- (a) and (b): drains -------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    events: int
    seconds: float
    client_cpu: float  # seconds of CPU of the agent or bare client over the drain
    server_cpu: float  # of Mosquitto or the sink
    peak_rss_mb: float = math.nan  # max VmRSS sampled during the drain
    hwm_mb: float = math.nan  # VmHWM at the end
    client_threads: dict[str, float] = field(default_factory=dict)  # the agent's CPU per thread

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def agent_drain(
    root: Path,
    backlog: Path,
    pki: Pki,
    server: Process,
    core: Path | None,
    events: int,
    args: argparse.Namespace,
    profile: Path | None = None,
) -> Drain:
    """Copy the backlog, start the agent against ``server``, wait until every event is gone from
    its buffer (raw) or in the core queue ``core`` (batch)."""
    data = root / "data"
    copy_backlog(backlog, data)
    config = write_agent_config(root, data, pki, server.port, args, raw=core is None)
    server_cpu = cpu_seconds(server.pid)
    agent = await start_agent(config, root / "agent.log", profile)
    try:
        agent_cpu = cpu_seconds(agent.pid)
        threads = thread_cpu_seconds(agent.pid)
        watched = _read_only(core) if core is not None else _read_only(data / "buffer.db")
        peak = 0.0
        deadline = time.monotonic() + args.timeout
        try:
            while True:
                peak = max(peak, memory_mb(agent.pid)[0])
                done = core_count(watched) >= events if core is not None else buffer_empty(watched)
                if done:
                    ended = time.time()
                    break
                if agent.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not drain:\n{agent.log()[-3000:]}")
                await asyncio.sleep(0.01)
            if core is not None and core_count(watched) != events:
                out(f"  WARNING: {core_count(watched)} events in the core queue, sent {events}")
        finally:
            watched.close()
        agent_cpu = cpu_seconds(agent.pid) - agent_cpu
        threads = {
            name: used - threads.get(name, 0.0)
            for name, used in thread_cpu_seconds(agent.pid).items()
        }
        server_cpu = cpu_seconds(server.pid) - server_cpu
        hwm = memory_mb(agent.pid)[1]
        started = online_at(agent)
        if started is None:
            raise RuntimeError(f"no 'online' line in the agent's log:\n{agent.log()[-3000:]}")
    finally:
        status = await agent.stop()
    if status != 0:
        out(f"  WARNING: the agent exited with status {status}")
    link = json.loads((data / "link.json").read_text())
    if link["delivered"] != events:
        out(f"  WARNING: the agent reports {link['delivered']} delivered, expected {events}")
    shutil.rmtree(data)
    return Drain(events, ended - started, agent_cpu, server_cpu, peak, hwm, threads)


async def bare_drain(
    root: Path, pki: Pki, server: Process, events: int, args: argparse.Namespace, *, batch: bool
) -> Drain:
    """The bare aiomqtt loop, in its own process (`_bare`), against ``server``."""
    make_dir(root)
    token = ""
    if batch:
        token = await asyncio.to_thread(_device_token, root, pki, server.port)
    server_cpu = cpu_seconds(server.pid)
    result = await run_child(
        "the bare loop", "bench.drain", "_bare",
        json.dumps({
            "port": server.port, "events": events, "window": args.window,
            "topics": args.topics, "batch": batch, "token": token, "format": batch_format(args),
            "ca": str(pki.ca), "cert": str(pki.device_cert), "key": str(pki.device_key),
        }),
    )  # fmt: skip
    server_cpu = cpu_seconds(server.pid) - server_cpu
    return Drain(events, float(result["seconds"]), float(result["cpu"]), server_cpu)


def _device_token(root: Path, pki: Pki, port: int) -> str:
    """A device-signed JWT, minted by the agent's own code from an agent config."""
    from edge_agent.config import parse_config
    from edge_agent.token import token_source
    from mqtt_ingest.clock import SystemClock

    text = agent_toml(root / "unused", pki, port, raw=False, window=1, durability="full")
    config = parse_config(text)
    assert config.uplink is not None
    value = token_source(config.uplink, DEVICE, SystemClock()).current().value
    assert value is not None
    return value


async def _bare(spec: dict[str, object]) -> dict[str, float]:
    """The reference client: ``window`` coroutines share one aiomqtt client, each publishing the
    next message and awaiting its PUBACK (so at most ``window`` are in flight)."""
    import aiomqtt

    from edge_agent.config import UplinkBatch
    from mqtt_ingest.envelope import EnvelopeEvent, encode, format_username

    events, window = int(str(spec["events"])), int(str(spec["window"]))
    names = [f"devices/{DEVICE}/{t}" for t in topics(int(str(spec["topics"])))]
    bodies = payloads()
    messages: list[tuple[str, bytes]] = []
    if spec["batch"]:
        # Runs of consecutive events of one topic, cut like the agent cuts them.
        limits, epoch = UplinkBatch(), secrets.token_hex(8)
        per_envelope = min(limits.max_events, (limits.max_bytes - 64) // (PAYLOAD_BYTES + 24))
        now_ms = int(time.time() * 1000)
        per_topic: list[list[tuple[str, bytes]]] = []
        for t, topic in enumerate(names):
            seqs = list(range(t + 1, events + 1, len(names)))
            per_topic.append([])
            for first in range(0, len(seqs), per_envelope):
                run = [EnvelopeEvent(s, now_ms, bodies[s % len(bodies)]) for s in
                       seqs[first : first + per_envelope]]  # fmt: skip
                version = BATCH_FORMATS[str(spec["format"])]
                per_topic[-1].append((topic, encode(epoch, run, version=version)))
        # Topics interleaved, as the events were buffered.
        messages = [m for group in itertools.zip_longest(*per_topic) for m in group if m]
    else:
        messages = [(names[n % len(names)], bodies[n % len(bodies)]) for n in range(events)]
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec["ca"]))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(spec["cert"]), str(spec["key"]))
    token = str(spec["token"]) or None
    client = aiomqtt.Client(
        "localhost",
        int(str(spec["port"])),
        identifier=f"{DEVICE}" if token else "bench-bare",
        username=format_username(DEVICE, format=str(spec["format"])) if token else None,
        password=token,
        tls_context=context,
        keepalive=30,
        timeout=10,
        clean_session=True,
        max_inflight_messages=window,
    )
    client.pending_calls_threshold = window + 1
    cpu = time.process_time()
    async with client:
        queue = iter(messages)
        started = time.perf_counter()

        async def worker() -> None:
            for topic, payload in queue:
                await client.publish(topic, payload, qos=1, timeout=60)

        async with asyncio.TaskGroup() as tasks:
            for _ in range(window):
                tasks.create_task(worker())
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu": time.process_time() - cpu, "messages": len(messages)}


# -- (c) RSS reference: the agent idle and connected ---------------------------------------------


async def idle_rss(root: Path, pki: Pki, sink: Process, args: argparse.Namespace) -> float:
    """VmRSS of an agent with an empty buffer, 2 s after it came online to the sink."""
    make_dir(root)
    config = write_agent_config(root, root / "data", pki, sink.port, args, raw=False)
    agent = await start_agent(config, root / "agent.log")
    try:
        deadline = time.monotonic() + 30
        while online_at(agent) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the idle agent did not come online:\n{agent.log()[-3000:]}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        return memory_mb(agent.pid)[0]
    finally:
        await agent.stop()


# -- (d) end-to-end latency -----------------------------------------------------------------------


class _Producer(asyncio.Protocol):
    """QoS 1 PUBLISH to the agent's listener, one per call of `send`; counts PUBACKs."""

    def __init__(self) -> None:
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acked = 0
        self._data = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(connect_packet("bench-producer"))

    def send(self, topic: bytes, n: int) -> None:
        assert self.transport is not None
        payload = struct.pack("!QQ", time.monotonic_ns(), n).ljust(PAYLOAD_BYTES, b"\x00")
        body = topic + (n % 65535 + 1).to_bytes(2, "big") + payload
        self.transport.write(b"\x32" + length(len(body)) + body)

    def data_received(self, data: bytes) -> None:
        self._data += data
        while len(self._data) >= 4:  # CONNACK and PUBACK only: 4 bytes each
            if self._data[0] == 0x20 and not self.connected.done():
                self.connected.set_result(None)
            elif self._data[0] == 0x40:
                self.acked += 1
            del self._data[:4]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(repr(exc)))


async def _produce(port: int, total: int, rate: float, topic_count: int) -> dict[str, float]:
    """Publish ``total`` events at ``rate``/s (absolute schedule), then wait for the acks."""
    loop = asyncio.get_running_loop()
    producer = _Producer()
    await loop.create_connection(lambda: producer, HOST, port)
    await producer.connected
    names = [utf8(t) for t in topics(topic_count)]
    started = time.perf_counter()
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        producer.send(names[n % len(names)], n)
    async with asyncio.timeout(60):
        while producer.acked < total:  # noqa: ASYNC110  # counting acks of a plain protocol
            await asyncio.sleep(0.01)
    return {"seconds": time.perf_counter() - started, "acked": producer.acked}


@dataclass
class Latencies:
    """Per event, in seconds: end to end, and the three legs the core queue's timestamps (whole
    milliseconds, wall clock) tell apart."""

    total: list[float] = field(default_factory=list)
    accept: list[float] = field(default_factory=list)  # sent -> accepted by the agent
    uplink: list[float] = field(default_factory=list)  # accepted -> read by the sink
    store: list[float] = field(default_factory=list)  # read by the sink -> seen in the core queue


def watch_latencies(core: Path, total: int, skip: int, within: float) -> Latencies:
    """Poll the core queue every 0.5 ms; latency of each event = first seen - sent (seconds)."""
    result = Latencies()
    seen = 0
    position = 0
    deadline = time.monotonic() + within
    wall = time.time_ns() - time.monotonic_ns()  # CLOCK_MONOTONIC -> wall clock, in ns
    while not core.exists():
        time.sleep(0.01)
    db = _read_only(core)
    try:
        version = -1
        while seen < total and time.monotonic() < deadline:
            current = db.execute("PRAGMA data_version").fetchone()[0]
            if current != version:
                version = current
                rows = db.execute(
                    "SELECT position, payload, event_time, received_at FROM events"
                    " WHERE position > ? ORDER BY position",
                    (position,),
                ).fetchall()
                now = time.monotonic_ns()
                for position, payload, accepted_ms, received_ms in rows:  # noqa: B007
                    sent, n = struct.unpack_from("!QQ", payload)
                    seen += 1
                    if n >= skip:
                        result.total.append((now - sent) / 1e9)
                        result.accept.append(accepted_ms / 1e3 - (sent + wall) / 1e9)
                        result.uplink.append((received_ms - accepted_ms) / 1e3)
                        result.store.append((now + wall) / 1e9 - received_ms / 1e3)
            time.sleep(0.0005)
    finally:
        db.close()
    if seen < total:
        out(f"  WARNING: {seen} of {total} events reached the core queue")
    for values in (result.total, result.accept, result.uplink, result.store):
        values.sort()
    return result


async def latency_run(root: Path, pki: Pki, args: argparse.Namespace) -> Latencies:
    sink, core = await start_sink(root / "sink", pki, args.sink_linger)
    try:
        config = write_agent_config(
            root, root / "data", pki, sink.port, args, raw=False, durability="full"
        )
        agent = await start_agent(config, root / "agent.log")
        try:
            total = int((args.latency_seconds + args.warmup) * args.rate)
            skip = int(args.warmup * args.rate)
            watcher = asyncio.create_task(
                asyncio.to_thread(watch_latencies, core, total, skip, args.latency_seconds + 60)
            )
            produced = await run_child(
                "the producer", "bench.drain", "_produce",
                str(agent.port), str(total), str(args.rate), str(args.topics),
            )  # fmt: skip
            if produced["acked"] != total:
                out(f"  WARNING: the agent acknowledged {produced['acked']} of {total}")
            return await watcher
        finally:
            await agent.stop()
    finally:
        await sink.stop()


# -- the run -------------------------------------------------------------------------------------


def _line(name: str, drain: Drain, *, rss: bool = False) -> str:
    memory = f", RSS peak {drain.peak_rss_mb:.1f} MB (HWM {drain.hwm_mb:.1f})" if rss else ""
    threads = ", ".join(
        f"{thread} {used / drain.events * 1e6:.1f}" for thread, used in drain.client_threads.items()
    )
    return (
        f"{name} {drain.rate:>9,.0f} ev/s ({drain.seconds:.2f} s; CPU client "
        f"{drain.client_cpu / drain.events * 1e6:.1f} µs/ev{f' ({threads})' if threads else ''}, "
        "server "
        f"{drain.server_cpu / drain.events * 1e6:.1f} µs/ev{memory})"
    )


def _print_profile(path: Path, title: str) -> None:
    print_profile(path, title, [("tottime", 25), ("cumulative", 30)])


async def alternate(
    runs: int, first: Callable[[int], object], second: Callable[[int], object]
) -> None:
    """Run number n of both, alternating which goes first."""
    for number in range(runs):
        order = (first, second) if number % 2 == 0 else (second, first)
        for step in order:
            result = step(number)
            if asyncio.iscoroutine(result):
                await result


Row = tuple[str, str, str, str, str, str]


async def with_sink(
    directory: Path,
    pki: Pki,
    args: argparse.Namespace,
    step: Callable[[Process, Path], object],
) -> None:
    """A fresh sink (and core queue) in ``directory`` for the time of ``step(sink, core)``."""
    sink, core = await start_sink(directory, pki, args.sink_linger)
    try:
        result = step(sink, core)
        if asyncio.iscoroutine(result):
            await result
    finally:
        await sink.stop()


async def part_a(args: argparse.Namespace, root: Path, pki: Pki, backlog: Path) -> list[Row]:
    out(
        f"\n(a) raw mode to Mosquitto: agent vs bare aiomqtt loop, {args.events:,} events per "
        f"run, {args.runs} runs alternating"
    )
    agent_runs: list[Drain] = []
    bare_runs: list[Drain] = []
    broker = await start_mosquitto(root / "mosquitto", pki)
    try:

        async def agent(n: int) -> None:
            agent_runs.append(
                await agent_drain(root / f"a-{n}", backlog, pki, broker, None, args.events, args)
            )
            out(f"  run {n + 1}: " + _line("agent", agent_runs[-1]))

        async def bare(n: int) -> None:
            bare_runs.append(
                await bare_drain(root / f"a-bare-{n}", pki, broker, args.events, args, batch=False)
            )
            out(f"  run {n + 1}: " + _line("bare ", bare_runs[-1]))

        await alternate(args.runs, agent, bare)
        if args.profile is not None:
            path = args.profile / "agent-raw.prof"
            profiled = await agent_drain(
                root / "a-prof", backlog, pki, broker, None, args.events, args, profile=path
            )
            _print_profile(path, "cProfile of the agent, (a) raw drain: " + _line("", profiled))
    finally:
        await broker.stop()
    ratios = sorted(a.rate / b.rate for a, b in zip(agent_runs, bare_runs, strict=True))
    out(f"  per-run ratios agent/bare: {', '.join(f'{r:.3f}' for r in ratios)}")
    agent_rate = statistics.median(d.rate for d in agent_runs)
    bare_rate = statistics.median(d.rate for d in bare_runs)
    ratio = agent_rate / bare_rate
    return [
        (
            "(a) raw drain to Mosquitto",
            f"{agent_rate:,.0f} ev/s",
            f"bare loop {bare_rate:,.0f} ev/s",
            f"{ratio:.3f}",
            f">= {GOAL_RAW_RATIO}x bare",
            yes(ratio >= GOAL_RAW_RATIO),
        )
    ]


async def part_b(args: argparse.Namespace, root: Path, pki: Pki, backlog: Path) -> list[Row]:
    out(
        f"\n(b) batch mode through the sink into the sqlite core queue: agent vs bare loop of "
        f"pre-encoded envelopes, {args.events:,} events per run, {args.runs} runs alternating "
        "(fresh sink and core queue each)"
    )
    agent_runs: list[Drain] = []
    bare_runs: list[Drain] = []

    async def agent(n: int) -> None:
        async def step(sink: Process, core: Path) -> None:
            agent_runs.append(
                await agent_drain(root / f"b-{n}", backlog, pki, sink, core, args.events, args)
            )

        await with_sink(root / f"b-sink-{n}", pki, args, step)
        out(f"  run {n + 1}: " + _line("agent", agent_runs[-1]))

    async def bare(n: int) -> None:
        async def step(sink: Process, core: Path) -> None:
            bare_runs.append(
                await bare_drain(root / f"b-bare-{n}", pki, sink, args.events, args, batch=True)
            )
            with contextlib.closing(_read_only(core)) as db:
                stored = core_count(db)
            if stored != args.events:
                out(f"  WARNING: {stored} events in the core queue, sent {args.events}")

        await with_sink(root / f"b-bare-sink-{n}", pki, args, step)
        out(f"  run {n + 1}: " + _line("bare ", bare_runs[-1]))

    await alternate(args.runs, agent, bare)
    if args.profile is not None:
        path = args.profile / "agent-batch.prof"
        profiled: list[Drain] = []

        async def profiled_step(sink: Process, core: Path) -> None:
            profiled.append(
                await agent_drain(
                    root / "b-prof", backlog, pki, sink, core, args.events, args, profile=path
                )
            )

        await with_sink(root / "b-prof-sink", pki, args, profiled_step)
        _print_profile(path, "cProfile of the agent, (b) batch drain: " + _line("", profiled[0]))
    agent_rate = statistics.median(d.rate for d in agent_runs)
    bare_rate = statistics.median(d.rate for d in bare_runs)
    return [
        (
            "(b) batch drain into the core queue",
            f"{agent_rate:,.0f} ev/s",
            f"bare loop {bare_rate:,.0f} ev/s",
            f"{agent_rate / bare_rate:.3f}",
            f">= {GOAL_BATCH_RATE:,} ev/s",
            yes(agent_rate >= GOAL_BATCH_RATE),
        )
    ]


async def part_c(args: argparse.Namespace, root: Path, pki: Pki) -> list[Row]:
    rss_events = args.rss_events or 5 * args.events
    out(f"\n(c) agent RSS: {rss_events:,} events buffered, drained in batch mode through the sink")
    big = root / "backlog-rss"
    seconds = await build_backlog(big, rss_events, topics(args.topics))
    out(f"  backlog of {rss_events:,} events built in {seconds:.1f} s")
    drains: list[Drain] = []

    async def drain(sink: Process, core: Path) -> None:
        drains.append(await agent_drain(root / "c", big, pki, sink, core, rss_events, args))

    await with_sink(root / "c-sink", pki, args, drain)
    shutil.rmtree(big)
    out("  " + _line("agent", drains[0], rss=True))
    idle: list[float] = []

    async def idle_step(sink: Process, core: Path) -> None:
        idle.append(await idle_rss(root / "c-idle", pki, sink, args))

    await with_sink(root / "c-idle-sink", pki, args, idle_step)
    out(f"  idle connected agent (empty buffer, 2 s after online): VmRSS {idle[0]:.1f} MB")
    rss = drains[0].peak_rss_mb
    return [
        (
            f"(c) agent RSS, {rss_events:,} buffered",
            f"{rss:.1f} MB",
            f"idle connected {idle[0]:.1f} MB",
            f"{rss / idle[0]:.2f}",
            f"<= {GOAL_RSS_MB:g} MB",
            yes(rss <= GOAL_RSS_MB),
        )
    ]


async def part_d(args: argparse.Namespace, root: Path, pki: Pki) -> list[Row]:
    out(
        f"\n(d) end-to-end latency at {args.rate:,.0f} events/s for {args.latency_seconds:g} s "
        f"(after {args.warmup:g} s warm-up), durability full, producer -> agent listener -> "
        "sink -> sqlite core queue"
    )
    legs = await latency_run(root / "d", pki, args)
    latencies = legs.total
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    out(
        f"  {len(latencies)} events: p50 {p50 * 1000:.2f} ms, p90 "
        f"{percentile(latencies, 0.9) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max "
        f"{latencies[-1] * 1000 if latencies else math.nan:.2f} ms"
    )
    for name, values in (
        ("sent -> accepted by the agent", legs.accept),
        ("accepted -> read by the sink", legs.uplink),
        ("read by the sink -> in the core queue", legs.store),
    ):
        out(
            f"    {name:<38} p50 {percentile(values, 0.5) * 1000:6.2f} ms,"
            f" p99 {percentile(values, 0.99) * 1000:6.2f} ms (+-1 ms: whole-ms timestamps)"
        )
    return [
        ("(d) e2e latency p50", f"{p50 * 1000:.2f} ms", "", "", "", "-"),
        (
            "(d) e2e latency p99",
            f"{p99 * 1000:.2f} ms",
            "",
            "",
            f"<= {GOAL_P99_MS:g} ms",
            yes(p99 * 1000 <= GOAL_P99_MS),
        ),
    ]


async def run(args: argparse.Namespace, root: Path) -> None:
    out(
        f"bench.drain: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, OpenSSL {ssl.OPENSSL_VERSION.split()[1]}; data in "
        f"{root}; {PAYLOAD_BYTES}-byte payloads, QoS 1, mutual TLS, {args.topics} topics round "
        f"robin, window {args.window}, durability {args.durability}, "
        f"batch format {batch_format(args)}"
    )
    pki = make_pki(root / "pki")
    rows: list[Row] = []
    if "a" in args.parts or "b" in args.parts:
        backlog = root / "backlog"
        seconds = await build_backlog(backlog, args.events, topics(args.topics))
        out(f"backlog of {args.events:,} events built with the buffer API in {seconds:.1f} s")
        if "a" in args.parts:
            rows += await part_a(args, root, pki, backlog)
        if "b" in args.parts:
            rows += await part_b(args, root, pki, backlog)
        shutil.rmtree(backlog)
    if "c" in args.parts:
        rows += await part_c(args, root, pki)
    if "d" in args.parts:
        rows += await part_d(args, root, pki)
    out("\nSummary (rates: medians of the runs):")
    table(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--events", type=int, default=200_000, help="backlog of (a) and (b)")
    parser.add_argument("--runs", type=int, default=3, help="runs of (a) and (b) (default 3)")
    parser.add_argument(
        "--rss-events", type=int, default=None, help="backlog of (c) (default 5 x --events)"
    )
    parser.add_argument("--topics", type=int, default=8, help="topics, round robin (default 8)")
    parser.add_argument("--window", type=int, default=100, help="[uplink] window (default 100)")
    parser.add_argument(
        "--durability", choices=["full", "normal"], default="full", help="for (a)-(c); (d): full"
    )
    parser.add_argument(
        "--format", choices=sorted(BATCH_FORMATS), default=None,
        help="the envelope format of (b)-(d), agent and bare loop (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--commit-linger", type=float, default=None, metavar="MS",
        help="the agent's [buffer] commit_linger in ms (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-linger", type=float, default=None, metavar="MS",
        help="the agent's [uplink.batch] linger in ms (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--sink-linger", type=float, default=None, metavar="MS",
        help="the sink's [listener] batch_linger in ms (default: the sink's default)",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, default=1000.0, help="(d) events per second")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="(d) measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="(d) unmeasured seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up a drain after this")
    parser.add_argument(
        "--parts", default="abcd", help="which of (a)-(d) to run, e.g. 'ab' (default abcd)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary data goes")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="cProfile the agent in one extra (a) and (b) drain; .prof files go to DIR",
    )  # fmt: skip
    return parser.parse_args(argv)


def _profiled(path: Path, argv: list[str]) -> int:
    """``edge-agent`` under cProfile (the event-loop thread); the stats are dumped at exit."""
    from edge_agent.cli import main as agent_main

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return agent_main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        answer(asyncio.run(_bare(json.loads(argv[1]))))
        return
    if argv[:1] == ["_produce"]:
        port, total, rate, topic_count = int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4])
        answer(asyncio.run(_produce(port, total, rate, topic_count)))
        return
    if argv[:1] == ["_profiled"]:
        sys.exit(_profiled(Path(argv[1]), argv[2:]))
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with scratch("bench-drain-", args.dir) as root:
        asyncio.run(run(args, root))


if __name__ == "__main__":
    main()
