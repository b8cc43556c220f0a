"""The shared RabbitMQ and NATS JetStream servers, with unique names per test and cleanup after it.

The project's machines run one RabbitMQ and one NATS server for every test (SPEC §9), so a test
never uses a fixed exchange, queue or stream name: the fixtures `rabbitmq` and `nats_jetstream`
hand out fresh names (``bridge-test-<8 hex>...``) and delete whatever was created under them at
teardown. They declare nothing themselves: the code under test (or the test) does that.

A broker that cannot be reached fails the test with the URL in the message; it is never a skip,
because a silently skipped integration suite is how a broken bridge ships.

Every network wait has a deadline. Connection settings come from ``BRIDGE_TEST_AMQP_URL`` and
``BRIDGE_TEST_NATS_URL``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Generic, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

__all__ = [
    "AMQP_URL_ENV",
    "NATS_URL_ENV",
    "MissingMessagesError",
    "NatsNames",
    "RabbitNames",
    "ReceivedMessage",
    "StreamMessage",
    "amqp_connection",
    "amqp_url",
    "drain_queue",
    "nats_connection",
    "nats_jetstream",
    "nats_names",
    "nats_url",
    "poll_until",
    "rabbit_names",
    "rabbitmq",
    "read_stream",
    "time_before",
]

AMQP_URL_ENV = "BRIDGE_TEST_AMQP_URL"
NATS_URL_ENV = "BRIDGE_TEST_NATS_URL"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

CONNECT_TIMEOUT = 10.0
"""Seconds to open a connection (TCP, AMQP/NATS handshake) before the test fails."""
REQUEST_TIMEOUT = 5.0
"""Seconds for one broker round trip (declare, delete, JetStream API request)."""
CLEANUP_TIMEOUT = 20.0
"""Seconds for a whole teardown, connecting included."""
_PREFETCH = 256
_NATS_FETCH_WAIT = 1.0


def amqp_url() -> str:
    """The RabbitMQ URL for tests: ``$BRIDGE_TEST_AMQP_URL``, else the loopback guest account."""
    return os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL


def nats_url() -> str:
    """The NATS URL for tests: ``$BRIDGE_TEST_NATS_URL``, else the loopback server."""
    return os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL


def _redact(url: str) -> str:
    """`url` without its password, for failure messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _fail_unreachable(what: str, url: str, env: str, error: Exception) -> NoReturn:
    pytest.fail(
        f"{what} at {_redact(url)} is unreachable: {error!r} "
        f"(set {env} or start it; integration tests fail, never skip, without their brokers)",
        pytrace=False,
    )


def _tag() -> str:
    return uuid.uuid4().hex[:8]


_M = TypeVar("_M")


class MissingMessagesError(AssertionError, Generic[_M]):
    """Fewer messages than expected arrived before the deadline.

    ``received`` holds the ones that did arrive (`ReceivedMessage` from `drain_queue`,
    `StreamMessage` from `read_stream`), so the assertion message shows what got through.
    """

    def __init__(
        self,
        source: str,
        *,
        expected: int,
        timeout: float,
        received: Sequence[_M],
    ) -> None:
        self.source = source
        self.expected = expected
        self.timeout = timeout
        self.received = tuple(received)
        super().__init__(
            f"{source}: expected {expected} message(s) within {timeout:g}s, "
            f"got {len(self.received)}: {list(self.received)!r}"
        )


# --- RabbitMQ ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RabbitNames:
    """Names no other test uses, for one test's RabbitMQ objects (nothing is declared).

    ``routing_prefix`` (``bt<tag>``) is a routing-key level (or device id) unique to the test, for
    tests that want unique keys as well as unique objects.
    """

    url: str
    tag: str
    exchange: str
    queue: str
    dead_letter_exchange: str
    dead_letter_queue: str
    routing_prefix: str

    @classmethod
    def new(cls, url: str | None = None) -> RabbitNames:
        """Fresh names on `url` (default `amqp_url()`)."""
        tag = _tag()
        base = f"bridge-test-{tag}"
        return cls(
            url=url or amqp_url(),
            tag=tag,
            exchange=f"{base}.events",
            queue=f"{base}.events",
            dead_letter_exchange=f"{base}.dead-letter",
            dead_letter_queue=f"{base}.dead-letter",
            routing_prefix=f"bt{tag}",
        )

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange name teardown deletes."""
        return (self.exchange, self.dead_letter_exchange)

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue name teardown deletes."""
        return (self.queue, self.dead_letter_queue)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message taken off a RabbitMQ queue by `drain_queue`."""

    body: bytes
    message_id: str | None
    headers: dict[str, object]
    routing_key: str
    delivery_mode: int | None = None
    """2 for a persistent message, 1 (or None) for a transient one."""


@asynccontextmanager
async def amqp_connection(url: str | None = None) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """An open aio-pika connection to `url` (default `amqp_url()`), closed on exit.

    Fails the test (``pytest.fail``, never a skip) when the broker cannot be reached or refuses the
    login within `CONNECT_TIMEOUT` seconds.
    """
    url = url or amqp_url()
    failure: Exception | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        failure = exc
    if failure is not None:
        # Outside the except block, so the report is this one line, not a chained traceback.
        _fail_unreachable("RabbitMQ", url, AMQP_URL_ENV, failure)
    try:
        yield connection
    finally:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await connection.close()


async def _delete_rabbit_objects(names: RabbitNames) -> None:
    async with amqp_connection(names.url) as connection:
        deletes = [
            *(partial(_delete_queue, queue) for queue in names.queues),
            *(partial(_delete_exchange, exchange) for exchange in names.exchanges),
        ]
        for delete in deletes:
            # A 404 closes the channel, so each delete gets its own. RabbitMQ answers delete-ok
            # for a missing object anyway; the except is for brokers that do not.
            channel = await connection.channel()
            try:
                await delete(channel)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()


async def _delete_queue(name: str, channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.queue_delete(name, timeout=REQUEST_TIMEOUT)


async def _delete_exchange(name: str, channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.exchange_delete(name, timeout=REQUEST_TIMEOUT)


@asynccontextmanager
async def rabbit_names(url: str | None = None) -> AsyncIterator[RabbitNames]:
    """Fresh `RabbitNames`; on exit, deletes every exchange and queue with those names.

    Checks on entry that the broker answers, so an unreachable broker fails the test before it
    starts (``pytest.fail``). Teardown ignores objects that were never declared and has
    `CLEANUP_TIMEOUT` seconds; it fails the test if the broker is gone by then.
    """
    names = RabbitNames.new(url)
    async with amqp_connection(names.url):
        pass
    try:
        yield names
    finally:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            await _delete_rabbit_objects(names)


@pytest_asyncio.fixture
async def rabbitmq() -> AsyncIterator[RabbitNames]:
    """Unique RabbitMQ names for this test, deleted afterwards (see `rabbit_names`)."""
    async with rabbit_names() as names:
        yield names


def time_before(end: float) -> bool:
    return asyncio.get_running_loop().time() < end


@asynccontextmanager
async def poll_until(end: float) -> AsyncIterator[None]:
    """Bound one poll of a reading loop by the loop's deadline `end` (event-loop time).

    A poll that outlives `end` ends the loop quietly; its caller then reports what is missing.
    The caller must also test `time_before(end)` on every turn: on Python 3.11, the
    ``asyncio.wait_for`` inside aio-pika's and nats-py's calls swallows a cancellation that lands
    just as the call completes, so the deadline's cancellation alone can be lost, and a loop
    relying on it polls an empty queue for ever (seen in CI).
    """
    try:
        async with asyncio.timeout_at(end) as deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise


def _received(message: aio_pika.abc.AbstractIncomingMessage) -> ReceivedMessage:
    return ReceivedMessage(
        body=message.body,
        message_id=message.message_id,
        headers=dict(message.headers),
        routing_key=message.routing_key or "",
        delivery_mode=int(message.delivery_mode) if message.delivery_mode is not None else None,
    )


async def drain_queue(
    url: str,
    queue: str,
    *,
    expected: int,
    # A parameter rather than the caller's asyncio.timeout: expiry means "missing messages", an
    # assertion listing what arrived, not a bare TimeoutError out of the middle of a get.
    timeout: float,
) -> list[ReceivedMessage]:
    """Take exactly `expected` messages off `queue`, in queue order, acking each.

    Waits up to `timeout` seconds for them (connecting has its own `CONNECT_TIMEOUT`). Messages
    beyond `expected` stay in the queue (delivered ahead under the prefetch, they are requeued
    unacknowledged when the channel closes). Raises `MissingMessagesError` (an
    ``AssertionError``) with the messages that did arrive when fewer come in time, and
    ``AssertionError`` when the queue does not exist; fails the test when the broker is
    unreachable.
    """
    received: list[ReceivedMessage] = []
    # A consumer with a prefetch window, not one basic.get round trip per message: 1,200
    # messages took ~10 s that way on a busy machine.
    prefetch = max(1, min(expected, _PREFETCH))
    arrived: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue(prefetch)
    async with amqp_connection(url) as connection:
        channel = await connection.channel()
        try:
            try:
                amqp_queue = await channel.declare_queue(
                    queue, passive=True, timeout=REQUEST_TIMEOUT
                )
            except aio_pika.exceptions.ChannelNotFoundEntity:
                raise AssertionError(f"RabbitMQ queue {queue!r} does not exist") from None
            await channel.set_qos(prefetch_count=prefetch, timeout=REQUEST_TIMEOUT)
            await amqp_queue.consume(arrived.put, no_ack=False, timeout=REQUEST_TIMEOUT)
            end = asyncio.get_running_loop().time() + timeout
            while len(received) < expected and time_before(end):
                try:
                    async with asyncio.timeout_at(end):
                        message = await arrived.get()
                except TimeoutError:
                    break
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await message.ack()
                received.append(_received(message))
            if len(received) < expected:
                raise MissingMessagesError(
                    f"RabbitMQ queue {queue!r}",
                    expected=expected,
                    timeout=timeout,
                    received=received,
                )
        finally:
            if not channel.is_closed:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await channel.close()
    return received


# --- NATS JetStream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsNames:
    """Names no other test uses, for one test's JetStream streams (nothing is created).

    The main stream is meant to hold ``<subject_prefix>.>`` and the dead-letter stream
    ``<dead_letter_subject_prefix>.>``; the two prefixes differ in their first token, so the
    streams' subjects never overlap.
    """

    url: str
    tag: str
    stream: str
    subject_prefix: str
    dead_letter_stream: str
    dead_letter_subject_prefix: str

    @classmethod
    def new(cls, url: str | None = None) -> NatsNames:
        """Fresh names on `url` (default `nats_url()`)."""
        tag = _tag()
        return cls(
            url=url or nats_url(),
            tag=tag,
            stream=f"bridge-test-{tag}",
            subject_prefix=f"bt{tag}",
            dead_letter_stream=f"bridge-test-{tag}-dead-letter",
            dead_letter_subject_prefix=f"bt{tag}-dlq",
        )

    @property
    def subjects(self) -> str:
        """The main stream's subject filter, ``<subject_prefix>.>``."""
        return f"{self.subject_prefix}.>"

    @property
    def dead_letter_subjects(self) -> str:
        """The dead-letter stream's subject filter, ``<dead_letter_subject_prefix>.>``."""
        return f"{self.dead_letter_subject_prefix}.>"

    @property
    def streams(self) -> tuple[str, ...]:
        """Every stream name teardown deletes."""
        return (self.stream, self.dead_letter_stream)


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message read from a JetStream stream by `read_stream`.

    ``headers`` holds every stored header, ``Nats-Msg-Id`` included.
    """

    body: bytes
    subject: str
    headers: dict[str, str]
    stream_sequence: int

    @property
    def msg_id(self) -> str | None:
        """The ``Nats-Msg-Id`` header (the event id), if any."""
        return self.headers.get("Nats-Msg-Id")


@asynccontextmanager
async def nats_connection(url: str | None = None) -> AsyncIterator[NatsClient]:
    """A connected nats-py client for `url` (default `nats_url()`), closed on exit.

    It does not reconnect: a test that loses the server should see it. Fails the test
    (``pytest.fail``, never a skip) when the server cannot be reached within `CONNECT_TIMEOUT`.
    """
    url = url or nats_url()
    client = NatsClient()
    last_error: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        # Kept for the failure message; nats-py would otherwise log every attempt at ERROR.
        last_error[:] = [exc]

    failure: Exception | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await client.connect(
                url,
                error_cb=on_error,
                connect_timeout=int(CONNECT_TIMEOUT),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
            )
    except (OSError, nats.errors.Error) as exc:
        failure = last_error[0] if last_error else exc
    if failure is not None:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await client.close()
        _fail_unreachable("NATS", url, NATS_URL_ENV, failure)
    try:
        yield client
    finally:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await client.close()


async def _delete_streams(names: NatsNames) -> None:
    async with nats_connection(names.url) as client:
        jsm = client.jsm(timeout=REQUEST_TIMEOUT)
        for stream in names.streams:
            with suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(stream)


@asynccontextmanager
async def nats_names(url: str | None = None) -> AsyncIterator[NatsNames]:
    """Fresh `NatsNames`; on exit, deletes both streams if they exist.

    Checks on entry that the server answers (``pytest.fail`` otherwise). Teardown has
    `CLEANUP_TIMEOUT` seconds and fails the test if the server is gone by then.
    """
    names = NatsNames.new(url)
    async with nats_connection(names.url):
        pass
    try:
        yield names
    finally:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            await _delete_streams(names)


@pytest_asyncio.fixture
async def nats_jetstream() -> AsyncIterator[NatsNames]:
    """Unique JetStream names for this test, streams deleted afterwards (see `nats_names`)."""
    async with nats_names() as names:
        yield names


def _stream_message(msg: Msg) -> StreamMessage:
    return StreamMessage(
        body=msg.data,
        subject=msg.subject,
        headers=dict(msg.headers or {}),
        stream_sequence=msg.metadata.sequence.stream,
    )


async def read_stream(
    url: str,
    stream: str,
    *,
    expected: int,
    timeout: float,
) -> list[StreamMessage]:
    """The first `expected` messages of `stream`, in sequence order, without consuming them.

    Reads through an ephemeral pull consumer that never acks, so the stream is left as it was
    whatever its retention policy; the consumer is deleted afterwards (and expires by itself if
    that fails). Waits up to `timeout` seconds for the messages (connecting has its own
    `CONNECT_TIMEOUT`). Raises `MissingMessagesError` (an ``AssertionError``) with what did
    arrive when fewer come in time, ``AssertionError`` when the stream does not exist; fails the
    test when the server is unreachable.
    """
    received: list[StreamMessage] = []
    if expected <= 0:
        return received
    consumer = f"bridge-test-reader-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=consumer,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        # Never acked: no redelivery while we read, no cap on messages in flight.
        ack_wait=timeout + 60.0,
        max_ack_pending=-1,
        inactive_threshold=timeout + 60.0,
        mem_storage=True,
    )
    async with nats_connection(url) as client:
        js = client.jetstream(timeout=REQUEST_TIMEOUT)
        try:
            await js.add_consumer(stream, config=config, timeout=REQUEST_TIMEOUT)
        except nats.js.errors.NotFoundError:
            raise AssertionError(f"JetStream stream {stream!r} does not exist") from None
        subscription = await js.pull_subscribe_bind(consumer=consumer, stream=stream)
        try:
            end = asyncio.get_running_loop().time() + timeout
            while len(received) < expected and time_before(end):
                batch: list[Msg] = []
                try:
                    async with poll_until(end):
                        batch = await subscription.fetch(
                            expected - len(received), timeout=_NATS_FETCH_WAIT
                        )
                except nats.errors.TimeoutError:
                    continue
                received.extend(_stream_message(msg) for msg in batch)
            if len(received) < expected:
                raise MissingMessagesError(
                    f"JetStream stream {stream!r}",
                    expected=expected,
                    timeout=timeout,
                    received=received,
                )
        finally:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await subscription.unsubscribe()
                with suppress(nats.js.errors.NotFoundError):
                    await js.delete_consumer(stream, consumer)
    return received
