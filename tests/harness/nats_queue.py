"""The NATS JetStream core queue as the tests/test_sink_nats_*.py modules use it: `open_queue` on
the test's own streams (in memory unless told otherwise), `READ_TIMEOUT` for reading a stream back,
and `in_flight`, the batches the queue's publisher still tracks."""

from __future__ import annotations

from cloud_sink.backends.nats import NatsCoreQueue
from tests.harness.brokers import NatsNames

__all__ = ["READ_TIMEOUT", "in_flight", "open_queue"]


READ_TIMEOUT = 10.0


async def open_queue(
    names: NatsNames, *, url: str | None = None, **options: float
) -> NatsCoreQueue:
    return await NatsCoreQueue.open(
        url=url or names.url,
        stream=names.stream,
        subject_prefix=names.subject_prefix,
        dead_letter_stream=names.dead_letter_stream,
        dead_letter_subject_prefix=names.dead_letter_subject_prefix,
        storage="memory",
        **options,
    )


def in_flight(queue: NatsCoreQueue) -> int:
    """Batches the queue's publisher still tracks (each must go on completion or failure)."""
    return queue._publisher.in_flight
