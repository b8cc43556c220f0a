"""The ingest server's MQTT 3.1.1 behaviour, byte by byte (SPEC §3, §7)."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import Sequence

import pytest
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket

from mqtt_ingest import (
    Action,
    Anonymous,
    ConnackCode,
    ConnectRequest,
    FakeClock,
    Identity,
    IngestEvent,
    IngestServer,
    Limits,
    Refusal,
    StageRefused,
)
from mqtt_ingest.codec import encode_puback, encode_pubcomp, encode_pubrec
from tests.harness.rawmqtt import (
    DISCONNECT,
    PINGREQ,
    RawClient,
    connect_packet,
    packet,
    publish_packet,
    pubrel_packet,
    subscribe_packet,
    utf8,
)
from tests.harness.report import figures
from tests.harness.stages import RecordingStage, counters, running_server

CONNACK, PUBACK, PUBREC, PUBCOMP, SUBACK, PINGRESP = 2, 4, 5, 7, 9, 13


async def connack_code(port: int, packet: bytes) -> int | None:
    client = await RawClient.open(port)
    try:
        await client.send(packet)
        answer = await client.read()
        if answer is None:
            return None
        assert answer.kind == CONNACK
        assert await client.closed_within(2) or answer.body[1] == 0
        return answer.body[1]
    finally:
        await client.aclose()


class TokenAuth:
    """Accepts password b"good", refuses b"bad" as bad credentials, anything else as not allowed."""

    def __init__(self, expires_at: float | None = None) -> None:
        self.requests: list[ConnectRequest] = []
        self.expires_at = expires_at

    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal:
        self.requests.append(request)
        if request.password == b"good":
            return Identity(f"user:{request.username}", {"via": "token"}, self.expires_at)
        if request.password == b"bad":
            return Refusal("token signature invalid", ConnackCode.BAD_USERNAME_OR_PASSWORD)
        return Refusal("no token")


async def test_connack_return_codes(stage: RecordingStage) -> None:
    auth = TokenAuth()
    async with running_server(stage, authenticator=auth) as server:
        port = server.port
        ok = connect_packet("c1", username="u", password=b"good")
        assert await connack_code(port, ok) == 0
        assert await connack_code(port, connect_packet("c2", level=5)) == 1
        assert await connack_code(port, connect_packet("c2", level=3, name="MQIsdp")) == 1
        assert await connack_code(port, connect_packet("", clean=False)) == 2
        assert await connack_code(port, connect_packet("x" * 200)) == 2
        assert await connack_code(port, connect_packet("c\x01x")) == 2
        bad = connect_packet("c3", username="u", password=b"bad")
        assert await connack_code(port, bad) == ConnackCode.BAD_USERNAME_OR_PASSWORD
        assert await connack_code(port, connect_packet("c4")) == ConnackCode.NOT_AUTHORIZED
        will = connect_packet("c5", username="u", password=b"good", will=("w", b"x"))
        assert await connack_code(port, will) == ConnackCode.NOT_AUTHORIZED
        # MQTT 5's own layout (properties after the keep-alive), as paho or aiomqtt 3 send it:
        # CONNACK 1 too, not a connection dropped as malformed.
        mqtt5 = packet(0x10, utf8("MQTT") + bytes([5, 0x02, 0, 60, 0]) + utf8("c7"))
        assert await connack_code(port, mqtt5) == 1
        # A wrong protocol name gets no CONNACK at all (MQTT-3.1.2-1).
        assert await connack_code(port, connect_packet("c6", name="HTTP")) is None
        refused = counters(server).snapshot()
    assert auth.requests[0].username == "u"
    assert auth.requests[0].password == b"good"
    assert refused["connections_refused{token signature invalid}"] == 1
    assert refused["connections_refused{no token}"] == 1
    assert refused["connections_refused{will}"] == 1
    assert refused["connections_refused{protocol}"] == 4
    assert "connections_refused{malformed}" not in refused
    assert refused["connects_accepted"] == 1


async def test_empty_client_id_with_clean_session_gets_one(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "")
        await client.send(publish_packet("t", b"x", qos=1, packet_id=1))
        assert (await client.read()) is not None
        await client.aclose()
    assert stage.events[0].client_id.startswith("auto-")


async def test_acks_leave_in_publish_order_across_qos(stage: RecordingStage) -> None:
    async with running_server(stage, limits=Limits(batch_max_events=3)) as server:
        client = await RawClient.connected(server.port, "order")
        sent: list[tuple[int, int]] = []
        burst = b""
        for i in range(1, 61):
            qos = i % 3
            burst += publish_packet(f"o/{qos}", str(i).encode(), qos=qos, packet_id=i)
            if qos:
                sent.append((PUBACK if qos == 1 else PUBREC, i))
        await client.send(burst)
        got = [await client.read() for _ in sent]
        assert [(p.kind, p.packet_id) for p in got if p is not None] == sent
        await client.send(DISCONNECT)
        assert await client.closed_within(2)
    assert [e.payload for e in stage.events] == [str(i).encode() for i in range(1, 61)]
    assert max(stage.batch_sizes) <= 3


async def test_qos2_resend_before_pubrel_is_not_forwarded_twice(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "q2")
        await client.send(publish_packet("q2", b"once", qos=2, packet_id=7))
        first = await client.read()
        await client.send(publish_packet("q2", b"once", qos=2, packet_id=7, dup=True))
        second = await client.read()
        assert first is not None
        assert second is not None
        assert (first.kind, first.packet_id) == (PUBREC, 7)
        assert (second.kind, second.packet_id) == (PUBREC, 7)
        await client.send(pubrel_packet(7))
        comp = await client.read()
        assert comp is not None
        assert (comp.kind, comp.packet_id) == (PUBCOMP, 7)
        # After PUBREL the id is free again: the same id is a new message.
        await client.send(publish_packet("q2", b"twice", qos=2, packet_id=7))
        again = await client.read()
        assert again is not None
        assert again.kind == PUBREC
        # PUBREL for an id the server does not know is still completed (§4.3.3).
        await client.send(pubrel_packet(7) + pubrel_packet(999))
        done = [await client.read(), await client.read()]
        assert [(p.kind, p.packet_id) for p in done if p] == [(PUBCOMP, 7), (PUBCOMP, 999)]
        await client.aclose()
    assert stage.payloads() == [b"once", b"twice"]
    assert counters(server).get("qos2_duplicates") == 1


async def test_ping_and_subscribe(stage: RecordingStage) -> None:
    class SubscribeOwnPrefix:
        def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
            return topic.startswith("mine/")

    async with running_server(stage, rights=SubscribeOwnPrefix()) as server:
        client = await RawClient.connected(server.port, "subscriber")
        await client.send(PINGREQ)
        pong = await client.read()
        assert pong is not None
        assert pong.kind == PINGRESP
        await client.send(subscribe_packet(3, ("#", 1), ("mine/a", 1), ("mine/b", 2)))
        suback = await client.read()
        assert suback is not None
        assert suback.kind == SUBACK
        assert suback.body == b"\x00\x03\x80\x01\x02"
        await client.aclose()
    assert counters(server).get("security_events", "subscribe_denied") == 1


async def test_a_subscribe_of_many_denied_filters_is_one_log_line(
    stage: RecordingStage, caplog: pytest.LogCaptureFixture
) -> None:
    """A SUBSCRIBE near the packet limit holds tens of thousands of filters: logged one line per
    filter, a few such packets stalled every other connection for seconds. One line per packet,
    every filter counted."""
    caplog.set_level(logging.WARNING, logger="mqtt_ingest")
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "many-filters")
        for packet_id in (1, 2):
            await client.send(subscribe_packet(packet_id, *[("#", 0)] * 3_000))
            suback = await client.read()
            assert suback is not None
            assert suback.kind == SUBACK
            assert suback.body == packet_id.to_bytes(2, "big") + b"\x80" * 3_000
        await client.aclose()
    lines = [r.getMessage() for r in caplog.records if "may not subscribe" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].endswith("may not subscribe to '#' (and 2999 more filters)")
    assert counters(server).get("security_events", "subscribe_denied") == 6_000


async def test_publish_outside_rights_closes_without_ack(stage: RecordingStage) -> None:
    class OwnPrefix:
        def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
            return action is Action.PUBLISH and topic.startswith(f"devices/{identity.name}/")

    async with running_server(stage, rights=OwnPrefix()) as server:
        client = await RawClient.connected(server.port, "dev-1")
        await client.send(publish_packet("devices/dev-1/t", b"ok", qos=1, packet_id=1))
        ack = await client.read()
        assert ack is not None
        assert ack.kind == PUBACK
        await client.send(publish_packet("devices/dev-2/t", b"stolen", qos=1, packet_id=2))
        assert await client.closed_within(1)
    assert stage.payloads() == [b"ok"]
    assert counters(server).get("security_events", "publish_denied") == 1


async def test_takeover_closes_the_older_connection(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        old = await RawClient.connected(server.port, "same-id")
        new = await RawClient.connected(server.port, "same-id")
        assert await old.closed_within(2)
        await new.send(publish_packet("t", b"from new", qos=1, packet_id=1))
        ack = await new.read()
        assert ack is not None
        assert ack.kind == PUBACK
        await new.aclose()
    assert counters(server).get("takeovers") == 1
    assert counters(server).get("connections_closed", "takeover") == 1


async def test_keep_alive_is_enforced_at_one_and_a_half_times(stage: RecordingStage) -> None:
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "sleepy", keep_alive=1)
        # Pings keep it alive past the keep-alive ...
        for _ in range(3):
            await asyncio.sleep(0.6)
            await client.send(PINGREQ)
            assert await client.read() is not None
        # ... silence does not: closed after 1.5 s.
        assert not await client.closed_within(1.0)
        assert await client.closed_within(2.0)
    assert counters(server).get("connections_closed", "keep_alive") == 1


async def test_a_large_packet_arriving_slowly_is_not_cut_by_the_keep_alive(
    stage: RecordingStage,
) -> None:
    # RELIABILITY F6: 16 KiB at about 4 kB/s take 4 s, over 1.5 x keep-alive (1 s), while bytes
    # keep flowing. A whole packet is what stays overdue: a stalled one is still cut.
    async with running_server(stage) as server:
        client = await RawClient.connected(server.port, "slow", keep_alive=1)
        data = publish_packet("big", bytes(16 * 1024), qos=1, packet_id=1)
        for first in range(0, len(data), 1024):
            await client.send(data[first : first + 1024])
            await asyncio.sleep(0.25)
        ack = await client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (4, 1)
        await client.send(data[: len(data) // 2])  # then nothing more
        assert not await client.closed_within(1.0)
        assert await client.closed_within(2.0)
    assert stage.payloads() == [bytes(16 * 1024)]
    assert counters(server).get("connections_closed", "keep_alive") == 1


async def test_connection_closes_when_credentials_expire(stage: RecordingStage) -> None:
    clock = FakeClock(start=1_000_000.0)
    auth = TokenAuth(expires_at=1_000_000.5)
    async with running_server(stage, authenticator=auth, clock=clock) as server:
        client = await RawClient.connected(server.port, "exp", username="u", password=b"good")
        assert await client.closed_within(3)
        clock.advance(1)
        late = await connack_code(
            server.port, connect_packet("exp", username="u", password=b"good")
        )
        assert late == ConnackCode.NOT_AUTHORIZED
    assert counters(server).get("connections_closed", "expired") == 1
    assert counters(server).get("connections_refused", "expired") == 1


@pytest.mark.parametrize("keep_alive", [0, 7200])
async def test_keep_alive_zero_or_huge_is_capped(stage: RecordingStage, keep_alive: int) -> None:
    limits = Limits(max_keep_alive=1, keep_alive_factor=1.0)
    async with running_server(stage, limits=limits) as server:
        client = await RawClient.connected(server.port, "cap", keep_alive=keep_alive)
        assert await client.closed_within(3)


@pytest.mark.parametrize("packet_id", [1, 2, 255, 256, 4660, 65535])
def test_acknowledgements_are_encoded_as_amqtt_encodes_them(packet_id: int) -> None:
    expected = [
        bytes(packet_class.build(packet_id).to_bytes())
        for packet_class in (PubackPacket, PubrecPacket, PubcompPacket)
    ]
    ours = [encode_puback(packet_id), encode_pubrec(packet_id), encode_pubcomp(packet_id)]
    assert ours == expected


class DiscardingStage:
    """Stores nothing (so that the test sees only the server's own memory)."""

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        return None


def test_a_connection_keeps_no_memory_per_packet_id() -> None:
    """Thousands of distinct packet ids acknowledged leave nothing behind per id: a cache of the
    encoded acknowledgements by packet id once grew every process by up to ~10 MB. (A loop of its
    own without asyncio's debug mode, which keeps a traceback per future and timer.)"""

    async def acknowledged_ids() -> int:
        async with IngestServer(stage=DiscardingStage(), authenticator=Anonymous()) as server:
            client = await RawClient.connected(server.port, "ids")

            async def burst(first: int) -> None:
                ids = range(first, first + 500)
                packets = (publish_packet("t", b"x", qos=1, packet_id=i) for i in ids)
                await client.send(b"".join(packets))
                got = [await client.read() for _ in ids]
                acks = [(p.kind, p.packet_id) for p in got if p is not None]
                assert acks == [(PUBACK, i) for i in ids]

            await burst(1)  # warm-up: whatever a connection allocates once
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for first in range(501, 20_501, 500):
                    await burst(first)
                gc.collect()
                return tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
                await client.aclose()

    grown = asyncio.run(acknowledged_ids(), debug=False)
    figures("20,000 packet ids acknowledged", memory_kept_bytes=grown)
    assert grown < 1_000_000  # the per-id cache kept ~150 bytes per id: 3 MB here
