"""Starting and stopping the ingest server (RELIABILITY F19): a graceful stop refuses new
sockets and acknowledges the events in flight; its deadline abandons those the stage never took,
even when the stage swallows the cancellation or a socket was accepted in the stop's own turn;
a port in use fails the start at once."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from mqtt_ingest import Anonymous, IngestEvent, IngestServer, Limits, StageRefused
from tests.harness.ingest import PUBACK
from tests.harness.rawmqtt import RawClient, publish_packet
from tests.harness.stages import RecordingStage, counters

pytestmark = pytest.mark.fault


async def test_graceful_stop_acks_in_flight_events_then_closes(stage: RecordingStage) -> None:
    stage.hold()
    server = IngestServer(stage=stage, authenticator=Anonymous())
    async with server:
        client = await RawClient.connected(server.port, "stopping")
        await client.send(publish_packet("t", b"in flight", qos=1, packet_id=5))
        await asyncio.wait_for(stage.waiting.wait(), 5)
        stopping = asyncio.create_task(server.stop(deadline=5))
        await asyncio.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            await RawClient.open(server.port)  # no longer accepting
        stage.release()
        ack = await client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 5)
        assert await client.closed_within(2)
        await asyncio.wait_for(stopping, 5)
    assert counters(server).get("connections_closed", "server_stop") == 1


@asynccontextmanager
async def stopped_while_the_stage_holds_an_event(
    stage: RecordingStage, client_id: str
) -> AsyncIterator[tuple[IngestServer, RawClient]]:
    """A server stopped (0.3 s deadline) while its stage holds a client's QoS 1 event."""
    stage.hold()
    server = IngestServer(stage=stage, authenticator=Anonymous())
    async with server:
        client = await RawClient.connected(server.port, client_id)
        await client.send(publish_packet("t", b"held", qos=1, packet_id=5))
        await asyncio.wait_for(stage.waiting.wait(), 5)
        await asyncio.wait_for(server.stop(deadline=0.3), 5)
        yield server, client


async def test_stop_deadline_abandons_events_the_stage_never_took(stage: RecordingStage) -> None:
    async with stopped_while_the_stage_holds_an_event(stage, "abandoned") as (server, client):
        assert await client.closed_within(2)  # closed without a PUBACK
        stage.release()
    assert counters(server).get("events_acked") == 0


async def test_stop_ends_even_if_the_stage_swallows_the_cancellation(
    stage: RecordingStage,
) -> None:
    # Python 3.11's asyncio.wait_for, inside aio-pika, nats-py and aiomqtt, returns the call's
    # result instead of raising when the cancellation lands as the call completes.
    swallowed = asyncio.Event()
    store = stage.store

    async def swallowing_store(
        events: Sequence[IngestEvent],
    ) -> Sequence[StageRefused | None] | None:
        try:
            return await store(events)
        except asyncio.CancelledError:
            swallowed.set()
            return None

    stage.store = swallowing_store  # type: ignore[method-assign]
    async with stopped_while_the_stage_holds_an_event(stage, "swallowed") as (_, client):
        assert swallowed.is_set()
        assert await client.closed_within(2)


async def test_a_port_in_use_fails_the_start_at_once(stage: RecordingStage) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = IngestServer(stage=stage, authenticator=Anonymous(), port=busy.getsockname()[1])
        # Not a TimeoutError: the batcher's task group must not wait for it at a failed start.
        with pytest.raises(OSError, match="in use"):
            async with asyncio.timeout(5), server:
                raise AssertionError("started on a port in use")


async def test_a_stop_in_the_turn_of_an_accept_does_not_wait_its_deadline(
    stage: RecordingStage,
) -> None:
    """`stop` came in the turn a socket was accepted, before the connection's task took its
    first step: the task was cancelled before `run`, nothing set `done`, and the stop waited
    its whole deadline with the socket open and counted."""
    server = IngestServer(stage=stage, authenticator=Anonymous(), limits=Limits(stop_deadline=30))
    accept = server._accept

    def accept_then_stop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accept(reader, writer)
        for connection in server._connections:
            connection.finish()  # what `stop` does before its first await, in this turn

    server._accept = accept_then_stop  # type: ignore[method-assign]
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(server.stop(), 5)
        assert server.connection_count == 0
        writer.close()
    assert counters(server).get("connections_closed", "server_stop") == 1
