"""bench.drain (d), end-to-end latency: a paced QoS 1 producer (``python -m bench.drain _produce``)
publishes to the agent's listener; each event's latency is taken when it first shows in the sink's
core queue."""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.child import run_child
from bench.drain_backlog import read_only
from bench.drain_config import HOST, Pki, write_agent_config
from bench.drain_processes import start_agent, start_sink
from bench.load import PAYLOAD_BYTES, topics
from bench.report import out
from bench.wire import connect_packet, length, utf8

__all__ = ["Latencies", "latency_run", "produce", "watch_latencies"]


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


async def produce(port: int, total: int, rate: float, topic_count: int) -> dict[str, float]:
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
    db = read_only(core)
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
