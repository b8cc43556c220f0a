"""The broker harness against the shared RabbitMQ and NATS: unique names, round trips, cleanup."""

from __future__ import annotations

import asyncio

import aio_pika
import aio_pika.exceptions
import aiormq
import nats.js.errors
import pytest
from nats.js.api import StorageType, StreamConfig

from tests.harness.brokers import (
    MissingMessagesError,
    NatsNames,
    RabbitNames,
    amqp_connection,
    drain_queue,
    nats_connection,
    nats_names,
    poll_until,
    rabbit_names,
    read_stream,
    time_before,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

_TIMEOUT = 10.0
_UNREACHABLE_AMQP = "amqp://guest:secret@127.0.0.1:1/"
_UNREACHABLE_NATS = "nats://127.0.0.1:1"

_seen_rabbit_names: set[str] = set()
_seen_nats_names: set[str] = set()


def _rabbit_objects(names: RabbitNames) -> set[str]:
    return {*names.exchanges, *names.queues, names.routing_prefix}


def _nats_objects(names: NatsNames) -> set[str]:
    return {*names.streams, names.subject_prefix, names.dead_letter_subject_prefix}


async def test_a_reading_loop_ends_at_its_deadline_even_if_a_poll_swallows_the_cancellation() -> (
    None
):
    # What Python 3.11's asyncio.wait_for does inside aio-pika's and nats-py's calls when the
    # cancellation lands as the call completes: the caller sees a result, not CancelledError.
    async def swallowing_poll() -> None:
        try:
            await asyncio.sleep(10)  # a library call with a timeout of its own
        except asyncio.CancelledError:
            return

    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + 0.2
    polls = 0
    async with asyncio.timeout(5):
        while time_before(end):
            async with poll_until(end):
                await swallowing_poll()
            polls += 1
    assert polls == 1
    assert end <= loop.time() < started + 1.0


async def test_a_poll_past_the_deadline_ends_quietly_and_a_poll_of_its_own_timeout_raises() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with poll_until(started + 0.05):
        await asyncio.sleep(1)
    assert loop.time() - started < 0.5
    with pytest.raises(TimeoutError):
        async with poll_until(loop.time() + 5):
            raise TimeoutError("the call's own timeout")


@pytest.mark.parametrize("run", [1, 2])
async def test_rabbitmq_fixture_names_are_unique_per_test(rabbitmq: RabbitNames, run: int) -> None:
    # Whichever of the two runs comes second sees the first one's names.
    objects = _rabbit_objects(rabbitmq)
    # Exchanges and queues live in separate namespaces, so a queue may share its exchange's name.
    assert len(set(rabbitmq.exchanges)) == len(set(rabbitmq.queues)) == 2
    assert not objects & _seen_rabbit_names
    _seen_rabbit_names.update(objects)
    assert rabbitmq.exchange.startswith(f"bridge-test-{rabbitmq.tag}")
    async with rabbit_names() as other:
        assert not _rabbit_objects(other) & objects


async def test_rabbit_round_trip_then_teardown_deletes_everything() -> None:
    async with rabbit_names() as names:
        async with asyncio.timeout(_TIMEOUT), amqp_connection(names.url) as connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead_letter = await channel.declare_exchange(
                names.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead_letter_queue = await channel.declare_queue(names.dead_letter_queue, durable=True)
            await dead_letter_queue.bind(dead_letter, "#")
            queue = await channel.declare_queue(
                names.queue,
                durable=True,
                arguments={"x-dead-letter-exchange": names.dead_letter_exchange},
            )
            await queue.bind(exchange, f"{names.routing_prefix}.#")

            routing_key = f"{names.routing_prefix}.devices.d1.temp"
            headers: dict[str, object] = {"event-id": "e-1", "device-id": "d1", "seq": 7}
            confirm = await exchange.publish(
                aio_pika.Message(
                    b"21.5",
                    message_id="e-1",
                    headers={"event-id": "e-1", "device-id": "d1", "seq": 7},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key,
                mandatory=True,
                timeout=_TIMEOUT,
            )
            assert isinstance(confirm, aiormq.spec.Basic.Ack)
            # mandatory + on_return_raises: an unroutable publish is an error, not a silent loss.
            with pytest.raises(aio_pika.exceptions.DeliveryError):
                await exchange.publish(
                    aio_pika.Message(b"lost"), "elsewhere.d1", mandatory=True, timeout=_TIMEOUT
                )
            await channel.close()

        [message] = await drain_queue(names.url, names.queue, expected=1, timeout=_TIMEOUT)
        assert message.body == b"21.5"
        assert message.message_id == "e-1"
        assert message.headers == headers
        assert message.routing_key == routing_key
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        # Acked: nothing is left for a second reader.
        with pytest.raises(MissingMessagesError) as missing:
            await drain_queue(names.url, names.queue, expected=1, timeout=0.2)
        assert missing.value.received == ()

    async with asyncio.timeout(_TIMEOUT), amqp_connection(names.url) as connection:
        for exchange_name in names.exchanges:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(exchange_name, passive=True)
        for queue_name in names.queues:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue_name, passive=True)


async def test_drain_queue_leaves_the_messages_beyond_expected_in_order(
    rabbitmq: RabbitNames,
) -> None:
    """The reader takes messages ahead under its prefetch; those beyond `expected` must go back
    to the queue unacknowledged, still in queue order for the next reader."""
    async with asyncio.timeout(_TIMEOUT), amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(rabbitmq.queue, durable=True)
        for n in range(10):
            await channel.default_exchange.publish(aio_pika.Message(b"%d" % n), queue.name)
        await channel.close()
    first = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=3, timeout=_TIMEOUT)
    rest = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=7, timeout=_TIMEOUT)
    assert [m.body for m in first + rest] == [b"%d" % n for n in range(10)]
    with pytest.raises(MissingMessagesError):
        await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=0.2)


async def test_drain_queue_reports_a_missing_queue(rabbitmq: RabbitNames) -> None:
    with pytest.raises(AssertionError, match="does not exist"):
        await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=1.0)


async def test_unreachable_rabbitmq_fails_not_skips() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"127\.0\.0\.1:1") as failed:
        async with rabbit_names(_UNREACHABLE_AMQP):
            raise AssertionError("the body must not run")
    assert "secret" not in str(failed.value)


@pytest.mark.parametrize("run", [1, 2])
async def test_nats_fixture_names_are_unique_per_test(nats_jetstream: NatsNames, run: int) -> None:
    objects = _nats_objects(nats_jetstream)
    assert len(objects) == 4
    assert not objects & _seen_nats_names
    _seen_nats_names.update(objects)
    assert not nats_jetstream.subjects.startswith(nats_jetstream.dead_letter_subject_prefix + ".")
    async with nats_names() as other:
        assert not _nats_objects(other) & objects


async def test_nats_round_trip_with_duplicate_then_teardown_deletes_streams() -> None:
    async with nats_names() as names:
        async with asyncio.timeout(_TIMEOUT), nats_connection(names.url) as client:
            js = client.jetstream(timeout=_TIMEOUT)
            for stream, subjects in (
                (names.stream, names.subjects),
                (names.dead_letter_stream, names.dead_letter_subjects),
            ):
                await js.add_stream(
                    StreamConfig(name=stream, subjects=[subjects], storage=StorageType.MEMORY)
                )
            first_subject = f"{names.subject_prefix}.devices.d1.temp"
            second_subject = f"{names.subject_prefix}.devices.d2.temp"
            first = await js.publish(
                first_subject, b"21.5", headers={"Nats-Msg-Id": "e-1", "seq": "1"}
            )
            second = await js.publish(
                second_subject, b"22.0", headers={"Nats-Msg-Id": "e-2", "seq": "2"}
            )
            again = await js.publish(
                first_subject, b"21.5", headers={"Nats-Msg-Id": "e-1", "seq": "1"}
            )
            assert (first.seq, second.seq) == (1, 2)
            assert not first.duplicate
            assert not second.duplicate
            assert again.duplicate
            assert again.seq == first.seq

        messages = await read_stream(names.url, names.stream, expected=2, timeout=_TIMEOUT)
        assert [(m.body, m.subject, m.msg_id, m.stream_sequence) for m in messages] == [
            (b"21.5", first_subject, "e-1", 1),
            (b"22.0", second_subject, "e-2", 2),
        ]
        assert messages[0].headers["seq"] == "1"
        # Reading does not consume, and the duplicate was never stored.
        with pytest.raises(MissingMessagesError) as missing:
            await read_stream(names.url, names.stream, expected=3, timeout=0.5)
        assert [m.msg_id for m in missing.value.received] == ["e-1", "e-2"]

    async with asyncio.timeout(_TIMEOUT), nats_connection(names.url) as client:
        jsm = client.jsm(timeout=_TIMEOUT)
        for stream in names.streams:
            with pytest.raises(nats.js.errors.NotFoundError):
                await jsm.stream_info(stream)


async def test_read_stream_reports_a_missing_stream(nats_jetstream: NatsNames) -> None:
    with pytest.raises(AssertionError, match="does not exist"):
        await read_stream(nats_jetstream.url, nats_jetstream.stream, expected=1, timeout=1.0)


async def test_unreachable_nats_fails_not_skips() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"127\.0\.0\.1:1"):
        async with nats_names(_UNREACHABLE_NATS):
            raise AssertionError("the body must not run")
