"""The sink's backends in ``bench.sink``: unique RabbitMQ / JetStream names per run, the sink's
configuration, what a core queue holds, cleaning up, the brokers' processes, and the bare client
loops (the ``_bare`` process) that are the references."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.drain_config import Pki
from bench.sink_loadgen import AUDIENCE, payload

AMQP_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("BRIDGE_TEST_NATS_URL", "nats://127.0.0.1:4222")
BACKENDS = ("sqlite", "amqp", "nats")
TARGETS = (*BACKENDS, "mosquitto")


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


async def bare_main(spec: dict[str, object]) -> dict[str, float]:
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


# -- the brokers' processes ------------------------------------------------------------------------


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
