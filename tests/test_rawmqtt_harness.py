"""The raw MQTT client of the fault tests: "closed" must never hide "acknowledged, then closed"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from tests.harness.rawmqtt import RawClient, packet


@asynccontextmanager
async def answering(reply: bytes) -> AsyncIterator[int]:
    """A server that answers any first bytes with ``reply``, then closes; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("kind", "name"), [(0x40, "PUBACK"), (0x50, "PUBREC"), (0x70, "PUBCOMP")])
async def test_an_acknowledgement_before_the_close_fails_closed_within(
    kind: int, name: str
) -> None:
    async with answering(packet(kind, b"\x00\x07")) as port:
        client = await RawClient.open(port)
        await client.send(b"\x30")
        with pytest.raises(AssertionError, match=f"{name} for packet id 7 before the close"):
            await client.closed_within(2)
        await client.aclose()


@pytest.mark.parametrize(
    "reply",
    [b"", packet(0xD0, b""), packet(0x20, b"\x00\x00")],
    ids=["nothing", "pingresp", "connack"],
)
async def test_other_packets_before_the_close_are_skipped(reply: bytes) -> None:
    async with answering(reply) as port:
        client = await RawClient.open(port)
        await client.send(b"\x30")
        assert await client.closed_within(2)


async def test_a_connection_left_open_is_not_closed_within() -> None:
    opened: list[Callable[[], None]] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer.close)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with server:
        client = await RawClient.open(server.sockets[0].getsockname()[1])
        assert not await client.closed_within(0.3)
        await client.aclose()
        for close in opened:
            close()
