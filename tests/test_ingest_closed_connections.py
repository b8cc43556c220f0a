"""The events of a connection closed while the stage is slow: dropped by the client, taken
over, or closed from outside (its device revoked). What no stage call took is withdrawn, never
handed to the stage late, and does not pile up in front of it; QoS 0 events are still stored
(past a bound, withdrawn and counted); closed connections do not hold connection slots."""

from __future__ import annotations

import asyncio

import pytest

from mqtt_ingest import Limits
from mqtt_ingest.server import ORPHANS_PER_INFLIGHT
from tests.harness.ingest import canary_publishes
from tests.harness.rawmqtt import RawClient, publish_packet
from tests.harness.report import figures, until
from tests.harness.stages import RecordingStage, SlowStage, counters, running_server

pytestmark = pytest.mark.fault


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
