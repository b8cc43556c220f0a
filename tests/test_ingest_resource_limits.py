"""What a client can make the ingest server hold, and the bounds on it: sockets that never
finish their CONNECT (slowloris, RELIABILITY F16) and sockets past ``max_connections`` are
closed while a real device still connects; a client that reads nothing back (neither its
PINGRESPs nor its PUBACKs) is closed; QoS 2 messages never released are bounded."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mqtt_ingest import IngestServer, Limits
from tests.harness.ingest import canary_publishes
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet, pubrel_packet
from tests.harness.report import until
from tests.harness.stages import RecordingStage, counters, running_server

pytestmark = pytest.mark.fault


async def test_silent_and_dribbling_sockets_are_closed_and_a_device_still_connects(
    stage: RecordingStage,
) -> None:
    limits = Limits(max_connections=20, connect_timeout=1.0)
    async with running_server(stage, limits=limits) as server:
        silent = [await RawClient.open(server.port) for _ in range(20)]
        dribbling = [await RawClient.open(server.port) for _ in range(20)]
        connect = connect_packet("slow")

        async def dribble(client: RawClient) -> None:
            for byte in connect:
                try:
                    await client.send(bytes([byte]))
                except ConnectionError:
                    return
                await asyncio.sleep(0.3)

        dribblers = [asyncio.create_task(dribble(c)) for c in dribbling]
        closed = await asyncio.gather(*(c.closed_within(3) for c in silent + dribbling))
        assert all(closed), f"{closed.count(False)} sockets still open after the deadline"
        for task in dribblers:
            task.cancel()
        await canary_publishes(server, stage, "slowloris")
    refused = counters(server).snapshot()
    assert refused.get("connections_refused{connect_timeout}", 0) > 0
    assert refused.get("connections_refused{max_connections}", 0) > 0


async def test_max_connections_refuses_extra_sockets_at_once(stage: RecordingStage) -> None:
    async with running_server(stage, limits=Limits(max_connections=2)) as server:
        a = await RawClient.connected(server.port, "a")
        b = await RawClient.connected(server.port, "b")
        extra = await RawClient.open(server.port)
        assert await extra.closed_within(1)
        await a.aclose()
        await b.aclose()
        await asyncio.sleep(0.2)
        await canary_publishes(server, stage, "room-again")


async def test_qos2_messages_never_released_are_bounded(stage: RecordingStage) -> None:
    """A client that sends QoS 2 publishes and never PUBREL held a future per packet id, up to
    65,535 of them per connection: over ``max_unreleased`` it is closed."""
    limits = Limits(max_unreleased=50, batch_linger=0.05)  # the last one not yet in a call
    async with running_server(stage, limits=limits) as server:
        client = await RawClient.connected(server.port, "no-pubrel")
        await client.send(
            b"".join(publish_packet("t", b"x", qos=2, packet_id=i) for i in range(1, 50))
        )
        for _ in range(49):
            rec = await client.read()
            assert rec is not None
            assert rec.kind == 5
        await client.send(pubrel_packet(1))  # released: room for two more
        assert (await client.read()) is not None  # PUBCOMP
        await client.send(b"".join(publish_packet("t", b"x", qos=2, packet_id=i) for i in (50, 51)))
        assert [(await client.read()) is not None for _ in range(2)] == [True, True]
        await client.send(publish_packet("t", b"over", qos=2, packet_id=52))
        await until(lambda: server.connection_count == 0, timeout=5)
        await client.aclose()
        await asyncio.sleep(0.2)
    assert counters(server).get("connections_closed", "too_many_unreleased") == 1
    assert b"over" not in stage.payloads()  # closed on it, unacknowledged: not stored
    assert len(stage.payloads()) == 51


async def non_reading_client(
    server: IngestServer, client_id: str
) -> tuple[asyncio.StreamWriter, socket.socket]:
    """A CONNECTed client (keep-alive 1 s) that never reads. Both ends get small socket buffers
    (the server's through its connection's socket): the kernel would otherwise absorb megabytes
    of replies before the server's own buffer fills, and the test would take minutes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(connect_packet(client_id, keep_alive=1))
    async with asyncio.timeout(5):
        while not server._connections:  # noqa: ASYNC110  # polling a set
            await asyncio.sleep(0.01)
    (connection,) = server._connections
    connection.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return writer, sock


async def closed_while_sending(writer: asyncio.StreamWriter, chunk: bytes, seconds: float) -> bool:
    """Send ``chunk`` again and again; True once the server has closed the connection."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                writer.write(chunk)
                await writer.drain()
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return writer.transport.is_closing()


async def test_a_client_that_pings_without_reading_is_closed(stage: RecordingStage) -> None:
    """PINGRESPs were written without waiting for the socket: a client sending PINGREQs and
    reading nothing kept its keep-alive fresh and grew the server's write buffer without
    bound (14.6 MB for 20 MB of PINGREQs). Now the server stops reading it until it reads, and
    its keep-alive (1.5 s) runs out."""
    async with running_server(stage) as server:
        writer, sock = await non_reading_client(server, "pinger")
        with sock:
            assert await closed_while_sending(writer, b"\xc0\x00" * 50_000, 20)
            writer.transport.abort()
        assert counters(server).get("connections_closed", reason="keep_alive") == 1
        await canary_publishes(server, stage, "after-pinger")


async def test_a_client_that_reads_no_acks_is_closed(stage: RecordingStage) -> None:
    """With max_inflight acks unwritten the server stops reading (keep-alive off: the stage may
    be the slow one); a client that never reads its PUBACKs held its connection for ever."""
    async with running_server(stage) as server:
        writer, sock = await non_reading_client(server, "deaf")
        with sock:
            burst = b"".join(
                publish_packet("t", b"", qos=1, packet_id=1 + i % 60000) for i in range(20_000)
            )
            assert await closed_while_sending(writer, burst, 30)
            writer.transport.abort()
        assert counters(server).get("connections_closed", reason="write_stalled") == 1
