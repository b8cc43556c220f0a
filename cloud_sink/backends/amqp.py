"""The RabbitMQ core queue (aio-pika): a durable topic exchange, confirmed persistent messages.

Every event goes to the exchange with the uplink topic as routing key (``/`` becomes ``.``; topics
were checked upstream to hold no ``.``, ``*``, ``>``, white space or empty level), ``message_id``
set to the event id and the metadata as headers. A publish returns only once the broker confirmed
every message of the batch: a nack, a returned (unroutable, ``mandatory``) message, a lost channel
or connection, or no answer within ``timeout`` raise `BackendError`, so the batch is not acked
upstream and is retried. RabbitMQ does not deduplicate: a resent event is published again and
consumers dedupe by ``message_id`` (``PublishOutcome.duplicates`` is always 0).

Dead letters go to their own durable topic exchange with the device id (made safe as one routing
key word) as routing key and ``reason``, ``device-id``, ``topic`` and ``received-at`` headers.

The connection is a plain (non-robust) one: when it or the channel is lost, the next call opens a
new one and declares the topology again, within that call's ``timeout``.

aio-pika sets the topology up; a batch is published on its underlying aiormq channel by
`_publish_all`, which does aiormq's per-message publish bookkeeping once per batch (half the
sink's CPU per event with RabbitMQ; docs/benchmarks.md, "Sink").
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
import pamqp.exceptions
from aiormq.abc import ChannelFrame
from pamqp.base import Frame as FrameType
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage, PublishOutcome

__all__ = ["AmqpCoreQueue", "QueueType", "dead_letter_routing_key", "routing_key"]

QueueType = Literal["classic", "quorum"]

_MAX_ROUTING_KEY_BYTES = 255
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_FRAMES_PER_WRITE = 256  # messages marshalled into one write-queue item
_UNSAFE_WORD = re.compile(r"[.*#/+>\x00-\x20\x7f-\x9f\s]")
_ERRORS: tuple[type[BaseException], ...] = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS,  # AMQPError, OSError (TimeoutError), RuntimeError
    pamqp.exceptions.PAMQPException,
    ValueError,  # pamqp refusing to encode a field
)


def routing_key(topic: str) -> str:
    """The routing key of an uplink topic: its levels joined with ``.`` instead of ``/``."""
    return topic.replace("/", ".")


def dead_letter_routing_key(device_id: str) -> str:
    """`device_id` as one routing-key word: separators, wildcards, control characters and white
    space become ``_``, the result is cut to 255 bytes and is never empty (a dead letter may come
    from an id that failed validation)."""
    word = _UNSAFE_WORD.sub("_", device_id) or "_"
    encoded = word.encode("utf-8", "replace")[:_MAX_ROUTING_KEY_BYTES]
    return encoded.decode("utf-8", "ignore") or "_"


@dataclass(frozen=True, slots=True)
class _Session:
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    # aio-pika's underlying aiormq channel: publishes go to it directly (see `_publish_all`).
    raw: aiormq.Channel
    exchange: aio_pika.abc.AbstractExchange
    dead_letter_exchange: aio_pika.abc.AbstractExchange

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed


class AmqpCoreQueue:
    """`CoreQueue` on RabbitMQ; create it with `open`."""

    def __init__(
        self,
        *,
        url: str,
        exchange: str,
        queue: str | None,
        queue_type: QueueType,
        dead_letter_exchange: str,
        dead_letter_queue: str,
        timeout: float,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type must be 'classic' or 'quorum', not {queue_type!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.url = url
        self.exchange = exchange
        self.queue = queue
        self.queue_type: QueueType = queue_type
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_queue = dead_letter_queue
        self.timeout = timeout
        self.duplicates = 0  # RabbitMQ cannot tell: always 0
        self._session: _Session | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls,
        *,
        url: str,
        exchange: str,
        queue: str | None,
        queue_type: QueueType = "classic",
        dead_letter_exchange: str,
        dead_letter_queue: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - the deadline of every later call, not just this one
    ) -> AmqpCoreQueue:
        """Connect and declare the exchanges and queues; `BackendError` if that fails in time.

        ``queue`` None declares no default queue (nothing is bound to the exchange then, so
        publishes fail as unroutable until some queue is bound).
        """
        self = cls(
            url=url,
            exchange=exchange,
            queue=queue,
            queue_type=queue_type,
            dead_letter_exchange=dead_letter_exchange,
            dead_letter_queue=dead_letter_queue,
            timeout=timeout,
        )
        async with self._guard("open"):
            await self._ready()
        return self

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        if not messages:
            return PublishOutcome(stored=0, duplicates=0)
        prepared = [(routing_key(m.topic), m.payload, _event_properties(m)) for m in messages]
        for key, _, _ in prepared:
            if len(key.encode("utf-8")) > _MAX_ROUTING_KEY_BYTES:
                raise BackendError(
                    f"amqp: routing key over {_MAX_ROUTING_KEY_BYTES} bytes: {key!r}"
                )
        async with self._guard(f"publish of {len(messages)} event(s)"):
            session = await self._ready()
            await _publish_all(session.raw, self.exchange, prepared)
        return PublishOutcome(stored=len(messages), duplicates=0)

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        if not messages:
            return
        prepared = [
            (dead_letter_routing_key(m.device_id), m.payload, _dead_letter_properties(m))
            for m in messages
        ]
        async with self._guard(f"dead letter of {len(messages)} event(s)"):
            session = await self._ready()
            await _publish_all(session.raw, self.dead_letter_exchange, prepared)

    async def probe(self) -> None:
        """Reconnect if needed, then one round trip on the channel (the exchange declared again,
        a no-op for the broker); `BackendError` if that fails within ``timeout``."""
        async with self._guard("probe"):
            session = await self._ready()
            await session.channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )

    async def aclose(self) -> None:
        """Close the connection (bounded by ``timeout``); later calls raise `BackendError`."""
        self._closed = True
        async with self._lock:
            session, self._session = self._session, None
        if session is not None:
            await self._close(session)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Run the body within ``timeout``; turn every broker failure into `BackendError`."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except BackendError:
            raise
        except aio_pika.exceptions.DeliveryError as exc:
            # Nack or returned message: the channel is still fine, nothing to reset.
            raise BackendError(f"amqp {what} not confirmed: {_describe(exc)}") from exc
        except TimeoutError as exc:
            await self._reset()
            raise BackendError(f"amqp {what}: no answer within {self.timeout:g}s") from exc
        except _ERRORS as exc:
            await self._reset()
            raise BackendError(f"amqp {what} failed: {exc!r}") from exc

    async def _ready(self) -> _Session:
        async with self._lock:
            if self._closed:
                raise BackendError("amqp core queue is closed")
            session = self._session
            if session is not None and session.usable:
                return session
            if session is not None:
                self._discard(session)
            self._session = None
            session = await self._connect()
            self._session = session
            return session

    async def _connect(self) -> _Session:
        connection = await aio_pika.connect(self.url, timeout=self.timeout)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead_letter_exchange = await channel.declare_exchange(
                self.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            arguments: dict[str, aio_pika.abc.FieldValue] = {"x-queue-type": self.queue_type}
            if self.queue is not None:
                queue = await channel.declare_queue(self.queue, durable=True, arguments=arguments)
                await queue.bind(exchange, "#")
            dead_letters = await channel.declare_queue(
                self.dead_letter_queue, durable=True, arguments=arguments
            )
            await dead_letters.bind(dead_letter_exchange, "#")
            raw = await channel.get_underlay_channel()
            if not isinstance(raw, aiormq.Channel):
                raise TypeError(f"aio-pika gave an unexpected channel type {type(raw)!r}")
        except BaseException:
            with suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await connection.close()
            raise
        return _Session(connection, channel, raw, exchange, dead_letter_exchange)

    async def _reset(self) -> None:
        """Drop the current session after a failure; the next call reconnects.

        The old connection is closed in the background: a dead peer never answers Close, and the
        failing call must not take longer than its deadline.
        """
        session, self._session = self._session, None
        if session is not None:
            self._discard(session)

    def _discard(self, session: _Session) -> None:
        task = asyncio.create_task(self._close(session), name="amqp-core-queue-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, session: _Session) -> None:
        # A dead peer never answers Close: bounded, and errors do not matter any more.
        with suppress(Exception):
            async with asyncio.timeout(min(self.timeout, 5.0)):
                await session.connection.close()


async def _publish_all(
    channel: aiormq.Channel,
    exchange: str,
    prepared: Sequence[tuple[str, bytes, Basic.Properties]],
) -> None:
    """Publish every message ``mandatory``, then await every confirm; raise the first failure
    (aiormq's `DeliveryError` for a nack, `PublishError` for a returned message, or the reason
    the channel closed).

    This is aiormq's ``Channel.basic_publish`` done once per batch instead of once per message:
    the same bookkeeping (a delivery tag and a confirmation future per message, registered in
    the channel's future store so that a closing channel fails them, and the message id that a
    ``basic.return`` is matched by), under the same channel lock, but the frames of up to
    `_FRAMES_PER_WRITE` messages are marshalled into one write. Per message, basic_publish
    costs a task, a lock, a write-queue item, a writer-loop turn and a ``send`` syscall; that
    was most of the sink's CPU per event with RabbitMQ (docs/benchmarks.md, "Sink").
    aiormq's write queue is bounded, so a slow socket still holds the batch back.
    """
    confirmations: list[asyncio.Future[object]] = []
    registered: list[tuple[str, int]] = []  # (message id, delivery tag), for basic.return
    try:
        async with channel.lock:
            queued_tag = channel.delivery_tag  # the last tag handed to the writer
            try:
                frames: list[FrameType | ContentHeader | ContentBody] = []
                for index, (key, body, properties) in enumerate(prepared):
                    if not properties.message_id:
                        properties.message_id = uuid.uuid4().hex  # returns are matched by it
                    channel.delivery_tag += 1
                    tag = channel.delivery_tag
                    confirmation = channel.create_future()
                    channel.confirmations[tag] = confirmation
                    channel.message_id_delivery_tag[properties.message_id] = tag
                    registered.append((properties.message_id, tag))
                    confirmations.append(confirmation)
                    frames.append(Basic.Publish(exchange=exchange, routing_key=key, mandatory=True))
                    frames.append(ContentHeader(properties=properties, body_size=len(body)))
                    step = channel.max_content_size
                    frames += [
                        ContentBody(body[at : at + step]) for at in range(0, len(body), step)
                    ]
                    if len(frames) >= 3 * _FRAMES_PER_WRITE or index == len(prepared) - 1:
                        await channel.write_queue.put(ChannelFrame.marshall(channel.number, frames))
                        queued_tag = channel.delivery_tag
                        frames = []
            except BaseException:
                # Whatever did not reach the writer gives its tags back, as basic_publish does,
                # so that the broker's numbering and ours stay the same; what did will be
                # confirmed (or fail with the channel) and must not be reused.
                for tag in range(queued_tag + 1, channel.delivery_tag + 1):
                    future = channel.confirmations.pop(tag, None)
                    if future is not None:
                        future.cancel()
                channel.delivery_tag = queued_tag
                raise
        await _all_done(confirmations)
    finally:
        # basic_publish forgets each message id with a callback per message; once per batch here.
        by_id = channel.message_id_delivery_tag
        for message_id, tag in registered:
            if by_id.get(message_id) == tag:
                del by_id[message_id]
    for confirmation in confirmations:
        if confirmation.cancelled():
            raise BackendError("amqp: a publish was cancelled before its confirm")
        failure = confirmation.exception()
        if failure is not None:
            raise failure


async def _all_done(futures: Sequence[asyncio.Future[object]]) -> None:
    """Wait until every future is done (like ``gather(..., return_exceptions=True)`` without a
    result list and a callback of its own per future)."""
    if not futures:
        return
    done = asyncio.get_running_loop().create_future()
    left = len(futures)

    def one_more(_: asyncio.Future[object]) -> None:
        nonlocal left
        left -= 1
        if not left and not done.done():
            done.set_result(None)

    for future in futures:
        future.add_done_callback(one_more)
    try:
        await done
    finally:
        for future in futures:
            future.remove_done_callback(one_more)


def _event_properties(m: CoreMessage) -> Basic.Properties:
    headers: dict[str, aio_pika.abc.FieldValue] = {
        "event-id": m.event_id,
        "device-id": m.device_id,
        "topic": m.topic,
        "received-at": m.received_at_ms,
        "qos": m.qos,
    }
    if m.seq is not None:
        headers["seq"] = m.seq
    if m.event_time_ms is not None:
        headers["event-time"] = m.event_time_ms
    return Basic.Properties(headers=headers, message_id=m.event_id, delivery_mode=_PERSISTENT)


def _dead_letter_properties(m: DeadLetterMessage) -> Basic.Properties:
    headers: dict[str, aio_pika.abc.FieldValue] = {
        "reason": m.reason,
        "device-id": m.device_id,
        "topic": m.topic,
        "received-at": m.received_at_ms,
    }
    # No message id of our own: aiormq then sets a random one, which it needs to match a
    # returned (unroutable) message to its publish.
    return Basic.Properties(headers=headers, delivery_mode=_PERSISTENT)


def _describe(exc: aio_pika.exceptions.DeliveryError) -> str:
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return f"returned as unroutable (mandatory): {exc}"
    return str(exc)
