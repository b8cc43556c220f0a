"""The RabbitMQ core queue on the shared broker: confirmed means routed to a durable queue. A batch
arrives whole, in order, persistent and with its id headers (a resend is published again:
consumers dedupe by message id); an unroutable publish, a queue deleted under the sink and a
channel the broker closes fail the call, and the queue declares what is missing again; dead
letters land in their queue with their reason; an event over ``max_message_size`` or with an id
over 255 bytes is refused alone; quorum queues; a closed queue raises. Publisher confirms are in
tests/test_sink_amqp_confirms.py, the publish frames in tests/test_sink_amqp_wire.py, failures of
the broker or the link in tests/test_sink_amqp_faults.py."""

from __future__ import annotations

import hashlib

import pytest

from cloud_sink.backends.amqp import dead_letter_routing_key
from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage
from cloud_sink.forward import Forwarder
from mqtt_ingest import Counters, Identity, IngestEvent
from tests.harness.amqp_queue import DRAIN_TIMEOUT, core_queue, message
from tests.harness.brokers import RabbitNames, amqp_connection, drain_queue


async def test_batch_arrives_in_order_with_id_headers_and_persistence(
    rabbitmq: RabbitNames,
) -> None:
    batch = [message(rabbitmq, seq) for seq in range(1, 21)]
    raw = CoreMessage(f"sink-{rabbitmq.tag}", "raw-dev", "devices/raw-dev/x/y", b"\x00raw", 0, 7)
    async with core_queue(rabbitmq) as queue:
        outcome = await queue.publish(batch)
        assert (outcome.stored, outcome.duplicates) == (20, 0)
        # A resent event is published again: RabbitMQ cannot dedupe, consumers use message_id.
        again = await queue.publish([batch[0], raw])
        assert (again.stored, again.duplicates) == (2, 0)
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=22, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received[:20]] == [m.payload for m in batch]
    first = received[0]
    device = batch[0].device_id
    assert first.message_id == batch[0].event_id
    assert first.routing_key == f"devices.{device}.t"
    assert first.delivery_mode == 2
    assert first.headers == {
        "event-id": batch[0].event_id,
        "device-id": device,
        "topic": f"devices/{device}/t",
        "seq": 1,
        "event-time": 1_699_999_999_001,
        "received-at": 1_700_000_000_001,
        "qos": 1,
    }
    assert received[20].message_id == batch[0].event_id
    last = received[21]
    assert (last.body, last.message_id, last.routing_key) == (
        raw.payload,
        raw.event_id,
        "devices.raw-dev.x.y",
    )
    assert last.headers == {
        "event-id": raw.event_id,
        "device-id": "raw-dev",
        "topic": "devices/raw-dev/x/y",
        "received-at": 7,
        "qos": 0,
    }
    assert all(r.delivery_mode == 2 for r in received)


async def test_batch_over_several_writes_arrives_whole_and_in_order(
    rabbitmq: RabbitNames,
) -> None:
    # More messages than one write of the batch publisher holds.
    batch = [message(rabbitmq, seq) for seq in range(1, 1201)]
    async with core_queue(rabbitmq) as queue:
        outcome = await queue.publish(batch)
    assert outcome.stored == 1200  # confirmed by RabbitMQ: what follows only reads them back
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1200, timeout=60)
    assert [r.body for r in received] == [m.payload for m in batch]


async def test_large_body_is_split_into_frames(rabbitmq: RabbitNames) -> None:
    body = bytes(range(256)) * 2000  # 512 kB: several content-body frames
    base = message(rabbitmq, 1)
    big = CoreMessage(
        event_id=base.event_id,
        device_id=base.device_id,
        topic=base.topic,
        payload=body,
        qos=base.qos,
        received_at_ms=base.received_at_ms,
        seq=base.seq,
        event_time_ms=base.event_time_ms,
    )
    async with core_queue(rabbitmq) as queue:
        await queue.publish([big, message(rabbitmq, 2)])
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [body, b"p2"]


async def test_unroutable_publish_raises_then_recovers_once_bound(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue=None) as queue:
        with pytest.raises(BackendError, match="unroutable"):
            await queue.publish([message(rabbitmq, 1), message(rabbitmq, 2)])
        # Bind a queue by hand: the same queue object publishes fine afterwards.
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            bound = await channel.declare_queue(rabbitmq.queue, durable=True)
            await bound.bind(rabbitmq.exchange, "#")
            await channel.close()
        outcome = await queue.publish([message(rabbitmq, 3)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]


async def test_a_queue_deleted_under_the_sink_is_declared_again(rabbitmq: RabbitNames) -> None:
    """Every publish came back unroutable while the probe (the exchange declared again) passed:
    the sink flapped between outage and recovery for ever. The probe now declares the queues and
    bindings again, as at start."""
    async with core_queue(rabbitmq) as queue:
        assert (await queue.publish([message(rabbitmq, 1)])).stored == 1
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(rabbitmq.queue)
            await channel.close()
        with pytest.raises(BackendError, match="unroutable"):
            await queue.publish([message(rabbitmq, 2)])
        await queue.probe()
        assert (await queue.publish([message(rabbitmq, 3)])).stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]  # 1 went with the deleted queue, 2 came back


async def test_dead_letters_land_in_their_queue_with_reason(rabbitmq: RabbitNames) -> None:
    device = f"{rabbitmq.routing_prefix}-dev"
    letters = [
        DeadLetterMessage(
            device, f"devices/{device}/a.b", b"\x00bad", "topic level 'a.b'", 5, f"{device}/e/1"
        ),
        DeadLetterMessage(
            "we.ird *#id", "devices/x", b"{", "malformed envelope", 6, "we.ird *#id/e/2"
        ),
        DeadLetterMessage(device, "devices/x", b"long", "event id too long", 7, "é" * 200),
    ]
    async with core_queue(rabbitmq) as queue:
        await queue.dead_letter(letters)
    received = await drain_queue(
        rabbitmq.url, rabbitmq.dead_letter_queue, expected=3, timeout=DRAIN_TIMEOUT
    )
    assert [r.body for r in received] == [b"\x00bad", b"{", b"long"]
    assert [r.routing_key for r in received] == [device, "we_ird___id", device]
    # Consumers dedupe a resent letter by its message id; one too long for it is its digest.
    assert [r.message_id for r in received] == [
        f"{device}/e/1",
        "we.ird *#id/e/2",
        hashlib.sha256(("é" * 200).encode()).hexdigest(),
    ]
    assert received[0].headers == {
        "reason": "topic level 'a.b'",
        "device-id": device,
        "topic": f"devices/{device}/a.b",
        "received-at": 5,
    }
    assert received[1].headers["reason"] == "malformed envelope"
    assert received[1].headers["device-id"] == "we.ird *#id"
    assert all(r.delivery_mode == 2 for r in received)
    # Nothing reached the event queue.
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        events = await channel.declare_queue(rabbitmq.queue, passive=True)
        assert events.declaration_result.message_count == 0
        await channel.close()


async def test_an_event_over_max_message_size_is_refused_alone(rabbitmq: RabbitNames) -> None:
    """RabbitMQ closes the channel on a body over its ``max_message_size``: one such event failed
    the whole stage call, other devices' events included, at every resend. It is refused alone
    now (not acknowledged; too large for the dead letters too), the rest is stored. The limit is
    the body's, headers aside, as RabbitMQ counts it (checked against RabbitMQ 3.10 by lowering
    its limit)."""
    identity = Identity("dev-1", {})
    events = [
        IngestEvent(identity, "dev-1", "devices/dev-1/t", b"s" * size, 1, False, 1.0)
        for size in (4096, 4097, 10)
    ]
    async with core_queue(rabbitmq, max_message_size=4096) as queue:
        forwarder = Forwarder(queue, Counters(), max_body=1024**2)
        refused = await forwarder.store(events)
    assert refused is not None
    assert [None if r is None else str(r) for r in refused] == [
        None,
        "4097 bytes, over RabbitMQ's max_message_size (4096, [backend] max_message_size)"
        " (nor as a dead letter: 4097 bytes, over RabbitMQ's max_message_size (4096, [backend]"
        " max_message_size))",
        None,
    ]
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [len(r.body) for r in received] == [4096, 10]


def test_dead_letter_routing_key_is_one_safe_word() -> None:
    assert dead_letter_routing_key("dev-1") == "dev-1"
    assert dead_letter_routing_key("") == "_"
    assert dead_letter_routing_key("a/b.c*d#e>f g\x00") == "a_b_c_d_e_f_g_"
    assert len(dead_letter_routing_key("é" * 300).encode()) <= 255


async def test_quorum_queue(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue_type="quorum") as queue:
        await queue.publish([message(rabbitmq, seq) for seq in range(1, 6)])
        await queue.dead_letter([DeadLetterMessage("d", "t", b"x", "r", 1, "d/e/1")])
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(
            rabbitmq.queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        assert declared.declaration_result.message_count == 5
        await channel.close()
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=5, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p1", b"p2", b"p3", b"p4", b"p5"]


async def test_conflicting_queue_type_fails_open(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue_type="classic"):
        pass
    with pytest.raises(BackendError, match=r"PRECONDITION_FAILED|inequivalent"):
        async with core_queue(rabbitmq, queue_type="quorum"):
            pass


async def test_closed_queue_raises(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq) as queue:
        pass
    with pytest.raises(BackendError, match="closed"):
        await queue.publish([message(rabbitmq, 1)])
    with pytest.raises(BackendError, match="closed"):
        await queue.dead_letter([DeadLetterMessage("d", "t", b"x", "r", 1, "d/e/1")])


async def test_channel_closed_by_the_broker_fails_the_batch(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq) as queue:
        await queue.publish([message(rabbitmq, 1)])
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            await channel.exchange_delete(rabbitmq.exchange)
            await channel.close()
        # Publishing to a missing exchange: the broker closes the channel (404).
        with pytest.raises(BackendError, match=r"NOT_FOUND|ChannelNotFoundEntity"):
            await queue.publish([message(rabbitmq, 2), message(rabbitmq, 3)])
        # The next call opens a new channel and declares the exchange (and binding) again.
        outcome = await queue.publish([message(rabbitmq, 4)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p1", b"p4"]


async def test_event_id_over_255_bytes_is_refused_before_sending(rabbitmq: RabbitNames) -> None:
    long_id = message(rabbitmq, 2)._replace(event_id="é" * 128)
    async with core_queue(rabbitmq) as queue:
        with pytest.raises(BackendError, match="message id over 255 bytes"):
            await queue.publish([message(rabbitmq, 1), long_id])
        outcome = await queue.publish([message(rabbitmq, 3)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]
