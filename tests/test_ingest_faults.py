"""The ingest server under a misbehaving stage and hostile peers (RELIABILITY F14-F16, F19)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_ingest import Anonymous, IngestEvent, IngestServer, Limits, StageRefused
from mqtt_ingest.handshake import MAX_CONNECT_BYTES
from mqtt_ingest.server import ORPHANS_PER_INFLIGHT
from tests.harness.rawmqtt import (
    RawClient,
    connect_packet,
    encode_length,
    packet,
    publish_packet,
    pubrel_packet,
    utf8,
)
from tests.harness.report import figures, until
from tests.harness.stages import Gate, RecordingStage, SlowStage, counters, running_server

pytestmark = pytest.mark.fault

PUBACK = 4


async def canary_publishes(server: IngestServer, stage: RecordingStage, tag: str) -> None:
    """A well-behaved client still gets its QoS 1 event stored and acknowledged."""
    async with aiomqtt.Client("127.0.0.1", server.port, identifier=f"canary-{tag}") as client:
        await client.publish("canary", tag.encode(), qos=1, timeout=5)
    assert tag.encode() in stage.payloads("canary")


# -- the durable stage ------------------------------------------------------------------------


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


# -- F14: malformed packets -------------------------------------------------------------------

MALFORMED = {
    "remaining length of 5 bytes": b"\x30\xff\xff\xff\xff\x01",
    "topic longer than packet": packet(0x30, struct.pack("!H", 500) + b"short"),
    "reserved type 0": b"\x00\x00",
    "reserved type 15": b"\xf0\x00",
    "server-to-client CONNACK": b"\x20\x02\x00\x00",
    "second CONNECT": connect_packet("again"),
    "invalid UTF-8 topic": publish_packet(b"t/\xff\xfe", b"x"),
    "U+0000 in topic": publish_packet("t/\x00/x", b"x"),
    "wildcard in topic": publish_packet("t/+/x", b"x"),
    "empty topic": publish_packet("", b"x"),
    "QoS 3": bytes([0x36]) + encode_length(5) + utf8("t") + b"\x00\x01",
    "packet id 0": publish_packet("t", b"x", qos=1, packet_id=0),
    "PUBREL with flags 0": packet(0x60, b"\x00\x01"),
    "PINGREQ with a body": b"\xc0\x01\x00",
    "SUBSCRIBE without filters": packet(0x82, b"\x00\x01"),
    "SUBSCRIBE QoS 3": packet(0x82, b"\x00\x01" + utf8("a") + b"\x03"),
    "SUBSCRIBE of an empty filter": packet(0x82, b"\x00\x01" + utf8("") + b"\x00"),
    "UNSUBSCRIBE of an empty filter": packet(0xA2, b"\x00\x01" + utf8("")),
    "DUP on QoS 0": bytes([0x38]) + encode_length(4) + utf8("t") + b"x",
    "PUBREL with extra bytes": packet(0x62, b"\x00\x01\x00"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_packet_closes_within_a_second(stage: RecordingStage, data: bytes) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "fuzzed")
        await client.send(data)
        assert await client.closed_within(1)
        await canary_publishes(server, stage, "malformed")
    assert stage.payloads() == [b"malformed"]
    assert counters(server).get("connections_closed", "internal_error") == 0


MALFORMED_CONNECT = {
    "truncated CONNECT": packet(0x10, utf8("MQTT") + b"\x04\x02"),
    "reserved flag": packet(0x10, utf8("MQTT") + b"\x04\x03\x00\x3c" + utf8("c")),
    "password without user name": packet(0x10, utf8("MQTT") + b"\x04\x42\x00\x3c" + utf8("c")),
    "missing user name": packet(0x10, utf8("MQTT") + b"\x04\x82\x00\x3c" + utf8("c")),
    "bytes after the fields": packet(0x10, utf8("MQTT") + b"\x04\x02\x00\x3c" + utf8("c") + b"!"),
    "client id not UTF-8": packet(0x10, utf8("MQTT") + b"\x04\x02\x00\x3c" + utf8(b"\xc3\x28")),
    "PUBLISH first": publish_packet("t", b"x"),
    "CONNECT with flags": b"\x11" + connect_packet()[1:],
}


@pytest.mark.parametrize("data", MALFORMED_CONNECT.values(), ids=MALFORMED_CONNECT.keys())
async def test_malformed_connect_is_closed_without_connack(
    stage: RecordingStage, data: bytes
) -> None:
    async with running_server(stage) as server:
        client = await RawClient.open(server.port)
        await client.send(data)
        assert await client.read(timeout=1) is None
        await client.aclose()
        await canary_publishes(server, stage, "after-connect")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(garbage=st.binary(min_size=1, max_size=300))
async def test_random_bytes_after_connect_never_break_the_server(
    stage: RecordingStage, garbage: bytes
) -> None:
    async with running_server(stage, limits=Limits(max_packet_size=4096)) as server:
        client = await RawClient.connected(server.port, "hypothesis", keep_alive=1)
        await client.send(garbage)
        # Closed at once if malformed; a valid prefix waits for its body until the keep-alive
        # (1.5 s). Any answer before the close may come (garbage can be a whole valid publish).
        async with asyncio.timeout(2.5):
            while await client.read(2.5) is not None:
                pass
        await client.aclose()
        await canary_publishes(server, stage, "fuzz")
        acked_before = counters(server).get("events_acked")
    assert counters(server).get("connections_closed", "internal_error") == 0
    assert acked_before >= 1


# -- F15: oversized packets -------------------------------------------------------------------


async def test_declared_256mb_packet_is_closed_before_the_body(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "huge")
        await client.send(b"\x32" + encode_length(256 * 1024 * 1024 - 1))
        assert await client.closed_within(1)
        await canary_publishes(server, stage, "after-huge")
    assert counters(server).get("malformed", "too_large") == 1
    assert counters(server).get("connections_closed", "too_large") == 1


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"\x30" + encode_length(1024 * 1024 - 5) + utf8("t"), "not_connect"),
        (b"\x10" + encode_length(MAX_CONNECT_BYTES) + utf8("MQTT"), "malformed"),
    ],
    ids=["publish-first", "large-connect"],
)
async def test_a_client_not_yet_authenticated_cannot_make_the_server_hold_a_large_packet(
    stage: RecordingStage, first: bytes, reason: str
) -> None:
    """The first packet's body was read up to max_packet_size (1 MiB at the sink's defaults)
    before its type was looked at: sockets that never authenticate each held that much until
    the CONNECT deadline. Now only a CONNECT, of at most MAX_CONNECT_BYTES, is read first."""
    async with running_server(stage) as server:
        client = await RawClient.open(server.port)
        await client.send(first)  # the rest of the body never comes
        assert await client.closed_within(1)
        await canary_publishes(server, stage, "after")
    assert counters(server).get("connections_refused", reason) == 1


async def test_packet_just_under_the_limit_is_accepted(stage: RecordingStage) -> None:
    limit = 10_000
    async with running_server(stage, limits=Limits(max_packet_size=limit)) as server:
        client = await RawClient.connected(server.port, "edge")
        overhead = len(publish_packet("t", b"", qos=1, packet_id=1))
        body = b"x" * (limit - overhead - 1)  # the length prefix grows by one byte
        await client.send(publish_packet("t", body, qos=1, packet_id=1))
        ack = await client.read()
        assert ack is not None
        assert ack.kind == PUBACK
        await client.send(publish_packet("t", body + b"yy", qos=1, packet_id=2))
        assert await client.closed_within(1)
    assert stage.payloads() == [body]


# -- F16: slowloris ---------------------------------------------------------------------------


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


async def test_qos2_flow_survives_a_dropped_connection(stage: RecordingStage) -> None:
    """PUBREC sent, connection lost before PUBREL: the resend on a new connection is stored again
    (sessions do not outlive connections), and the PUBREL is still completed."""
    async with running_server(stage) as server:
        first = await RawClient.connected(server.port, "q2-drop")
        await first.send(publish_packet("t", b"e1", qos=2, packet_id=3))
        assert (await first.read()) is not None
        await first.aclose()
        second = await RawClient.connected(server.port, "q2-drop")
        await second.send(pubrel_packet(3))
        comp = await second.read()
        assert comp is not None
        assert comp.kind == 7
        await second.aclose()
    assert stage.payloads() == [b"e1"]


async def persistent(port: int, client_id: str, session_present: bool) -> RawClient:
    client = await RawClient.open(port)
    await client.send(connect_packet(client_id, clean=False))
    connack = await client.read()
    assert connack is not None
    assert (connack.kind, connack.body) == (2, bytes([int(session_present), 0]))
    return client


async def test_a_persistent_session_keeps_qos2_receipts_across_connections(
    stage: RecordingStage,
) -> None:
    """MQTT 3.1.1 §4.3.3 and §3.1.2.4: with CleanSession 0 a PUBLISH resent (DUP) after a new
    connection, for a packet id that got PUBREC and no PUBREL, is answered and not stored again
    (it was stored twice: exactly once broken for raw QoS 2 publishers, whose events have no
    event id to dedupe by). The same after a takeover; CleanSession 1 discards it."""
    async with running_server(stage) as server:
        first = await persistent(server.port, "q2-keep", session_present=False)
        await first.send(publish_packet("t", b"once", qos=2, packet_id=3))
        assert (await first.read()) is not None  # PUBREC
        await first.aclose()
        await asyncio.sleep(0.1)
        second = await persistent(server.port, "q2-keep", session_present=True)
        await second.send(publish_packet("t", b"once", qos=2, packet_id=3, dup=True))
        rec = await second.read()
        assert rec is not None
        assert (rec.kind, rec.packet_id) == (5, 3)
        await second.send(publish_packet("t", b"twice", qos=2, packet_id=4))
        assert (await second.read()) is not None
        # Taken over while open: the new connection has the state at once.
        third = await persistent(server.port, "q2-keep", session_present=True)
        await third.send(publish_packet("t", b"twice", qos=2, packet_id=4, dup=True))
        await third.send(pubrel_packet(3) + pubrel_packet(4))
        answers = [await third.read() for _ in range(3)]
        assert [(a.kind, a.packet_id) for a in answers if a] == [(5, 4), (7, 3), (7, 4)]
        await third.aclose()
        await second.aclose()
        await asyncio.sleep(0.1)
        # Nothing left to keep (every PUBREL came), and a clean session starts afresh.
        clean = await RawClient.connected(server.port, "q2-keep")
        await clean.aclose()
        fresh = await persistent(server.port, "q2-keep", session_present=False)
        await fresh.aclose()
    assert stage.payloads() == [b"once", b"twice"]
    assert counters(server).get("qos2_duplicates") == 2


async def test_kept_sessions_are_bounded_by_their_packet_ids_in_all(stage: RecordingStage) -> None:
    """Sessions of many client ids, each with QoS 2 ids never released: bounded by the number
    of sessions only, they held up to 10,000 x 256 ids. The oldest go first past either bound."""
    limits = Limits(max_session_ids=10)
    async with running_server(stage, limits=limits) as server:
        for n in range(4):  # 4 sessions of 4 ids each: 16 ids, over 10
            client = await persistent(server.port, f"q2-many-{n}", session_present=False)
            await client.send(
                b"".join(publish_packet("t", b"x", qos=2, packet_id=i) for i in range(1, 5))
            )
            assert [(await client.read()) is not None for _ in range(4)] == [True] * 4
            await client.aclose()
            await until(lambda: server.connection_count == 0, timeout=5)
        assert server._session_ids == 8  # the two newest sessions
        for n, present in ((0, False), (1, False), (2, True), (3, True)):
            again = await persistent(server.port, f"q2-many-{n}", session_present=present)
            await again.aclose()
            await until(lambda: server.connection_count == 0, timeout=5)
        assert server._session_ids == 8  # resumed and kept again, counted once


async def test_a_persistent_connection_does_not_resume_the_clean_session_it_takes_over(
    stage: RecordingStage,
) -> None:
    """MQTT-3.1.2-6: a clean session's state ends with its connection. A CleanSession 0 client
    taking over a live CleanSession 1 connection (a one-off ``mosquitto_pub -i dev -q 2`` beside
    the device) got "session present" and that session's QoS 2 ids: its own resend of id 1 was
    answered PUBREC as if stored, and never stored."""
    async with running_server(stage) as server:
        clean = await RawClient.connected(server.port, "q2-mixed")
        await clean.send(publish_packet("t", b"from-clean-session", qos=2, packet_id=1))
        assert (await clean.read()) is not None  # PUBREC, no PUBREL follows
        device = await persistent(server.port, "q2-mixed", session_present=False)
        await device.send(publish_packet("t", b"from-the-device", qos=2, packet_id=1, dup=True))
        rec = await device.read()
        assert rec is not None
        assert (rec.kind, rec.packet_id) == (5, 1)
        await device.aclose()
        await clean.aclose()
    assert stage.payloads() == [b"from-clean-session", b"from-the-device"]


async def test_a_session_taken_over_mid_store_answers_the_resend_once(
    stage: RecordingStage,
) -> None:
    """The QoS 2 event is in a stage call when its connection is taken over: the new connection
    answers the resend once that call is done (it used to be withdrawn, then stored again).
    And a kept id reused without DUP (a client that lost its own state) is a new message."""
    stage.hold()
    async with running_server(stage) as server:
        first = await persistent(server.port, "q2-take", session_present=False)
        await first.send(publish_packet("t", b"slow", qos=2, packet_id=5))
        await asyncio.wait_for(stage.waiting.wait(), 5)
        second = await persistent(server.port, "q2-take", session_present=True)
        await second.send(publish_packet("t", b"slow", qos=2, packet_id=5, dup=True))
        await asyncio.sleep(0.1)
        stage.release()
        rec = await second.read()
        assert rec is not None
        assert (rec.kind, rec.packet_id) == (5, 5)
        await second.aclose()
        await first.aclose()
        await asyncio.sleep(0.1)
        third = await persistent(server.port, "q2-take", session_present=True)
        await third.send(publish_packet("t", b"new", qos=2, packet_id=5))  # DUP not set
        rec = await third.read()
        assert rec is not None
        assert (rec.kind, rec.packet_id) == (5, 5)
        await third.aclose()
    assert stage.payloads() == [b"slow", b"new"]


async def test_a_qos2_publish_read_in_the_turn_of_its_takeover_is_stored_once() -> None:
    """The new connection's CONNECT and a QoS 2 PUBLISH on the old one arrive in the same turn
    of the loop: the old connection, aborted by the takeover, still read the PUBLISH it had
    buffered and handed it to the stage (linger 0), after its session state had moved to the
    new connection. The resend (DUP) on the new connection was then stored again."""
    for round_ in range(5):
        stage = RecordingStage()
        async with running_server(stage, limits=Limits(batch_linger=0.0)) as server:
            old = await persistent(server.port, "q2-turn", session_present=False)
            new = await RawClient.open(server.port)
            await asyncio.sleep(0.05)
            new.writer.write(connect_packet("q2-turn", clean=False))
            old.writer.write(publish_packet("t", b"once", qos=2, packet_id=7))
            await new.writer.drain()
            connack = await new.read()
            assert connack is not None
            await new.send(publish_packet("t", b"once", qos=2, packet_id=7, dup=True))
            rec = await new.read()
            assert rec is not None
            assert (rec.kind, rec.packet_id) == (5, 7)
            await new.send(pubrel_packet(7))
            comp = await new.read()
            assert comp is not None
            assert (comp.kind, comp.packet_id) == (7, 7)
            await new.aclose()
            await old.aclose()
        assert stage.payloads() == [b"once"], f"round {round_}"


async def test_a_publish_read_in_the_turn_of_a_revocation_is_not_stored(
    stage: RecordingStage,
) -> None:
    """Credentials withdrawn (a CRL, the deny list) in the turn the device's PUBLISH arrives:
    the aborted connection still read it and handed it to the stage."""
    async with running_server(stage, limits=Limits(batch_linger=0.0)) as server:
        client = await RawClient.connected(server.port, "revoked-now")
        connection = next(iter(server._connections))
        feed = connection.reader.feed_data
        closed: list[int] = []

        def feed_then_revoke(data: bytes) -> None:
            feed(data)  # the read loop is woken, not run yet
            closed.append(server.close_where(lambda identity, cert: ("revoked", "revoked")))

        connection.reader.feed_data = feed_then_revoke  # type: ignore[method-assign,assignment]
        await client.send(publish_packet("t", b"after-revocation", qos=1, packet_id=1))
        assert await client.read() is None  # closed, no PUBACK
        await asyncio.sleep(0.2)
        await client.aclose()
    assert closed == [1]
    assert stage.payloads() == []


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


async def test_a_session_closed_mid_store_answers_the_resend_once(
    stage: RecordingStage,
) -> None:
    """The QoS 2 event is in a stage call when the link drops (no takeover): the session kept
    for the client knows it, and the resend on the next connection is answered once that call
    is done. Its future used to be withdrawn mid-call and the session forgot it: stored twice."""
    stage.hold()
    async with running_server(stage) as server:
        first = await persistent(server.port, "q2-drop-mid", session_present=False)
        await first.send(publish_packet("t", b"exactly-once", qos=2, packet_id=5))
        await asyncio.wait_for(stage.waiting.wait(), 5)
        await first.aclose()
        await until(lambda: server.connection_count == 0, timeout=5)
        stage.release()
        await stage.wait_for(1)
        second = await persistent(server.port, "q2-drop-mid", session_present=True)
        await second.send(publish_packet("t", b"exactly-once", qos=2, packet_id=5, dup=True))
        rec = await second.read()
        assert rec is not None
        assert (rec.kind, rec.packet_id) == (5, 5)
        await second.send(pubrel_packet(5))
        comp = await second.read()
        assert comp is not None
        assert (comp.kind, comp.packet_id) == (7, 5)
        await second.aclose()
    assert stage.payloads() == [b"exactly-once"]


async def test_clean_takeovers_do_not_pile_events_up_behind_a_slow_stage() -> None:
    """A client taking its own connection over with CleanSession 1, again and again, each time
    with a few QoS 2 events queued behind a slow stage: the older connection's events used to
    be handed to the new connection, which discarded the session, so nobody withdrew them and
    the stage's queue grew with every takeover (256 events with 8 in flight allowed)."""

    limits = Limits(max_inflight=8, batch_max_events=4)
    clients: list[RawClient] = []
    peak = 0
    async with running_server(SlowStage(), limits=limits) as server:
        for _ in range(30):
            client = await RawClient.connected(server.port, "taker")  # takes the last one over
            clients.append(client)
            await client.send(
                b"".join(publish_packet("t", b"x" * 1000, qos=2, packet_id=i + 1) for i in range(7))
            )
            await asyncio.sleep(0.02)
            peak = max(peak, sum(not future.done() for _, future in server.batcher._pending))
        for client in clients:
            await client.aclose()
        takeovers = counters(server).get("takeovers")
    figures("clean takeovers", takeovers=takeovers, queued_at_most=peak)
    assert takeovers == 29
    assert peak <= 2 * limits.max_inflight


async def test_qos0_events_of_reconnecting_clients_are_bounded_and_counted() -> None:
    """QoS 0 events of a closed connection are still stored, but a client reconnecting again
    and again behind a slow stage grew the stage's queue by up to ``max_inflight`` each time
    (256 events after 40 rounds with 8 allowed). Beyond `ORPHANS_PER_INFLIGHT` x
    ``max_inflight`` they are withdrawn and counted: every event stored or counted (P4)."""

    stage = SlowStage()
    limits = Limits(max_inflight=8, batch_max_events=4)
    peak = 0
    async with running_server(stage, limits=limits) as server:
        for _ in range(40):
            client = await RawClient.connected(server.port, "fire-and-forget")
            await client.send(b"".join(publish_packet("q0", b"x" * 1000) for _ in range(7)))
            await asyncio.sleep(0.02)
            await client.aclose()
            await until(lambda: server.connection_count == 0, timeout=5)
            queued = sum(not future.done() for _, future in server.batcher._pending)
            peak = max(peak, queued)
        dropped = counters(server).get("qos0_dropped")
        await until(lambda: len(stage.payloads("q0")) + dropped >= 40 * 7, timeout=60)
    stored = len(stage.payloads("q0"))
    figures("qos0 reconnects", stored=stored, dropped=dropped, queued_at_most=peak)
    assert dropped > 0
    assert stored + dropped == 40 * 7
    assert peak <= (ORPHANS_PER_INFLIGHT + 1) * limits.max_inflight


@pytest.mark.parametrize(("qos", "linger"), [(0, 0.002), (1, 0.0)], ids=["qos0", "qos1-no-linger"])
async def test_a_closed_connection_hands_the_stage_nothing_more(
    stage: RecordingStage, qos: int, linger: float
) -> None:
    """A connection closed from outside (a CRL or deny list revoking its device, expiry, a
    takeover) while it waits at ``max_inflight`` for a slow stage: it used to read on from
    what it had buffered once the stage answered, handing a revoked device's events over."""
    stage.hold()
    limits = Limits(max_inflight=2, batch_linger=linger)
    async with running_server(stage, limits=limits) as server:
        client = await RawClient.connected(server.port, "revoked")
        burst = b"".join(publish_packet("t", b"before", qos=1, packet_id=i) for i in (1, 2))
        burst += b"".join(
            publish_packet("t", b"late", qos=qos, packet_id=i if qos else None)
            for i in range(10, 30)
        )
        await client.send(burst)
        await asyncio.wait_for(stage.waiting.wait(), 5)
        await asyncio.sleep(0.2)  # the late ones wait in the connection's buffers
        assert server.close_where(lambda identity, cert: ("certificate revoked", "revoked")) == 1
        await until(lambda: server.connection_count == 0, timeout=5)  # at once, not after
        stage.release()
        await asyncio.sleep(0.5)
        await client.aclose()
    assert b"late" not in stage.payloads()
    assert counters(server).get("connections_closed", "revoked") == 1


async def test_taken_over_connections_waiting_for_the_stage_free_their_slots(
    stage: RecordingStage,
) -> None:
    """One device reconnecting while the stage is slow: each connection it took over stayed
    until the stage answered, and ten of them held every slot (max_connections 10)."""
    stage.hold()
    limits = Limits(max_inflight=8, max_connections=10)
    clients: list[RawClient] = []
    async with running_server(stage, limits=limits) as server:
        for _ in range(10):
            client = await RawClient.connected(server.port, "reconnecting")
            clients.append(client)
            await client.send(
                b"".join(publish_packet("t", b"x", qos=1, packet_id=i + 1) for i in range(8))
            )
            await asyncio.sleep(0.05)
        await until(lambda: server.connection_count == 1, timeout=5)
        other = await RawClient.connected(server.port, "another-device")
        stage.release()
        for client in [*clients, other]:
            await client.aclose()
    assert counters(server).get("takeovers") == 9


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


# -- clients that do not read, or leave and come back -----------------------------------------


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


async def test_events_of_a_closed_connection_do_not_pile_up_behind_a_slow_stage(
    stage: RecordingStage,
) -> None:
    """A client that sends, drops the connection and comes back while the stage is stuck: the
    events of each closed connection stayed queued for the stage (600 events, 58 MB after 40
    rounds with max_inflight 16), to be stored later unacknowledged. Now those no stage call took
    are withdrawn with their connection."""
    stage.hold()
    limits = Limits(max_connections=1, max_inflight=16)
    async with running_server(stage, limits=limits) as server:
        for _ in range(40):
            client = await RawClient.connected(server.port, "again")
            await client.send(
                b"".join(
                    publish_packet("t", b"x" * 1000, qos=1, packet_id=i + 1) for i in range(15)
                )
            )
            await asyncio.sleep(0.02)
            await client.aclose()
            async with asyncio.timeout(5):
                while server.connection_count:  # noqa: ASYNC110  # polling a counter
                    await asyncio.sleep(0.01)
        await asyncio.wait_for(stage.waiting.wait(), 5)
        stage.release()
        await canary_publishes(server, stage, "after-rounds")
    # The stage call in progress when the rounds began (up to one connection's 15 events),
    # and the canary: nothing else.
    assert len(stage.payloads("t")) <= 15


async def test_qos0_events_of_a_closed_connection_are_still_stored(stage: RecordingStage) -> None:
    """Withdrawing is for events the client resends: QoS 0 ones it never does."""
    stage.hold()
    async with running_server(stage) as server:
        blocker = await RawClient.connected(server.port, "blocker")
        await blocker.send(publish_packet("b", b"held", qos=1, packet_id=1))
        await asyncio.wait_for(stage.waiting.wait(), 5)  # the stage call holds the batcher
        client = await RawClient.connected(server.port, "fire-and-forget")
        await client.send(b"".join(publish_packet("q0", b"%d" % i) for i in range(5)))
        await asyncio.sleep(0.1)  # read and queued behind that call
        await client.aclose()
        async with asyncio.timeout(5):
            while server.connection_count > 1:  # noqa: ASYNC110  # polling a counter
                await asyncio.sleep(0.01)
        stage.release()
        await canary_publishes(server, stage, "q0-after")
        await blocker.aclose()
    assert sorted(stage.payloads("q0")) == [b"%d" % i for i in range(5)]


@pytest.mark.parametrize("how", ["dropped", "taken_over"])
async def test_a_session_with_more_unreleased_ids_than_max_inflight_is_kept(
    stage: RecordingStage, how: str
) -> None:
    """PUBREC sent for ``max_inflight`` + 1 QoS 2 messages, none released yet (well within
    ``max_unreleased``; MQTT 3.1.1 has no receive maximum), then the link drops or the client
    takes its connection over before the last PUBREC reached it. The whole session was
    forgotten (CONNACK said no session), and the resend (DUP) of that message stored twice."""
    limits = Limits(max_inflight=4)
    count = limits.max_inflight + 1
    async with running_server(stage, limits=limits) as server:
        first = await persistent(server.port, "q2-wide", session_present=False)
        await first.send(
            b"".join(
                publish_packet("t", b"m%d" % i, qos=2, packet_id=i) for i in range(1, count + 1)
            )
        )
        assert [(await first.read()) is not None for _ in range(count)] == [True] * count
        if how == "dropped":
            await first.aclose()
            await until(lambda: server.connection_count == 0, timeout=5)
        second = await persistent(server.port, "q2-wide", session_present=True)
        await second.send(publish_packet("t", b"m%d" % count, qos=2, packet_id=count, dup=True))
        await second.send(pubrel_packet(count))
        answers = [await second.read() for _ in range(2)]
        assert [(a.kind, a.packet_id) for a in answers if a] == [(5, count), (7, count)]
        await second.aclose()
        await first.aclose()
    assert stage.payloads().count(b"m%d" % count) == 1


@pytest.mark.parametrize("kind", ["SUBSCRIBE", "UNSUBSCRIBE"])
async def test_a_subscribe_of_a_megabyte_does_not_stall_other_clients(
    stage: RecordingStage, kind: str
) -> None:
    """A SUBSCRIBE (or UNSUBSCRIBE) of 1 MiB, the agent's and the sink's default packet limit,
    holds about 260,000 one-character filters: decoding them and building the SUBACK held the
    event loop for one to three seconds per packet, every other client's acks waiting (F14).
    Nothing is ever delivered here: such a packet is closed on its declared length."""
    limits = Limits(max_packet_size=1024 * 1024)
    lags: list[float] = []

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - start - 0.005)

    async with running_server(stage, limits=limits) as server:
        client = await RawClient.connected(server.port, "many-filters")
        room = limits.max_packet_size - 8
        if kind == "SUBSCRIBE":
            body = struct.pack("!H", 1) + (utf8("a") + b"\x00") * (room // 4)
            big = packet(0x82, body)
        else:
            big = packet(0xA2, struct.pack("!H", 1) + utf8("a") * (room // 3))
        watcher = asyncio.create_task(watch())
        await client.send(big)
        answer = await client.read(30)  # None: closed
        await asyncio.sleep(0.05)
        watcher.cancel()
        await client.aclose()
        await canary_publishes(server, stage, f"after-{kind}")
    figures("huge subscribe", kind=kind, packet_bytes=len(big), max_loop_lag_s=round(max(lags), 3))
    assert max(lags) < 0.25, f"the event loop stalled for {max(lags):.2f} s"
    assert answer is None, f"answered ({answer}) instead of closed"
    assert counters(server).get("connections_closed", "too_large") == 1
