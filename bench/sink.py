"""Benchmark of the cloud sink (issue #5), side by side with its references in one run.

    python -m bench.sink [--events 100000] [--runs 3] [--publishers 32] [--connections 2000] ...

Every program runs in its own process on this machine: ``cloud-sink run`` (the console script,
a generated config, fresh for every run), Mosquitto 2.0.11 (mutual TLS, ``set_tcp_nodelay true``,
no subscriber: it receives and forwards nothing), the load generator and the bare backend loops.
TLS material comes from our ``certs`` package: one device certificate per publisher, since the
sink takes the device id from the certificate's CN and wants it as client id and user name too;
each CONNECT carries a device-signed ES256 JWT.

(1) Throughput. ``--publishers`` mutual-TLS clients in one load-generator process (asyncio
    protocols, pre-encoded packets, no MQTT library) publish QoS 1 to
    ``devices/<id>/telemetry``, each keeping ``--window`` PUBLISH packets unacknowledged. Two
    formats: ``raw`` (one 200-byte event per PUBLISH, the sink generates the ids) and ``batch``
    (``format=batch-v2``, the agent's default: envelopes of ``--envelope-events`` events with
    unique seqs, as the agent cuts them). The measured window runs from "go" to the last PUBACK
    of ``--events`` events (after a warm-up); the sink acknowledges only what its backend
    confirmed, so the rate is the confirmed rate. Targets: the sink into ``sqlite``, ``amqp``
    (RabbitMQ), ``nats`` (JetStream), and Mosquitto receiving the same packets (no forwarding).
(2) References: each backend's bare client loop in its own process, the same messages (subject
    or routing key, headers, 200-byte payloads, persistent / file storage) at several windows:
    nats-py ``publish_async`` with ``publish_async_max_pending`` = window; aio-pika with
    publisher confirms and ``window`` publishes awaiting their confirm (``mandatory``). The
    messages are built before the clock starts. The best window is the reference.
(3) Idle connections: ``--connections`` mutual-TLS clients (a certificate and a JWT each) connect
    to a fresh sink (sqlite backend, ``max_connections`` raised) and to Mosquitto, stay idle for
    ``--hold`` seconds with keep-alive ``--keep-alive`` (PINGREQ every half of it); reported:
    VmRSS before and after, per connection, how many stayed connected.

CPU per event is utime + stime from ``/proc/PID/stat`` over the measured window (sink, load
generator, the broker's own processes). Runs alternate between targets; rates are medians. A
fresh sink, core-queue database, RabbitMQ exchange/queue and JetStream stream (unique names,
deleted afterwards) serve every run; the number of messages the backend holds is checked after
each. ``--profile DIR`` adds one cProfile'd sink run per backend (batch) and prints its top.
Figures are printed, never asserted: a missed goal is reported as missed. docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import resource
import secrets
import signal
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.drain import (
    BIN,
    HOST,
    SINK_READY,
    Pki,
    Process,
    cpu_seconds,
    make_dir,
    memory_mb,
    start_mosquitto,
)
from bench.publisher import Publisher
from bench.report import out, table, yes
from bench.wire import connect_packet, publish_packet, utf8

if TYPE_CHECKING:
    from certs import CertificateAuthority, Issued

REPO_ROOT = Path(__file__).resolve().parents[1]
AUDIENCE = "bench-sink"
PAYLOAD_BYTES = 200
AMQP_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("BRIDGE_TEST_NATS_URL", "nats://127.0.0.1:4222")
BACKENDS = ("sqlite", "amqp", "nats")
TARGETS = (*BACKENDS, "mosquitto")
FORMATS = ("batch", "raw")

# Goals of issue #5 (printed, never asserted).
GOAL_NATS_RATIO = 1.0
GOAL_AMQP_RATIO = 1.5
GOAL_SQLITE_BATCH = 50_000
GOAL_CONNECTIONS = 2_000


# -- PKI, tokens, packets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: str
    key: str
    token: str


def make_pki(directory: Path, devices: int, prefix: str) -> tuple[Pki, list[Device]]:
    """A CA, a server certificate for localhost/127.0.0.1 and ``devices`` device certificates
    with a device-signed JWT each (ES256, ``sub`` = device id, 50 minutes)."""
    import jwt

    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    issued = issue_devices(ca, directory, [f"{prefix}{n}" for n in range(devices)])
    now = int(time.time())
    result = []
    for device_id, item in issued:
        from certs import load_private_key

        claims = {"sub": device_id, "aud": AUDIENCE, "iat": now, "exp": now + 3000}
        token = jwt.encode(claims, load_private_key(item.key_path), algorithm="ES256")
        result.append(Device(device_id, str(item.cert_path), str(item.key_path), token))
    first = issued[0][1]
    pki = Pki(ca.cert_path, server.cert_path, server.key_path, first.cert_path, first.key_path)
    return pki, result


def issue_devices(
    ca: CertificateAuthority, directory: Path, names: Sequence[str]
) -> list[tuple[str, Issued]]:
    """Device certificates from ``ca``, 200 per index directory: `issue_device` rewrites its
    whole ``index.json`` per certificate, quadratic for thousands of them."""
    from certs import CertificateAuthority

    issued: list[tuple[str, Issued]] = []
    for first in range(0, len(names), 200):
        view = CertificateAuthority(
            make_dir(directory / f"devices-{first // 200}"), ca.certificate, ca.key
        )
        issued += [(name, view.issue_device(name)) for name in names[first : first + 200]]
    return issued


def payload(n: int) -> bytes:
    return bytes((n * 7 + i) % 251 for i in range(PAYLOAD_BYTES))


ENVELOPE_FORMAT = "batch-v2"  # the agent's default


def envelope_packets(
    topic: str, messages: int, per_envelope: int, first_id: int = 1
) -> list[bytes]:
    """``messages`` PUBLISH packets, each an `ENVELOPE_FORMAT` envelope of ``per_envelope``
    events with seqs that never repeat (every event id is new to the backend)."""
    from mqtt_ingest.envelope import BATCH_FORMATS, EnvelopeEvent, encode

    epoch, name, now_ms = secrets.token_hex(8), utf8(topic), int(time.time() * 1000)
    bodies = [payload(n) for n in range(16)]
    packets = []
    for m in range(messages):
        first = m * per_envelope + 1
        events = [
            EnvelopeEvent(s, now_ms, bodies[s % 16]) for s in range(first, first + per_envelope)
        ]
        packets.append(
            publish_packet(
                name,
                (first_id + m - 1) % 65535 + 1,
                encode(epoch, events, version=BATCH_FORMATS[ENVELOPE_FORMAT]),
            )
        )
    return packets


# -- the load generator (``_load``) ---------------------------------------------------------------


async def _load(spec: dict[str, object]) -> None:
    """Connect every device, warm up, say ``ready``; then on stdin: ``go`` (publish, say ``done
    EVENTS SECONDS``), ``status`` (say ``status ALIVE LOST PONGS``); EOF: disconnect, exit."""
    raise_nofile()
    loop = asyncio.get_running_loop()
    listed = Path(str(spec["devices"])).read_text()  # noqa: ASYNC240  # before any I/O starts
    devices = [Device(**d) for d in json.loads(listed)]
    port, fmt, window = int(str(spec["port"])), str(spec["format"]), int(str(spec["window"]))
    messages, warmup = int(str(spec["messages"])), int(str(spec["warmup"]))
    per_envelope, keep_alive = int(str(spec["per_envelope"])), int(str(spec["keep_alive"]))
    publishers: list[Publisher] = []
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    gate = asyncio.Semaphore(int(str(spec.get("concurrency", 64))))
    bodies = [payload(n) for n in range(16)]
    started = time.perf_counter()

    async def connect(device: Device) -> Publisher:
        topic = f"devices/{device.device_id}/telemetry"
        if fmt == "raw":
            name = utf8(topic)
            count = min(4096, warmup + messages)  # ids cycle; more than any window
            packets = [publish_packet(name, i, bodies[i % 16]) for i in range(1, count + 1)]
        else:
            # Mosquitto does not decode envelopes: a few, sent again and again, will do there.
            unique = min(64, warmup + messages) if spec.get("cyclic") else warmup + messages
            packets = envelope_packets(topic, unique, per_envelope)
        username = (
            f"{device.device_id}?format={ENVELOPE_FORMAT}" if fmt == "batch" else device.device_id
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec["ca"]))
        context.load_cert_chain(device.cert, device.key)
        hello = connect_packet(
            device.device_id, keep_alive, username=username, password=device.token
        )
        async with gate:
            _, publisher = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Publisher(hello, packets, window, name=device.device_id),
                    HOST,
                    port,
                    ssl=context,
                    server_hostname="localhost",
                ),
                60,
            )
            await asyncio.wait_for(publisher.connected, 60)
        return publisher

    try:
        async with asyncio.TaskGroup() as tasks:
            pending = [tasks.create_task(connect(d)) for d in devices]
        publishers = [task.result() for task in pending]
        connect_seconds = time.perf_counter() - started
        if warmup:
            await asyncio.gather(*(p.publish(warmup) for p in publishers))
        out(f"ready {connect_seconds:.3f}")
        events_per_message = per_envelope if fmt == "batch" else 1
        pinger: asyncio.Task[None] | None = None
        if spec.get("ping"):

            async def ping() -> None:
                while True:
                    await asyncio.sleep(keep_alive / 2)
                    for publisher in publishers:
                        publisher.ping()

            pinger = asyncio.create_task(ping())
        while line := (await stdin.readline()).strip():
            if line == b"go":
                begin = time.perf_counter()
                await asyncio.gather(*(p.publish(messages) for p in publishers))
                seconds = time.perf_counter() - begin
                out(f"done {messages * events_per_message * len(publishers)} {seconds:.6f}")
            elif line == b"status":
                lost = [p for p in publishers if p.lost is not None]
                pongs = sum(p.pongs for p in publishers)
                alive = len(publishers) - len(lost)
                out(f"status {alive} {len(lost)} {pongs}")
        if pinger is not None:
            pinger.cancel()
    except Exception as exc:  # reported to the orchestrator, which shows it
        out(f"error {exc!r}")
    finally:
        for publisher in publishers:
            publisher.close()
        await asyncio.sleep(0.1)


def raise_nofile() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class LoadGen:
    """The ``_load`` process, driven line by line over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, spec: dict[str, object], within: float) -> tuple[LoadGen, float]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sink", "_load", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        )  # fmt: skip
        gen = cls(process)
        words = await gen.expect("ready", within)
        return gen, float(words[0])

    async def expect(self, word: str, within: float) -> list[str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = (await self.process.stdout.readline()).decode().strip()
                if not line:
                    raise RuntimeError(f"the load generator ended before {word!r}")
                head, *rest = line.split()
                if head == word:
                    return rest
                if head == "error":
                    raise RuntimeError(f"load generator: {line}")

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


# -- backends: names, sink configuration, checks, bare loops ------------------------------------


@dataclass(frozen=True)
class Names:
    """Unique RabbitMQ / JetStream names for one run (as tests/harness/brokers.py makes them)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def exchange(self) -> str:
        return f"bridge-bench-{self.tag}.events"

    @property
    def dead_letter(self) -> str:
        return f"bridge-bench-{self.tag}.dead-letter"

    @property
    def stream(self) -> str:
        return f"bridge-bench-{self.tag}"

    @property
    def subject_prefix(self) -> str:
        return f"bb{self.tag}"


def backend_toml(backend: str, names: Names, core: Path) -> str:
    if backend == "sqlite":
        return f'[backend]\ntype = "sqlite"\npath = {json.dumps(str(core))}\n'
    if backend == "amqp":
        return (
            f'[backend]\ntype = "amqp"\nurl = "{AMQP_URL}"\nexchange = "{names.exchange}"\n'
            f'queue = "{names.exchange}"\ndead_letter_exchange = "{names.dead_letter}"\n'
            f'dead_letter_queue = "{names.dead_letter}"\n'
        )
    return (
        f'[backend]\ntype = "nats"\nurl = "{NATS_URL}"\nstream = "{names.stream}"\n'
        f'subject_prefix = "{names.subject_prefix}"\n'
        f'dead_letter_stream = "{names.stream}-dead-letter"\n'
        f'dead_letter_subject_prefix = "{names.subject_prefix}-dlq"\n'
    )


def sink_toml(
    pki: Pki,
    backend: str,
    names: Names,
    core: Path,
    max_connections: int,
    linger_ms: float | None = None,
    tls_read_buffer: int = 0,
) -> str:
    linger = "" if linger_ms is None else f'batch_linger = "{linger_ms:g}ms"\n'
    if tls_read_buffer:
        linger += f"tls_read_buffer = {tls_read_buffer}\n"
    return (
        f'[listener]\nhost = "127.0.0.1"\nport = 0\nca = "{pki.ca}"\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
        f"max_connections = {max_connections}\n{linger}\n"
        f'[auth]\naudience = "{AUDIENCE}"\n\n' + backend_toml(backend, names, core)
    )


async def stored_count(backend: str, names: Names, core: Path) -> int:
    """Messages the core queue holds now."""
    if backend == "sqlite":
        # A URI quotes what a directory name may hold ('#', '?', '%'); `root` is absolute.
        with contextlib.closing(sqlite3.connect(core.as_uri() + "?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    if backend == "amqp":
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(names.exchange, passive=True)
            count = queue.declaration_result.message_count
            return int(count or 0)
    import nats

    client = await nats.connect(NATS_URL, connect_timeout=5)
    try:
        info = await client.jsm(timeout=10).stream_info(names.stream)
        return int(info.state.messages)
    finally:
        await client.close()


async def delete_names(backend: str, names: Names) -> None:
    """Delete this run's exchanges/queues or streams (missing ones are fine)."""
    if backend == "amqp":
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL, timeout=10)
        async with connection:
            for name in (names.exchange, names.dead_letter):
                channel = await connection.channel()
                await channel.queue_delete(name)
                await channel.exchange_delete(name)
                await channel.close()
    elif backend == "nats":
        import nats
        import nats.js.errors

        client = await nats.connect(NATS_URL, connect_timeout=5)
        try:
            jsm = client.jsm(timeout=10)
            for stream in (names.stream, f"{names.stream}-dead-letter"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await jsm.delete_stream(stream)
        finally:
            await client.close()


def _bare_messages(count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(topic, payload, metadata) of ``count`` events as the sink would forward them."""
    device, epoch, now_ms = "bench-ref", secrets.token_hex(8), int(time.time() * 1000)
    bodies = [payload(n) for n in range(16)]
    return [
        (
            f"devices/{device}/telemetry",
            bodies[n % 16],
            {
                "event-id": f"{device}/{epoch}/{n + 1}",
                "device-id": device,
                "topic": f"devices/{device}/telemetry",
                "seq": str(n + 1),
                "event-time": str(now_ms),
                "received-at": str(now_ms),
                "qos": "1",
            },
        )
        for n in range(count)
    ]


async def _bare(spec: dict[str, object]) -> dict[str, float]:
    """A backend's bare client loop: ``count`` messages with ``window`` awaiting confirmation."""
    backend, count, window = str(spec["backend"]), int(str(spec["count"])), int(str(spec["window"]))
    names = Names(str(spec["tag"]))
    events = _bare_messages(count)
    if backend == "nats":
        return await _bare_nats(names, events, window)
    return await _bare_amqp(names, events, window)


async def _bare_nats(
    names: Names, events: list[tuple[str, bytes, dict[str, str]]], window: int
) -> dict[str, float]:
    import nats
    from nats.js.api import StreamConfig

    client = await nats.connect(NATS_URL, connect_timeout=5)
    try:
        jsm = client.jsm(timeout=10)
        await jsm.add_stream(
            StreamConfig(
                name=names.stream, subjects=[f"{names.subject_prefix}.>"], duplicate_window=120
            )
        )
        js = client.jetstream(timeout=10, publish_async_max_pending=window)
        prefix = names.subject_prefix
        messages = [
            (f"{prefix}.{topic.replace('/', '.')}", body, {"Nats-Msg-Id": h["event-id"], **h})
            for topic, body, h in events
        ]
        cpu, started = time.process_time(), time.perf_counter()
        futures = [
            await js.publish_async(subject, body, headers=headers)
            for subject, body, headers in messages
        ]
        await js.publish_async_completed()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        failed = sum(1 for f in futures if f.cancelled() or f.exception() is not None)
        return {"seconds": seconds, "cpu": cpu, "failed": failed}
    finally:
        await client.close()


async def _bare_amqp(
    names: Names, events: list[tuple[str, bytes, dict[str, str]]], window: int
) -> dict[str, float]:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            names.exchange, durable=True, arguments={"x-queue-type": "classic"}
        )
        await queue.bind(exchange, "#")
        messages = [
            (
                topic.replace("/", "."),
                aio_pika.Message(
                    body,
                    headers={k: (int(v) if k in _INT_HEADERS else v) for k, v in h.items()},
                    message_id=h["event-id"],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
            )
            for topic, body, h in events
        ]
        pending = iter(messages)

        async def worker() -> None:
            for key, message in pending:
                await exchange.publish(message, key, mandatory=True)

        cpu, started = time.process_time(), time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(window):
                tasks.create_task(worker())
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "failed": 0}


_INT_HEADERS = frozenset({"seq", "event-time", "received-at", "qos"})


# -- measuring ------------------------------------------------------------------------------------


def broker_pids() -> dict[str, list[int]]:
    """The local RabbitMQ (beam.smp, epmd, ...) and nats-server processes, by backend."""
    found: dict[str, list[int]] = {"amqp": [], "nats": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in ("beam.smp", "erl_child_setup", "inet_gethost", "epmd"):
            found["amqp"].append(int(entry.name))
        elif comm == "nats-server":
            found["nats"].append(int(entry.name))
    return found


def cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def system_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


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


# -- the run -------------------------------------------------------------------------------------


def _median(samples: Sequence[Sample], target: str, fmt: str) -> float:
    rates = [s.rate for s in samples if s.target == target and s.fmt == fmt]
    return statistics.median(rates) if rates else math.nan


def _summary(samples: Sequence[Sample], args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    groups = sorted({(s.target, s.fmt) for s in samples})
    out("\nMedians:")
    for target, fmt in groups:
        group = [s for s in samples if s.target == target and s.fmt == fmt]
        rates = [s.rate for s in group]
        cpu = statistics.median(s.server_cpu / s.events * 1e6 for s in group)
        broker = statistics.median(s.broker_cpu / s.events * 1e6 for s in group)
        rss = statistics.median(s.rss_mb for s in group)
        out(
            f"  {target:<9} {fmt:<6} {statistics.median(rates):>9,.0f} ev/s "
            f"[{min(rates):,.0f} - {max(rates):,.0f}], {'client' if 'bare' in target else 'server'}"
            f" {cpu:.1f} µs/ev, broker {broker:.1f} µs/ev"
            + ("" if math.isnan(rss) else f", HWM {rss:.1f} MB")
        )
    for backend, goal in (("nats", GOAL_NATS_RATIO), ("amqp", GOAL_AMQP_RATIO)):
        bare = [
            (f, _median(samples, f"bare-{backend}", f)) for t, f in groups if t == f"bare-{backend}"
        ]
        if not bare:
            continue
        window, reference = max(bare, key=lambda item: item[1])
        for fmt in FORMATS:
            rate = _median(samples, backend, fmt)
            if math.isnan(rate):
                continue
            rows.append((
                f"sink -> {backend}, {fmt}", f"{rate:,.0f} ev/s",
                f"bare loop {window} {reference:,.0f}", f"{rate / reference:.2f}",
                f">= {goal}x", yes(rate / reference >= goal),
            ))  # fmt: skip
    for fmt in FORMATS:
        rate = _median(samples, "sqlite", fmt)
        if math.isnan(rate):
            continue
        mosquitto = _median(samples, "mosquitto", fmt)
        wanted = f">= {GOAL_SQLITE_BATCH:,} ev/s" if fmt == "batch" else "-"
        rows.append((
            f"sink -> sqlite, {fmt}", f"{rate:,.0f} ev/s", f"mosquitto {mosquitto:,.0f}",
            f"{rate / mosquitto:.2f}", wanted,
            yes(rate >= GOAL_SQLITE_BATCH) if fmt == "batch" else "-",
        ))  # fmt: skip
    del args
    return rows


async def run(args: argparse.Namespace, root: Path) -> None:
    limit = raise_nofile()
    load = os.getloadavg()
    out(
        f"bench.sink: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, OpenSSL "
        f"{ssl.OPENSSL_VERSION.split()[1]}, RLIMIT_NOFILE {limit}; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.publishers} publishers, {args.events:,}"
        f" events per run, {PAYLOAD_BYTES}-byte payloads, QoS 1, mutual TLS, windows "
        f"raw {args.window} / batch {args.batch_window} messages, {args.envelope_events} events "
        f"per envelope"
    )
    started = time.perf_counter()
    pki, devices = await asyncio.to_thread(
        make_pki, root / "pki", max(args.publishers, args.connections if "c" in args.parts else 0),
        "bench-d",
    )  # fmt: skip
    out(f"PKI: CA, server and {len(devices)} device certificates with tokens in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    settings = Settings(root, pki, devices, args)
    targets = [t for t in args.targets.split(",") if t]
    formats = [f for f in args.formats.split(",") if f]
    if "t" in args.parts:
        samples: list[Sample] = []
        out("\n(1)+(2) throughput, runs alternating")
        for number in range(1, args.runs + 1):
            for target in targets:
                if target.startswith("bare-"):
                    backend = target.removeprefix("bare-")
                    windows = args.nats_windows if backend == "nats" else args.amqp_windows
                    for window in (int(w) for w in windows.split(",")):
                        sample = await bare_run(backend, window, number, settings)
                        samples.append(sample)
                        out(f"  run {number}: " + sample.line())
                    continue
                for fmt in formats:
                    sample = await throughput_run(target, fmt, number, settings)
                    samples.append(sample)
                    out(f"  run {number}: " + sample.line())
        rows += _summary(samples, args)
        if args.profile is not None:
            for backend in [t for t in targets if t in BACKENDS]:
                path = args.profile / f"sink-{backend}.prof"
                profiled = Settings(root / "profile", pki, devices, args, profile=path)
                make_dir(profiled.root)
                sample = await throughput_run(backend, "batch", 0, profiled)
                _print_profile(path, f"cProfile of the sink ({sample.line()})")
    if "c" in args.parts:
        out(
            f"\n(3) {args.connections:,} idle mutual-TLS connections, keep-alive "
            f"{args.keep_alive} s (PINGREQ every {args.keep_alive / 2:g} s), held {args.hold:g} s"
        )
        chosen = devices[: args.connections]
        for target in ("sqlite", "mosquitto"):
            idle = await idle_run(target, settings, chosen)
            out("  " + idle.line().replace("sqlite   ", "sink     "))
            name = "sink (sqlite)" if target == "sqlite" else "mosquitto"
            rows.append((
                f"{name}: idle connections held", f"{idle.alive:,} of {idle.connections:,}",
                f"{idle.lost} lost", "", f">= {GOAL_CONNECTIONS:,}" if target == "sqlite" else "",
                yes(idle.alive >= GOAL_CONNECTIONS and idle.lost == 0)
                if target == "sqlite" else "-",
            ))  # fmt: skip
            rows.append((
                f"{name}: RSS per idle connection", f"{idle.per_connection_kb:.1f} KB",
                f"{idle.rss_before:.1f} -> {idle.rss_end:.1f} MB", "", "(reported)", "-",
            ))  # fmt: skip
    load = os.getloadavg()
    out(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out("Summary (rates: medians of the runs):")
    table(rows)


def _print_profile(path: Path, title: str) -> None:
    report = io.StringIO()
    stats = pstats.Stats(str(path), stream=report)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    out(f"\n{title}")
    out(report.getvalue().rstrip())


def _profiled(path: str, argv: list[str]) -> int:
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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sink", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--events", type=int, default=100_000, help="measured events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of every target (default 3)")
    parser.add_argument("--publishers", type=int, default=32, help="load-generator clients")
    parser.add_argument("--window", type=int, default=64, help="raw: unacked PUBLISH per client")
    parser.add_argument("--batch-window", type=int, default=4, help="batch: unacked envelopes")
    parser.add_argument("--envelope-events", type=int, default=292, help="events per envelope")
    parser.add_argument(
        "--targets", default="sqlite,nats,bare-nats,amqp,bare-amqp,mosquitto",
        help="what to measure, comma-separated, in this order within a run",
    )  # fmt: skip
    parser.add_argument("--formats", default="batch,raw", help="load formats for the sink")
    parser.add_argument(
        "--sink-linger", type=float, default=None, metavar="MS",
        help="the sink's [listener] batch_linger in ms (default: the sink's default)",
    )  # fmt: skip
    parser.add_argument("--nats-windows", default="256,1024,4096", help="bare nats-py windows")
    parser.add_argument("--amqp-windows", default="100,500", help="bare aio-pika windows")
    parser.add_argument(
        "--mosquitto-scale", type=int, default=10, help="Mosquitto gets this many times --events"
    )
    parser.add_argument(
        "--tls-read-buffer", type=int, default=0, metavar="BYTES",
        help="the sink's [listener] tls_read_buffer (default: the sink's default, 64 KiB)",
    )  # fmt: skip
    parser.add_argument("--bare-events", type=int, default=0, help="(default: --events)")
    parser.add_argument("--connections", type=int, default=GOAL_CONNECTIONS, help="(3) clients")
    parser.add_argument("--keep-alive", type=int, default=20, help="(3) keep-alive seconds")
    parser.add_argument("--hold", type=float, default=60.0, help="(3) seconds held idle")
    parser.add_argument("--parts", default="tc", help="t: throughput, c: idle connections")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary data goes")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="add one cProfile'd sink run per backend (batch); .prof files go to DIR",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_load"]:
        asyncio.run(_load(json.loads(argv[1])))
        return
    if argv[:1] == ["_bare"]:
        out(json.dumps(asyncio.run(_bare(json.loads(argv[1])))))
        return
    if argv[:1] == ["_profiled"]:
        sys.exit(_profiled(argv[1], argv[2:]))
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sink-", dir=args.dir) as root:
        asyncio.run(run(args, Path(root).resolve()))
    out(f"\ntotal time {time.perf_counter() - started:.0f} s; temporary data removed")


if __name__ == "__main__":
    main()
