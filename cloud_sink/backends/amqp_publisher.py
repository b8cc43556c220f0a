"""Batches published on one aiormq channel, their publisher confirms tracked per batch.

aiormq's ``basic_publish`` gives every message a confirmation future in the channel's future
store (three done callbacks each) and answers a ``multiple`` basic.ack with one ``call_soon``
per delivery tag, after walking every pending confirmation; with batches of thousands of
events that asyncio machinery was a third of the sink's CPU per event with RabbitMQ
(docs/benchmarks.md, "Sink"). `BatchPublisher` keeps one future per batch instead, and for the
delivery tags only a watermark (every tag up to it is settled) and the few tags settled out of
order above it.

It takes over the channel's basic.ack / basic.nack / basic.return handling (aiormq's channel
reader calls ``_on_confirm_frame`` and ``_on_return_frame``; both are replaced on the instance,
hence the aiormq pin), so everything published on that channel must go through it. What stays
aiormq's: the channel lock, the delivery-tag counter, the bounded write queue, and the future
store, in which each batch future is registered so that a closing channel fails it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import aiormq
from aiormq.abc import ChannelFrame, ConfirmationFrameType
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from cloud_sink.backends.amqp_wire import publish_frames, publish_method

__all__ = ["BatchPublisher", "Outgoing"]

log = logging.getLogger(__name__)

_MESSAGES_PER_WRITE = 256  # messages marshalled into one write-queue item


class Outgoing(NamedTuple):
    """One message to publish: ``properties`` are marshalled basic properties (flags first),
    ``message_id`` the one they carry (a basic.return is matched to its message by it, its routing
    key and the publish order)."""

    routing_key: str
    properties: bytes
    body: bytes
    message_id: str


@dataclass(slots=True, eq=False)
class _Batch:
    first: int  # delivery tags first..last, inclusive
    last: int
    exchange: str
    messages: Sequence[Outgoing]  # of tags first, first + 1, ...
    future: asyncio.Future[None]


class BatchPublisher:
    """Publishes on ``channel`` (publisher confirms on) and tracks the confirms, one future per
    batch; create one per channel, right after opening it, before anything is published."""

    def __init__(self, channel: aiormq.Channel) -> None:
        if not channel.publisher_confirms:
            raise ValueError("the channel must have publisher confirms on")
        self._channel = channel
        self._written_to = channel.delivery_tag  # the last tag handed to the writer
        self._settled_to = channel.delivery_tag  # every tag up to this one is acked or nacked
        self._singles: set[int] = set()  # tags above it, settled one by one (out of order)
        self._returned_to = channel.delivery_tag  # the tag of the last message returned
        self._batches: deque[_Batch] = deque()  # in tag order, until every tag is settled
        # The channel reader looks these up on the instance for every basic.ack, basic.nack
        # and basic.return frame.
        channel._on_confirm_frame = self._on_confirm_frame  # type: ignore[method-assign]
        channel._on_return_frame = self._on_return_frame  # type: ignore[method-assign]

    async def publish(self, exchange: str, messages: Sequence[Outgoing]) -> None:
        """Publish ``messages`` in order, ``mandatory``, then wait until the broker confirmed
        every one of them.

        Raises aiormq's `DeliveryError` on a nack, `PublishError` when a message came back
        unroutable, `ChannelInvalidStateError` on a closed channel, the reason the channel
        closed if it closes before every confirm, and pamqp's ``ValueError`` or ``TypeError``
        for an exchange name or routing key it refuses. The first failure fails the batch at
        once, without waiting for the rest of its confirms. Cancelled while being written, the
        batch gives the delivery tags that never reached the writer back, as ``basic_publish``
        does, so that later confirms still match their messages.
        """
        if not messages:
            return
        channel = self._channel
        number, max_content = channel.number, channel.max_content_size
        methods: dict[str, bytes] = {}  # routing key -> method frame (mostly one per batch)
        async with channel.lock:
            if channel.is_closed:
                raise ChannelInvalidStateError(f"channel {number} is closed")
            first = channel.delivery_tag + 1
            batch = _Batch(
                first=first,
                last=first + len(messages) - 1,
                exchange=exchange,
                messages=messages,
                future=channel.create_future(),
            )
            self._batches.append(batch)
            channel.delivery_tag = batch.last
            written = first - 1  # the last tag handed to the writer
            try:
                out: list[bytes] = []
                for index, (key, properties, body, _) in enumerate(messages, start=first):
                    method = methods.get(key)
                    if method is None:
                        method = methods[key] = publish_method(number, exchange, key)
                    publish_frames(out, number, method, properties, body, max_content)
                    if index - written == _MESSAGES_PER_WRITE or index == batch.last:
                        frame = ChannelFrame(payload=b"".join(out), should_close=False)
                        await channel.write_queue.put(frame)
                        written = self._written_to = index
                        out = []
            except BaseException:
                # What never reached the writer gives its tags back, so that the broker's
                # numbering and ours stay the same; what did will be confirmed (or fail with
                # the channel) and is settled as usual, for a batch nobody waits for.
                channel.delivery_tag = batch.last = written
                if written < first and self._batches and self._batches[-1] is batch:
                    self._batches.pop()
                batch.future.cancel()
                raise
        await batch.future

    # -- the channel reader's callbacks -------------------------------------------------------

    async def _on_confirm_frame(self, frame: ConfirmationFrameType) -> None:
        # The reader passes basic.ack and basic.nack only (the type admits basic.reject).
        tag = frame.delivery_tag
        if not tag or tag > self._written_to:  # RabbitMQ never sends 0 ("all")
            log.error("amqp: confirm of delivery tag %r, never published: %r", tag, frame)
            return
        multiple = not isinstance(frame, Basic.Reject) and frame.multiple
        if multiple:
            low = self._settled_to + 1
            if tag < low:
                return
            before = {t for t in self._singles if t <= tag} if self._singles else set()
            self._singles -= before
            self._settled_to = tag
        else:
            if tag <= self._settled_to or tag in self._singles:
                return
            low, before = tag, set()
            if tag == self._settled_to + 1:
                self._settled_to = tag  # in order: the common case
            else:
                self._singles.add(tag)
        while self._singles and self._settled_to + 1 in self._singles:
            self._settled_to += 1
            self._singles.discard(self._settled_to)
        if not isinstance(frame, Basic.Ack):
            self._fail_nacked(low, tag, before, frame)
        batches = self._batches
        while batches and batches[0].last <= self._settled_to:
            done = batches.popleft()
            if not done.future.done():
                done.future.set_result(None)
        if self._singles and not multiple:
            self._complete_out_of_order(tag)

    def _fail_nacked(
        self, low: int, high: int, before: set[int], frame: ConfirmationFrameType
    ) -> None:
        """Fail each batch with a tag in low..high that was not settled before this frame."""
        for batch in self._batches:
            if batch.first > high:
                break
            if batch.last < low or batch.future.done():
                continue
            start, end = max(low, batch.first), min(high, batch.last)
            if end - start + 1 > sum(1 for t in before if start <= t <= end):
                batch.future.set_exception(DeliveryError(None, frame))

    def _complete_out_of_order(self, tag: int) -> None:
        """Resolve the batch holding ``tag`` if all of its tags above the watermark are settled."""
        for batch in self._batches:
            if batch.first > tag:
                return
            if tag <= batch.last:
                if not batch.future.done():
                    start = max(self._settled_to + 1, batch.first)
                    count = sum(1 for t in self._singles if start <= t <= batch.last)
                    if count == batch.last - start + 1:
                        batch.future.set_result(None)
                return

    async def _on_return_frame(self, frame: Basic.Return) -> None:
        # The returned message's content frames follow; read them as aiormq does.
        header = await self._channel._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} instead of ContentHeader", header)
        message = await self._channel._read_content(frame, header)
        message_id = header.properties.message_id
        batch = None if message_id is None else self._returned(frame, message_id)
        if batch is None:
            log.error("amqp: returned message %r matches no publish in flight", message_id)
        elif not batch.future.done():
            batch.future.set_exception(PublishError(message, frame))

    def _returned(self, frame: Basic.Return, message_id: str) -> _Batch | None:
        """The batch of the message a basic.return is for. The frame carries no delivery tag,
        but RabbitMQ returns a message before it confirms it and returns them in publish order:
        it is the first message with this id, exchange and routing key (whether a message is
        routable) published after the last one returned and not confirmed yet.

        Matched by id alone, a return went to the newest batch holding the id: with a device's
        resend in flight beside its first publish, a batch whose message came back was reported
        confirmed."""
        after = max(self._returned_to, self._settled_to)
        key, exchange = frame.routing_key, frame.exchange
        for batch in self._batches:
            if batch.last <= after or batch.exchange != exchange:
                continue
            messages = batch.messages
            for index in range(
                max(after + 1, batch.first) - batch.first, batch.last - batch.first + 1
            ):
                m = messages[index]
                if m.message_id == message_id and m.routing_key == key:
                    self._returned_to = batch.first + index
                    return batch
        return None
