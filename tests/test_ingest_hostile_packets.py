"""Malformed and oversized packets from hostile peers (RELIABILITY F14, F15): raw sockets and
hypothesis byte streams; each bad packet closes its connection within a second, an oversized one
on its declared length (before any body is read from a client not yet authenticated), while
other clients are served; a packet just under the limit is accepted."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_ingest import Limits
from mqtt_ingest.handshake import MAX_CONNECT_BYTES
from tests.harness.ingest import PUBACK, canary_publishes
from tests.harness.rawmqtt import (
    RawClient,
    connect_packet,
    encode_length,
    packet,
    publish_packet,
    utf8,
)
from tests.harness.report import figures
from tests.harness.stages import RecordingStage, counters, running_server

pytestmark = pytest.mark.fault


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
