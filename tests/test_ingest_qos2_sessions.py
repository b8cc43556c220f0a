"""QoS 2 exactly once across connections: the packet ids a client got PUBREC for and has not
released are kept in its session (CleanSession 0) when the link drops or the client takes its
own connection over, even mid-store, so the resend (DUP) is answered and not stored again; a
clean session starts afresh, and the kept sessions are bounded by their packet ids in all."""

from __future__ import annotations

import asyncio

import pytest

from mqtt_ingest import Limits
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet, pubrel_packet
from tests.harness.report import until
from tests.harness.stages import RecordingStage, counters, running_server

pytestmark = pytest.mark.fault


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
