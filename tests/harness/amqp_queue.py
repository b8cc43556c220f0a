"""The RabbitMQ core queue as the tests/test_sink_amqp_*.py modules use it: `core_queue` opens one
on the test's own exchange and queues (and closes it), `message` is an event of the test's own
device, `DRAIN_TIMEOUT` bounds reading a queue back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cloud_sink.backends.amqp import AmqpCoreQueue, QueueType
from cloud_sink.backends.base import CoreMessage
from tests.harness.brokers import RabbitNames
from tests.harness.sink import core_message

__all__ = ["DRAIN_TIMEOUT", "core_queue", "message"]

DRAIN_TIMEOUT = 10.0


def message(names: RabbitNames, seq: int, device: str | None = None) -> CoreMessage:
    return core_message(seq, device or f"{names.routing_prefix}-dev")


@asynccontextmanager
async def core_queue(
    names: RabbitNames,
    *,
    url: str | None = None,
    queue: str | None = "default",
    queue_type: QueueType = "classic",
    timeout: float = 10.0,
    max_message_size: int = 16 * 1024**2,
) -> AsyncIterator[AmqpCoreQueue]:
    opened = await AmqpCoreQueue.open(
        url=url or names.url,
        exchange=names.exchange,
        queue=names.queue if queue == "default" else queue,
        queue_type=queue_type,
        dead_letter_exchange=names.dead_letter_exchange,
        dead_letter_queue=names.dead_letter_queue,
        max_message_size=max_message_size,
        timeout=timeout,
    )
    try:
        yield opened
    finally:
        await opened.aclose()
