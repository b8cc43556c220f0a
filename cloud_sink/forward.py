"""The sink's durable stage: events from the ingest server into the core queue (SPEC §3, §7).

A raw publish is one event with a sink-generated id (``device_id/raw/<uuid>``). On a connection
that announced ``format=batch-v1`` each PUBLISH is an envelope: every event in it becomes its own
core-queue message with its own id ``device_id/epoch/seq``, so a resend after a lost ack is a
duplicate the backend can recognise. The stage returns (and the server acks) only once the
backend confirmed every message of the batch; a `BackendError` fails the whole batch: no ack.

What cannot be delivered as such but came from an authenticated device within its rights (a
malformed envelope, a topic level the backends cannot map) is acknowledged and stored in the
backend's dead-letter destination with the reason, never dropped silently.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from cloud_sink.backends.base import CoreMessage, CoreQueue, DeadLetterMessage
from mqtt_ingest import IngestEvent, Metrics, StageRefused
from mqtt_ingest.envelope import FORMAT_BATCH_V1, EnvelopeError, decode

__all__ = ["Forwarder", "unmappable_topic"]

log = logging.getLogger(__name__)


def unmappable_topic(topic: str) -> str | None:
    """Why ``topic`` cannot become an AMQP routing key / NATS subject unchanged, or None."""
    for level in topic.split("/"):
        if not level:
            return "empty topic level"
        for char, name in ((".", "'.'"), ("*", "'*'"), (">", "'>'")):
            if char in level:
                return f"topic level {level[:50]!r} contains {name}"
        if any(c.isspace() for c in level):
            return f"topic level {level[:50]!r} contains white space"
    return None


class Forwarder:
    def __init__(self, queue: CoreQueue, metrics: Metrics, *, max_body: int) -> None:
        """``max_body`` bounds an envelope's body once decompressed (the sink passes its
        ``max_packet_size``): a compressed envelope must not cost more memory than the largest
        uncompressed one could (a 550-byte zstd frame declaring 16 MiB took 16 MiB)."""
        self._queue = queue
        self._metrics = metrics
        self._max_body = max_body

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        messages: list[CoreMessage] = []
        dead: list[DeadLetterMessage] = []
        for event in events:
            device = event.identity.name
            received_ms = int(event.received_at * 1000)
            problem = unmappable_topic(event.topic)
            batch = event.identity.attributes.get("format") == FORMAT_BATCH_V1
            if problem is None and batch:
                try:
                    envelope = decode(event.payload, max_body=self._max_body)
                except EnvelopeError as exc:
                    problem = exc.reason
                else:
                    prefix = f"{device}/{envelope.epoch}/"
                    topic, qos = event.topic, event.qos
                    messages += [
                        CoreMessage(
                            f"{prefix}{seq}", device, topic, body, qos, received_ms, seq, when
                        )
                        for seq, when, body in envelope.events
                    ]
                    continue
            if problem is not None:
                dead.append(
                    DeadLetterMessage(device, event.topic, event.payload, problem, received_ms)
                )
                continue
            messages.append(
                CoreMessage(
                    event_id=f"{device}/raw/{uuid.uuid4().hex}",
                    device_id=device,
                    topic=event.topic,
                    payload=event.payload,
                    qos=event.qos,
                    received_at_ms=received_ms,
                )
            )
        if messages:
            outcome = await self._queue.publish(messages)
            self._metrics.inc("forwarded", outcome.stored, reason="stored")
            if outcome.duplicates:
                self._metrics.inc("forwarded", outcome.duplicates, reason="duplicate")
        if dead:
            await self._queue.dead_letter(dead)
            self._metrics.inc("forwarded", len(dead), reason="dead_letter")
            log.warning(
                "forward: %d events to dead letters, e.g. %s on %r: %s",
                len(dead), dead[0].device_id, dead[0].topic[:100], dead[0].reason,
            )  # fmt: skip
        return None
