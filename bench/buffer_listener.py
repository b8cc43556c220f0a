"""bench.buffer (b), the accept rate through the agent's local MQTT listener: QoS 1 publishers on
raw sockets (pipelined PUBLISH, a bounded in-flight window per connection) in a process of their
own (``python -m bench.buffer _publish``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.buffer_rates import RateResult
from bench.buffer_setup import Durability, config_text
from bench.child import run_child
from bench.load import payloads
from bench.report import out
from bench.wire import DISCONNECT, connect_packet, length, utf8
from edge_agent import Agent, parse_config

__all__ = ["listener_rate", "publish_over_mqtt"]


class _Publisher(asyncio.Protocol):
    """One MQTT connection sending ``total`` QoS 1 PUBLISH packets, ``window`` unacknowledged."""

    def __init__(self, client_id: str, total: int, window: int, bodies: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        self.client_id = client_id
        self.total = total
        self.window = window
        self.bodies = bodies
        self.connected: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[float] = loop.create_future()
        self.sent = 0
        self.acked = 0
        self.started = False
        self._data = bytearray()
        self._transport: asyncio.Transport | None = None
        topic = utf8(f"sensors/{client_id}/temperature")
        self._headers = [
            bytes([0x32]) + length(len(topic) + 2 + len(body)) + topic for body in bodies
        ]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(connect_packet(self.client_id))

    def start(self) -> None:
        self.started = True
        self._top_up()

    def _top_up(self) -> None:
        assert self._transport is not None
        limit = min(self.total, self.acked + self.window)
        if self.sent >= limit:
            return
        chunks = []
        headers, bodies = self._headers, self.bodies
        for n in range(self.sent, limit):
            index = n % len(bodies)
            chunks.append(headers[index] + (n % 65535 + 1).to_bytes(2, "big") + bodies[index])
        self.sent = limit
        self._transport.write(b"".join(chunks))

    def data_received(self, data: bytes) -> None:
        self._data += data
        buffered = self._data
        position = 0
        # The server only sends CONNACK and PUBACK here: 4 bytes each.
        while len(buffered) - position >= 4:
            kind, length = buffered[position], buffered[position + 1]
            if length != 2 or kind not in (0x20, 0x40):
                self._fail(f"unexpected packet {bytes(buffered[position : position + 4])!r}")
                return
            if kind == 0x20:
                if buffered[position + 3] != 0:
                    self._fail(f"CONNACK refused (code {buffered[position + 3]})")
                    return
                self.connected.set_result(None)
            else:
                self.acked += 1
            position += 4
        del buffered[:position]
        if self.acked >= self.total and not self.finished.done():
            assert self._transport is not None
            self.finished.set_result(time.perf_counter())
            self._transport.write(DISCONNECT)
            self._transport.close()
        elif self.started:
            self._top_up()

    def _fail(self, why: str) -> None:
        for future in (self.connected, self.finished):
            if not future.done():
                future.set_exception(ConnectionError(why))
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost after {self.acked} acks: {exc!r}")


async def publish_over_mqtt(
    port: int, events: int, connections: int, window: int
) -> dict[str, float]:
    """The publisher side of (b); runs in its own process (``python -m bench.buffer _publish``)."""
    loop = asyncio.get_running_loop()
    bodies = payloads()
    share = [events // connections + (n < events % connections) for n in range(connections)]
    publishers = [
        _Publisher(f"bench-pub-{n}", share[n], window, bodies) for n in range(connections)
    ]
    for publisher in publishers:
        await loop.create_connection(lambda p=publisher: p, "127.0.0.1", port)  # type: ignore[misc]
    await asyncio.gather(*(p.connected for p in publishers))
    start = time.perf_counter()
    for publisher in publishers:
        publisher.start()
    ends = await asyncio.gather(*(p.finished for p in publishers))
    return {"events": sum(p.acked for p in publishers), "seconds": max(ends) - start}


async def listener_rate(
    directory: Path,
    events: int,
    connections: int,
    window: int,
    durability: Durability,
    linger: float | None = None,
) -> RateResult:
    config = parse_config(
        config_text(directory, durability=durability, listener=True, linger=linger)
    )
    async with Agent(config) as agent:
        port = agent.listener_port
        assert port is not None
        commits_before = agent.buffer.commits
        result = await run_child(
            "the publisher process", "bench.buffer", "_publish",
            str(port), str(events), str(connections), str(window),
        )  # fmt: skip
        commits = agent.buffer.commits - commits_before
        stored = (await agent.buffer.stats()).events
    if stored != events or result["events"] != events:
        out(f"  WARNING: {result['events']} acked, {stored} stored, {events} published")
    return RateResult(int(result["events"]), float(result["seconds"]), commits)
