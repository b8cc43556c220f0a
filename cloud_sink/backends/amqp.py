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

aio-pika sets the topology up; batches are published on its underlying aiormq channel by a
`BatchPublisher` (amqp_publisher.py: one write per 256 messages, one confirmation future per
batch), events with content headers written by amqp_wire.py instead of pamqp's generic
marshalling. aiormq's per-message publish was most of the sink's CPU per event with RabbitMQ
(docs/benchmarks.md, "Sink").
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
import aiormq.connection
import pamqp.exceptions
from pamqp.commands import Basic
from yarl import URL

from cloud_sink.backends.amqp_publisher import BatchPublisher, Outgoing
from cloud_sink.backends.amqp_wire import MAX_SHORT_STRING_BYTES, event_properties
from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage, PublishOutcome

__all__ = ["AmqpCoreQueue", "QueueType", "dead_letter_routing_key", "routing_key"]

QueueType = Literal["classic", "quorum"]

_MAX_ROUTING_KEY_BYTES = MAX_SHORT_STRING_BYTES
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024**2
"""RabbitMQ 4's default ``max_message_size`` (3.x: 128 MiB)."""
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
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


class _Sockets(aiormq.TransportFactory):
    """aiormq's transport factory for the URL's scheme, keeping the stream it opened in reach
    (`abort`)."""

    def __init__(self, tls: bool) -> None:
        self._factory: aiormq.TransportFactory = (
            aiormq.connection.TLSTransportFactory()
            if tls
            else aiormq.connection.TCPTransportFactory()
        )
        self._writer: asyncio.StreamWriter | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._factory.create(url, **kwargs)
        self._writer = writer
        return reader, writer

    def abort(self) -> None:
        """Drop the socket at once, unsent bytes and all (no-op if none was opened): with a
        reset, so that the kernel does not keep the orphaned socket and its unsent bytes either
        (a plain close leaves them trying to reach a peer that reads nothing)."""
        if self._writer is None:
            return
        transport = self._writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


class _Connection(aio_pika.Connection):
    """aio-pika's connection, with its socket in reach: `_close_connection` aborts it when a
    graceful close overruns its deadline."""

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.sockets = _Sockets(tls=self.url.scheme == "amqps")
        # Passed down to aiormq's Connection as it is (aio-pika's own keyword parsing drops it).
        self.kwargs["transport_factory"] = self.sockets


async def _close_connection(connection: aio_pika.abc.AbstractConnection, seconds: float) -> None:
    """Close ``connection`` within about ``seconds``; errors do not matter any more.

    A dead or blocked peer (RabbitMQ stops reading a publishing connection under a resource
    alarm, and still sends heartbeats) never answers Close, and aiormq waits for the unsent
    bytes to drain before it lets the socket go, up to its heartbeat grace (minutes), without
    ending that wait when cancelled: a deadline around the close passed, and the socket stayed
    open with the batch it held, one more for each publish timeout and probe of a long alarm
    (and closing the queue, the sink's stop, waited as long). Past the deadline the socket is
    aborted, which ends aiormq's wait."""
    closing = asyncio.ensure_future(connection.close())
    try:
        await asyncio.wait([closing], timeout=seconds)
    finally:
        if not closing.done():
            if isinstance(connection, _Connection):
                connection.sockets.abort()
            await asyncio.wait([closing], timeout=1.0)
            if not closing.done():
                closing.cancel()
        if closing.done() and not closing.cancelled():
            closing.exception()  # retrieved: it does not matter any more


@dataclass(frozen=True, slots=True)
class _Session:
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    # Publishes on aio-pika's underlying aiormq channel, bypassing aio-pika and aiormq.
    publisher: BatchPublisher
    exchange: aio_pika.abc.AbstractExchange
    dead_letter_exchange: aio_pika.abc.AbstractExchange

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed


@dataclass(slots=True)
class _Call:
    """The session one call uses, once it has one (`AmqpCoreQueue._guard`)."""

    session: _Session | None = None


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
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
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
        self.max_message_size = max_message_size
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
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
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
            max_message_size=max_message_size,
            timeout=timeout,
        )
        async with self._guard("open") as call:
            call.session = await self._ready()
        return self

    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        # RabbitMQ closes the channel on a body over its max_message_size (headers do not
        # count), which fails every message of the batch, at each resend.
        if len(message.payload) > self.max_message_size:
            return (
                f"{len(message.payload)} bytes, over RabbitMQ's max_message_size"
                f" ({self.max_message_size}, [backend] max_message_size)"
            )
        # A dead letter's routing key is made from the device id (cut to 255 bytes), its
        # message id is kept short, and its headers are long strings: it fits. An event's
        # routing key is its topic (as long), its message id its event id: each an AMQP short
        # string. (A UTF-8 character is at most 4 bytes: short names are not encoded to be
        # measured.)
        if isinstance(message, DeadLetterMessage):
            return None
        limit = _MAX_ROUTING_KEY_BYTES
        if len(message.topic) * 4 > limit and len(message.topic.encode()) > limit:
            return (
                f"topic of {len(message.topic.encode())} bytes: an AMQP routing key holds {limit}"
            )
        if len(message.event_id) * 4 > limit and len(message.event_id.encode()) > limit:
            return f"event id over {limit} bytes: an AMQP message id holds {limit}"
        return None

    async def recheck_limits(self) -> bool:
        return False  # max_message_size is the sink's own setting

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        if not messages:
            return PublishOutcome(stored=0, duplicates=0)
        try:
            prepared = [_event(m) for m in messages]
        except ValueError as exc:  # nothing sent: the session is fine
            raise BackendError(f"amqp: cannot encode an event: {exc}") from exc
        for key in {m.routing_key for m in prepared}:
            if len(key.encode("utf-8")) > _MAX_ROUTING_KEY_BYTES:
                raise BackendError(
                    f"amqp: routing key over {_MAX_ROUTING_KEY_BYTES} bytes: {key!r}"
                )
        async with self._guard(f"publish of {len(messages)} event(s)") as call:
            session = call.session = await self._ready()
            await session.publisher.publish(self.exchange, prepared)
        return PublishOutcome(stored=len(messages), duplicates=0)

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        if not messages:
            return
        prepared = [_dead_letter(m) for m in messages]
        async with self._guard(f"dead letter of {len(messages)} event(s)") as call:
            session = call.session = await self._ready()
            await session.publisher.publish(self.dead_letter_exchange, prepared)

    async def probe(self) -> None:
        """Reconnect if needed, then declare the exchanges, queues and bindings again (no-ops
        for the broker while they exist); `BackendError` if that fails within ``timeout``.

        Declaring only the exchange passed while a deleted queue made every publish come back
        unroutable: the sink flapped between outage and recovery for ever."""
        async with self._guard("probe") as call:
            session = call.session = await self._ready()
            await self._declare(session.channel)

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
    async def _guard(self, what: str) -> AsyncIterator[_Call]:
        """Run the body within ``timeout``; turn every broker failure into `BackendError`. The
        body names the session it uses in the `_Call`: a failure drops that one."""
        call = _Call()
        try:
            async with asyncio.timeout(self.timeout):
                yield call
        except BackendError:
            raise
        except aio_pika.exceptions.DeliveryError as exc:
            # Nack or returned message: the channel is still fine, nothing to reset.
            raise BackendError(f"amqp {what} not confirmed: {_describe(exc)}") from exc
        except TimeoutError as exc:
            self._reset(call.session)
            raise BackendError(f"amqp {what}: no answer within {self.timeout:g}s") from exc
        except _ERRORS as exc:
            self._reset(call.session)
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
        connection = await aio_pika.connect(
            self.url, timeout=self.timeout, connection_class=_Connection
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange, dead_letter_exchange = await self._declare(channel)
            raw = await channel.get_underlay_channel()
            if not isinstance(raw, aiormq.Channel):
                raise TypeError(f"aio-pika gave an unexpected channel type {type(raw)!r}")
        except BaseException:
            await _close_connection(connection, self.timeout)
            raise
        return _Session(connection, channel, BatchPublisher(raw), exchange, dead_letter_exchange)

    async def _declare(
        self, channel: aio_pika.abc.AbstractChannel
    ) -> tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractExchange]:
        """The exchanges, the queues and their bindings (each a no-op if it exists as asked)."""
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
        return exchange, dead_letter_exchange

    def _reset(self, session: _Session | None) -> None:
        """Drop ``session``, which a call failed on, if it is still the current one; the next
        call reconnects. (Dropping whichever was current, a call that failed late on an old
        session, after another had connected again, dropped the new one that worked, and
        whatever was in flight on it.) None: the call failed before it had one (connecting,
        or waiting for the call that connects).

        The old connection is closed in the background: a dead peer never answers Close, and the
        failing call must not take longer than its deadline.
        """
        if session is not None and session is self._session:
            self._session = None
            self._discard(session)

    def _discard(self, session: _Session) -> None:
        task = asyncio.create_task(self._close(session), name="amqp-core-queue-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, session: _Session) -> None:
        await _close_connection(session.connection, min(self.timeout, 5.0))


def _event(m: CoreMessage) -> Outgoing:
    """``ValueError`` if the event cannot be encoded (an event id over 255 bytes)."""
    # Every message needs an id: a returned (unroutable) one is matched to its batch by it.
    message_id = m.event_id or uuid.uuid4().hex
    return Outgoing(routing_key(m.topic), event_properties(m, message_id), m.payload, message_id)


def _dead_letter(m: DeadLetterMessage) -> Outgoing:
    headers: dict[str, aio_pika.abc.FieldValue] = {
        "reason": m.reason,
        "device-id": m.device_id,
        "topic": m.topic,
        "received-at": m.received_at_ms,
    }
    # The letter id: consumers dedupe a resent letter by it, as they do events. One too long for
    # a short string (a letter may be there because its event id is) is replaced by its digest.
    message_id = m.letter_id
    limit = MAX_SHORT_STRING_BYTES
    if len(message_id) * 4 > limit and len(message_id.encode()) > limit:
        message_id = hashlib.sha256(message_id.encode()).hexdigest()
    properties = Basic.Properties(headers=headers, message_id=message_id, delivery_mode=_PERSISTENT)
    key = dead_letter_routing_key(m.device_id)
    return Outgoing(key, properties.marshal(), m.payload, message_id)


def _describe(exc: aio_pika.exceptions.DeliveryError) -> str:
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return f"returned as unroutable (mandatory): {exc}"
    return str(exc)
