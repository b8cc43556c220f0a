"""Publisher confirms of the RabbitMQ core queue (cloud_sink/backends/amqp_publisher.py): one
future per batch, delivery tags matched across batches. On a stub channel the tests play the
broker's confirms in any order: acks and nacks resolve or fail exactly the batches they cover, and
a batch cancelled while written gives its unwritten tags back; on the shared broker a cancelled
batch leaves the channel usable, and a nack, an unroutable or a returned message fails only the
batch it was published in while later confirms still match."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import aiormq
import aiormq.exceptions
import pytest
from aio_pika.abc import FieldValue
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from cloud_sink.backends.amqp_publisher import BatchPublisher, Outgoing
from cloud_sink.backends.base import BackendError, PublishOutcome
from tests.harness.amqp_queue import DRAIN_TIMEOUT, core_queue, message
from tests.harness.brokers import RabbitNames, amqp_connection, drain_queue


async def test_cancelled_batch_leaves_the_channel_usable(rabbitmq: RabbitNames) -> None:
    # A batch cancelled while its frames are being queued must give back the delivery tags that
    # never reached the broker; otherwise every later confirm would be matched to the wrong
    # publish, and the next batch would wait for a confirm that never comes.
    async with core_queue(rabbitmq, timeout=5.0) as queue:
        await queue.publish([message(rabbitmq, 1)])  # connected
        task = asyncio.create_task(queue.publish([message(rabbitmq, n) for n in range(2, 20_002)]))
        await asyncio.sleep(0)  # into the batch, before all of it is written
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outcome = await queue.publish([message(rabbitmq, 30_000)])
        assert outcome.stored == 1


class StubChannel:
    """What `BatchPublisher` uses of an aiormq channel, with a write queue nobody reads: the
    tests play the broker's confirms in orders a real RabbitMQ seldom produces."""

    publisher_confirms = True
    number = 1
    max_content_size = 131_064
    is_closed = False

    def __init__(self, write_queue_size: int = 0) -> None:
        self.delivery_tag = 0
        self.lock = asyncio.Lock()
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue(write_queue_size)

    def create_future(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def confirm(self, frame: Basic.Ack | Basic.Nack) -> None:
        on_confirm: Callable[[Basic.Ack | Basic.Nack], Awaitable[None]]
        on_confirm = self._on_confirm_frame  # type: ignore[attr-defined]  # set by the publisher
        await on_confirm(frame)


def outgoing(count: int, tag: str = "m") -> list[Outgoing]:
    return [Outgoing("k", b"\x00\x00", b"b", f"{tag}{n}") for n in range(count)]


async def started(publisher: BatchPublisher, count: int, tag: str = "m") -> asyncio.Task[None]:
    task = asyncio.create_task(publisher.publish("ex", outgoing(count, tag)))
    for _ in range(3):  # written, now waiting for its confirms
        await asyncio.sleep(0)
    assert not task.done()
    return task


async def test_confirms_in_any_order_resolve_the_right_batches() -> None:
    stub = StubChannel()
    publisher = BatchPublisher(cast(aiormq.Channel, stub))
    first, second, third = [await started(publisher, 3, t) for t in "abc"]  # 1-3, 4-6, 7-9
    assert stub.delivery_tag == 9
    # Out of order, one by one: the second batch is complete before the first.
    for tag in (5, 4, 6, 2):
        await stub.confirm(Basic.Ack(delivery_tag=tag))
    await asyncio.sleep(0)
    assert second.done()
    assert not first.done()
    assert not third.done()
    await second
    # Then a multiple ack over tags partly acked already.
    await stub.confirm(Basic.Ack(delivery_tag=7, multiple=True))
    await first
    assert not third.done()
    await stub.confirm(Basic.Ack(delivery_tag=9))
    await stub.confirm(Basic.Ack(delivery_tag=8))
    await third


async def test_a_nack_fails_only_the_batches_it_covers() -> None:
    stub = StubChannel()
    publisher = BatchPublisher(cast(aiormq.Channel, stub))
    first, second, third = [await started(publisher, 2, t) for t in "abc"]  # 1-2, 3-4, 5-6
    await stub.confirm(Basic.Ack(delivery_tag=1))
    await stub.confirm(Basic.Ack(delivery_tag=3))
    # Tags 2 and 4 nacked (1 and 3 were acked already): the first two batches fail.
    await stub.confirm(Basic.Nack(delivery_tag=4, multiple=True))
    for task in (first, second):
        with pytest.raises(aiormq.exceptions.DeliveryError):
            await task
    # A multiple nack over tags that were all acked one by one fails nothing.
    await stub.confirm(Basic.Ack(delivery_tag=6))
    await stub.confirm(Basic.Nack(delivery_tag=5))
    with pytest.raises(aiormq.exceptions.DeliveryError):
        await third
    fourth = await started(publisher, 2, "d")  # 7-8
    await stub.confirm(Basic.Ack(delivery_tag=7))
    await stub.confirm(Basic.Nack(delivery_tag=7, multiple=True))  # nothing new: ignored
    await stub.confirm(Basic.Ack(delivery_tag=8, multiple=True))
    await fourth


async def test_batch_cancelled_while_written_gives_its_unwritten_tags_back() -> None:
    stub = StubChannel(write_queue_size=1)  # the second write of a batch waits
    publisher = BatchPublisher(cast(aiormq.Channel, stub))
    task = asyncio.create_task(publisher.publish("ex", outgoing(600)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert stub.write_queue.qsize() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stub.delivery_tag == 256  # the first write reached the writer, the rest is given back
    stub.write_queue = asyncio.Queue()
    nxt = await started(publisher, 1, "n")  # tag 257
    await stub.confirm(Basic.Ack(delivery_tag=256, multiple=True))  # the cancelled batch's
    assert not nxt.done()
    await stub.confirm(Basic.Ack(delivery_tag=257))
    await nxt
    # A confirm for a tag never handed out is ignored (and logged), not taken for a later one.
    await stub.confirm(Basic.Ack(delivery_tag=300, multiple=True))
    last = await started(publisher, 1, "l")  # tag 258
    await asyncio.sleep(0)
    assert not last.done()
    await stub.confirm(Basic.Ack(delivery_tag=258))
    await last


async def test_batches_on_a_closed_channel_fail_at_once() -> None:
    stub = StubChannel()
    publisher = BatchPublisher(cast(aiormq.Channel, stub))
    stub.is_closed = True
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await publisher.publish("ex", outgoing(1))
    assert stub.delivery_tag == 0


async def test_nack_fails_the_batch_and_later_confirms_match(rabbitmq: RabbitNames) -> None:
    # A queue that refuses what does not fit: RabbitMQ nacks those publishes.
    arguments: dict[str, FieldValue] = {"x-max-length": 3, "x-overflow": "reject-publish"}
    async with (
        core_queue(rabbitmq, queue=None) as queue,
        amqp_connection(rabbitmq.url) as connection,
    ):
        channel = await connection.channel()
        bounded = await channel.declare_queue(rabbitmq.queue, durable=True, arguments=arguments)
        await bounded.bind(rabbitmq.exchange, "#")
        with pytest.raises(BackendError, match="not confirmed"):
            await queue.publish([message(rabbitmq, seq) for seq in range(1, 6)])
        await bounded.purge()
        outcome = await queue.publish([message(rabbitmq, seq) for seq in (6, 7)])
        assert outcome.stored == 2
        await channel.close()
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p6", b"p7"]


async def test_unroutable_message_fails_only_its_batch(rabbitmq: RabbitNames) -> None:
    routed, lost = f"{rabbitmq.routing_prefix}-ok", f"{rabbitmq.routing_prefix}-lost"
    async with core_queue(rabbitmq, queue=None) as queue:
        await bind_queue(rabbitmq, routed)
        good = [message(rabbitmq, seq, routed) for seq in range(1, 301)]
        mixed = [message(rabbitmq, 1000, routed), message(rabbitmq, 1001, lost)]
        mixed.append(message(rabbitmq, 1002, routed))
        more = [message(rabbitmq, seq, routed) for seq in range(2001, 2301)]
        # Concurrent batches on the one channel: tags and returns must go to the right batch.
        results = await asyncio.gather(
            queue.publish(good), queue.publish(mixed), queue.publish(more), return_exceptions=True
        )
        assert [type(r) for r in results] == [PublishOutcome, BackendError, PublishOutcome]
        assert "unroutable" in str(results[1])
        outcome = await queue.publish([message(rabbitmq, 3000, routed)])
        assert outcome.stored == 1
    expected = 300 + 2 + 300 + 1  # the routable messages of the failed batch went through too
    received = await drain_queue(
        rabbitmq.url, rabbitmq.queue, expected=expected, timeout=DRAIN_TIMEOUT
    )
    bodies = {r.body for r in received}
    assert {m.payload for m in [*good, *more]} <= bodies
    assert b"p1001" not in bodies


async def test_a_returned_message_fails_the_batch_it_was_published_in(
    rabbitmq: RabbitNames,
) -> None:
    """A basic.return names no delivery tag: it was matched by message id to the newest batch in
    flight holding it. With a device's resend in flight beside its first publish (the same event
    id), the older batch was confirmed and reported stored though its message came back. Here the
    same id in batches in flight at once, some unroutable, some routable (their routing keys
    differ), in either order: each return fails its own batch."""
    routed, lost = f"{rabbitmq.routing_prefix}-ok", f"{rabbitmq.routing_prefix}-lost"
    async with core_queue(rabbitmq, queue=None) as queue:
        await bind_queue(rabbitmq, routed)
        returned = message(rabbitmq, 1, lost)
        stored = message(rabbitmq, 1, routed)._replace(event_id=returned.event_id)
        for batches in (
            [[returned], [returned]],
            [[returned, returned], [stored], [returned]],
            [[stored], [returned]],
        ):
            results = await asyncio.gather(
                *(queue.publish(batch) for batch in batches), return_exceptions=True
            )
            kinds = [BackendError if batch[0] is returned else PublishOutcome for batch in batches]
            assert [type(r) for r in results] == kinds, results
        assert (await queue.publish([stored])).stored == 1  # later confirms still match
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=3, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p1", b"p1", b"p1"]


async def bind_queue(rabbitmq: RabbitNames, device: str) -> None:
    """The test's queue, bound to the events of ``device`` only (others are unroutable)."""
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        bound = await channel.declare_queue(rabbitmq.queue, durable=True)
        await bound.bind(rabbitmq.exchange, f"devices.{device}.*")
        await channel.close()
