"""The sink's durable stage: events from the ingest server into the core queue (SPEC §3, §7).

A raw publish is one event with a sink-generated id (``device_id/raw/<uuid>``). On a connection
that announced ``format=batch-v2`` (or ``-v1``) each PUBLISH is an envelope of that version:
every event in it becomes its own core-queue message with its own id ``device_id/epoch/seq``, so
a resend after a lost ack is a duplicate the backend can recognise. The stage returns (and the
server acks) only once the backend confirmed every message of the batch; a `BackendError` fails
the whole batch: no ack.

What cannot be delivered as such but came from an authenticated device within its rights (a
malformed envelope, a topic level the backends cannot map, a message the backend says it can
never take) is acknowledged and stored in the backend's dead-letter destination with the reason,
never dropped silently; what even the dead-letter destination cannot take is refused (no ack).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from itertools import repeat

from cloud_sink.backends.base import CoreMessage, CoreQueue, DeadLetterMessage
from mqtt_ingest import IngestEvent, Metrics, StageRefused
from mqtt_ingest.envelope import (
    BATCH_FORMATS,
    EnvelopeError,
    EnvelopeTooLarge,
    decode,
    events_at_most,
)

__all__ = ["CALL_MESSAGES", "Forwarder", "unmappable_topic"]

log = logging.getLogger(__name__)

_new_message = tuple.__new__  # a CoreMessage from its fields in C (its __new__ is Python)


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


CALL_MESSAGES = 20_000
"""Core-queue messages per backend call at most, and the weight of one stage call (`weight`):
with the sink's batching, a stage call is one call for its events (and one for its dead letters,
if any), each within the backend's `timeout` (at most 12 s: 20,000 confirms took 2.4 s on
RabbitMQ here). Called directly with more, the forwarder makes several calls."""


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
        refused: list[StageRefused | None] | None = None
        refusal = self._queue.refusal
        for index, event in enumerate(events):
            try:
                ours, letters = self._messages(event)
            except EnvelopeTooLarge as exc:
                # Decompressed, over max_packet_size: refused as an uncompressed envelope of
                # that size is (by the packet limit), not acknowledged into the dead letters as
                # one undecoded blob (its events then never reached the core queue).
                if refused is None:
                    refused = [None] * len(events)
                refused[index] = StageRefused(exc.reason)
                self._metrics.inc("forwarded", reason="refused")
                log.warning(
                    "forward: refused an envelope of %s on %r, not acknowledged: %s",
                    event.identity.name, event.topic[:100], exc.reason,
                )  # fmt: skip
                continue
            if letters and await self._queue.recheck_limits():
                # A limit was raised since the backend last read it (a busy sink is not
                # probed): what it refused is asked again before anything is dead-lettered.
                ours, letters = self._messages(event)
            if letters:
                why_not = next(filter(None, map(refusal, letters)), None)
                if why_not is not None:
                    # Not even as a dead letter (too large for the backend at all): not
                    # acknowledged, the device keeps it (our agent dead-letters it locally after
                    # its attempts). Nothing of this MQTT message is forwarded.
                    if refused is None:
                        refused = [None] * len(events)
                    refused[index] = StageRefused(
                        f"{letters[0].reason} (nor as a dead letter: {why_not})"
                    )
                    self._metrics.inc("forwarded", reason="refused")
                    log.warning(
                        "forward: refused an event of %s on %r, not acknowledged: %s",
                        event.identity.name, event.topic[:100], refused[index],
                    )  # fmt: skip
                    continue
                dead += letters
            messages += ours
            if len(messages) >= CALL_MESSAGES:
                # Decoded, a batch of envelopes is up to 1,000 times its MQTT messages: held
                # whole, one device's batch cost hundreds of MB.
                await self._publish(messages)
                messages = []
        if messages:
            await self._publish(messages)
        if dead:
            await self._queue.dead_letter(dead)
            self._metrics.inc("forwarded", len(dead), reason="dead_letter")
            log.warning(
                "forward: %d events to dead letters, e.g. %s on %r: %s",
                len(dead), dead[0].device_id, dead[0].topic[:100], dead[0].reason,
            )  # fmt: skip
        return refused

    @staticmethod
    def weight(event: IngestEvent) -> int:
        """The core-queue messages ``event`` may become, at most (for the server's batching)."""
        if event.identity.attributes.get("format") in BATCH_FORMATS:
            return events_at_most(event.payload)
        return 1

    async def _publish(self, messages: list[CoreMessage]) -> None:
        outcome = await self._queue.publish(messages)
        self._metrics.inc("forwarded", outcome.stored, reason="stored")
        if outcome.duplicates:
            self._metrics.inc("forwarded", outcome.duplicates, reason="duplicate")

    def _messages(self, event: IngestEvent) -> tuple[list[CoreMessage], list[DeadLetterMessage]]:
        """The core-queue messages of one MQTT message, and the dead letters of what cannot be
        one: the whole payload of a malformed envelope; each event on a topic the backends
        cannot map, and each event the backend can never take (too large for it, a name it
        cannot carry), on its own. Such an event failed the whole batch before: an outage, and
        the device's resend brought it back, shutting every device out again."""
        device = event.identity.name
        received_ms = int(event.received_at * 1000)
        version = BATCH_FORMATS.get(event.identity.attributes.get("format", "raw"))
        try:
            ours = (
                [self._raw(event, device, received_ms)]
                if version is None
                else self._unpacked(event, device, received_ms, version)
            )
        except EnvelopeTooLarge:
            raise
        except EnvelopeError as exc:
            # No event ids to name it by: the digest names the device's resend of these bytes.
            digest = hashlib.sha256(event.topic.encode() + b"\0" + event.payload).hexdigest()
            letter_id = f"{device}/envelope/{digest[:32]}"
            letter = DeadLetterMessage(
                device, event.topic, event.payload, exc.reason, received_ms, letter_id
            )
            return [], [letter]
        problem = unmappable_topic(event.topic)
        refusal = self._queue.refusal
        if problem is None and not any(map(refusal, ours)):
            return ours, []
        good: list[CoreMessage] = []
        letters: list[DeadLetterMessage] = []
        for message in ours:
            why = problem or refusal(message)
            if why is None:
                good.append(message)
                continue
            if message.seq is not None:
                why += f" (event {message.event_id})"
            letters.append(
                DeadLetterMessage(
                    device, event.topic, message.payload, why, received_ms, message.event_id
                )
            )
        return good, letters

    def _unpacked(
        self, event: IngestEvent, device: str, received_ms: int, version: int
    ) -> list[CoreMessage]:
        """The events of an envelope of ``version`` (the connection's), each its own message;
        `EnvelopeError` if malformed."""
        envelope = decode(event.payload, max_body=self._max_body, version=version)
        seqs, times, payloads = zip(*envelope.events, strict=True)
        ids = map(f"{device}/{envelope.epoch}/".__add__, map(str, seqs))
        # Built in C, field by field in CoreMessage's order: no Python code runs per event.
        fields = zip(
            ids,
            repeat(device),
            repeat(event.topic),
            payloads,
            repeat(event.qos),
            repeat(received_ms),
            seqs,
            times,
            strict=False,  # the repeats are endless
        )
        return list(map(_new_message, repeat(CoreMessage), fields))

    @staticmethod
    def _raw(event: IngestEvent, device: str, received_ms: int) -> CoreMessage:
        """A raw publish: one event with a sink-generated id."""
        return CoreMessage(
            event_id=f"{device}/raw/{uuid.uuid4().hex}",
            device_id=device,
            topic=event.topic,
            payload=event.payload,
            qos=event.qos,
            received_at_ms=received_ms,
        )
