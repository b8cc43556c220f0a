"""The ingest server in front of a durable stage that misbehaves: slow (the PUBACK waits for
it), failing, refusing one event of a batch, timing out, never answering (the socket is no longer
read, so memory stays bounded) or closed by its availability gate (connects refused until it
opens); a client waiting on the stage is not closed for its keep-alive."""

from __future__ import annotations

import asyncio
import socket

import aiomqtt
import pytest

from mqtt_ingest import Limits
from tests.harness.ingest import PUBACK, canary_publishes
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.stages import Gate, RecordingStage, counters, running_server

pytestmark = pytest.mark.fault


async def test_slow_stage_delays_the_ack(stage: RecordingStage) -> None:
    async with (
        running_server(stage) as server,
        aiomqtt.Client("127.0.0.1", server.port, identifier="slow") as client,
    ):
        stage.hold()
        publish = asyncio.create_task(client.publish("t", b"held", qos=1, timeout=30))
        await asyncio.wait_for(stage.waiting.wait(), 5)
        await asyncio.sleep(0.3)
        assert not publish.done(), "PUBACK came before the stage confirmed"
        assert stage.payloads() == []
        stage.release()
        await asyncio.wait_for(publish, 5)
        assert stage.payloads() == [b"held"]


async def test_failing_stage_gets_no_ack_and_a_closed_connection(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "victim")
        await client.send(publish_packet("t", b"stored", qos=1, packet_id=1))
        ack = await client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 1)
        stage.failure = RuntimeError("disk on fire")
        await client.send(publish_packet("t", b"lost?", qos=1, packet_id=2))
        assert await client.closed_within(2), "connection left open after a stage failure"
        stage.failure = None
        await canary_publishes(server, stage, "after-failure")
    assert stage.payloads("t") == [b"stored"]
    assert counters(server).get("connections_closed", "stage_failed") == 1
    assert counters(server).get("events_acked") == 2  # the first event and the canary


async def test_stage_refusing_one_event_acks_the_ones_before(stage: RecordingStage) -> None:
    stage.refuse = lambda event: "buffer full" if event.payload == b"too much" else None
    async with running_server(stage, limits=Limits(batch_linger=0.05)) as server:
        client = await RawClient.connected(server.port, "partial")
        burst = publish_packet("t", b"a", qos=1, packet_id=1)
        burst += publish_packet("t", b"too much", qos=1, packet_id=2)
        burst += publish_packet("t", b"c", qos=1, packet_id=3)
        await client.send(burst)
        ack = await client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 1)
        assert await client.closed_within(2)
    assert counters(server).get("stage_events", "refused") == 1


async def test_stage_timeout_fails_the_batch(stage: RecordingStage) -> None:
    stage.hold()
    async with running_server(stage, limits=Limits(stage_timeout=0.3)) as server:
        client = await RawClient.connected(server.port, "timeout")
        await client.send(publish_packet("t", b"x", qos=1, packet_id=1))
        assert await client.closed_within(3)
        stage.release()
    assert counters(server).get("stage_events", "failed") == 1
    assert counters(server).get("events_acked") == 0


async def test_stage_that_never_answers_stops_the_reading(stage: RecordingStage) -> None:
    """Memory stays bounded: at the in-flight limit the socket is not read any more."""
    stage.hold()
    limits = Limits(max_inflight=16, stage_timeout=600)
    async with running_server(stage, limits=limits) as server:
        client = await RawClient.connected(server.port, "firehose")
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        one = publish_packet("firehose", b"x" * 200, qos=1, packet_id=1)
        # Far more than the kernel buffers on both sides can hold.
        for _ in range(40):
            client.writer.write(one * 1000)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.writer.drain(), 2)
        received = counters(server).get("events_received")
        await asyncio.sleep(0.5)
        assert counters(server).get("events_received") == received == limits.max_inflight
        assert counters(server).get("events_acked") == 0
        assert client.writer.transport.get_write_buffer_size() > 1_000_000
        await client.aclose()
        stage.release()


async def test_closed_gate_stops_reading_and_refuses_connects_until_it_opens(
    stage: RecordingStage, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    async with running_server(stage, availability=gate) as server:
        early = await RawClient.connected(server.port, "early")
        await early.send(publish_packet("t", b"before", qos=1, packet_id=1))
        ack = await early.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 1)

        gate.close()
        await asyncio.sleep(0.05)  # the read loop parks on the gate before its next read
        await early.send(publish_packet("t", b"while closed", qos=1, packet_id=2))
        with pytest.raises(TimeoutError):
            await early.read(timeout=0.5)
        assert stage.payloads() == [b"before"], "read and stored while the gate was closed"
        for attempt in range(3):
            late = await RawClient.open(server.port)
            await late.send(connect_packet(f"late-{attempt}"))
            connack = await late.read()
            assert connack is not None
            assert (connack.kind, connack.body) == (2, b"\x00\x03")  # server unavailable
            assert await late.closed_within(2)
        assert counters(server).get("connections_refused", "unavailable") == 3
        assert "refused CONNECT" not in caplog.text, "one log line per refusal"

        gate.open()
        ack = await early.read()  # the held packet is read, stored and acknowledged now
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 2)
        await canary_publishes(server, stage, "after-gate")
        await early.aclose()
    assert stage.payloads("t") == [b"before", b"while closed"]


async def test_waiting_on_a_slow_stage_does_not_count_against_the_keep_alive(
    stage: RecordingStage,
) -> None:
    stage.hold()
    async with running_server(stage, limits=Limits(max_inflight=2)) as server:
        client = await RawClient.connected(server.port, "patient", keep_alive=1)
        burst = b"".join(publish_packet("t", b"x", qos=1, packet_id=i) for i in (1, 2, 3))
        await client.send(burst)
        await asyncio.sleep(2.5)  # well past 1.5 x keep-alive, with the server not reading
        stage.release()
        acks = [await client.read() for _ in range(3)]
        assert [a.packet_id for a in acks if a is not None] == [1, 2, 3]
        await client.aclose()
    assert counters(server).get("connections_closed", "keep_alive") == 0
