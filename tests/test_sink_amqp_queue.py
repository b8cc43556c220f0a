"""The RabbitMQ core queue on the shared broker: confirmed means routed to a durable queue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import aiormq
import aiormq.exceptions
import pytest
from aio_pika.abc import FieldValue
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from cloud_sink.backends.amqp import AmqpCoreQueue, QueueType, dead_letter_routing_key
from cloud_sink.backends.amqp_publisher import BatchPublisher, Outgoing
from cloud_sink.backends.amqp_wire import event_properties, publish_frames, publish_method
from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage, PublishOutcome
from cloud_sink.forward import Forwarder
from mqtt_ingest import Counters, Identity, IngestEvent
from tests.harness.brokers import RabbitNames, amqp_connection, drain_queue
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.sink import core_message

DRAIN_TIMEOUT = 10.0
SHORT_TIMEOUT = 1.5


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


def via(url: str, port: int) -> str:
    """`url` pointed at 127.0.0.1:`port` (a proxy or a dead port)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_batch_arrives_in_order_with_id_headers_and_persistence(
    rabbitmq: RabbitNames,
) -> None:
    batch = [message(rabbitmq, seq) for seq in range(1, 21)]
    raw = CoreMessage(f"sink-{rabbitmq.tag}", "raw-dev", "devices/raw-dev/x/y", b"\x00raw", 0, 7)
    async with core_queue(rabbitmq) as queue:
        outcome = await queue.publish(batch)
        assert (outcome.stored, outcome.duplicates) == (20, 0)
        # A resent event is published again: RabbitMQ cannot dedupe, consumers use message_id.
        again = await queue.publish([batch[0], raw])
        assert (again.stored, again.duplicates) == (2, 0)
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=22, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received[:20]] == [m.payload for m in batch]
    first = received[0]
    device = batch[0].device_id
    assert first.message_id == batch[0].event_id
    assert first.routing_key == f"devices.{device}.t"
    assert first.delivery_mode == 2
    assert first.headers == {
        "event-id": batch[0].event_id,
        "device-id": device,
        "topic": f"devices/{device}/t",
        "seq": 1,
        "event-time": 1_699_999_999_001,
        "received-at": 1_700_000_000_001,
        "qos": 1,
    }
    assert received[20].message_id == batch[0].event_id
    last = received[21]
    assert (last.body, last.message_id, last.routing_key) == (
        raw.payload,
        raw.event_id,
        "devices.raw-dev.x.y",
    )
    assert last.headers == {
        "event-id": raw.event_id,
        "device-id": "raw-dev",
        "topic": "devices/raw-dev/x/y",
        "received-at": 7,
        "qos": 0,
    }
    assert all(r.delivery_mode == 2 for r in received)


async def test_batch_over_several_writes_arrives_whole_and_in_order(
    rabbitmq: RabbitNames,
) -> None:
    # More messages than one write of the batch publisher holds.
    batch = [message(rabbitmq, seq) for seq in range(1, 1201)]
    async with core_queue(rabbitmq) as queue:
        outcome = await queue.publish(batch)
    assert outcome.stored == 1200  # confirmed by RabbitMQ: what follows only reads them back
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1200, timeout=60)
    assert [r.body for r in received] == [m.payload for m in batch]


async def test_large_body_is_split_into_frames(rabbitmq: RabbitNames) -> None:
    body = bytes(range(256)) * 2000  # 512 kB: several content-body frames
    base = message(rabbitmq, 1)
    big = CoreMessage(
        event_id=base.event_id,
        device_id=base.device_id,
        topic=base.topic,
        payload=body,
        qos=base.qos,
        received_at_ms=base.received_at_ms,
        seq=base.seq,
        event_time_ms=base.event_time_ms,
    )
    async with core_queue(rabbitmq) as queue:
        await queue.publish([big, message(rabbitmq, 2)])
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [body, b"p2"]


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


async def test_unroutable_publish_raises_then_recovers_once_bound(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue=None) as queue:
        with pytest.raises(BackendError, match="unroutable"):
            await queue.publish([message(rabbitmq, 1), message(rabbitmq, 2)])
        # Bind a queue by hand: the same queue object publishes fine afterwards.
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            bound = await channel.declare_queue(rabbitmq.queue, durable=True)
            await bound.bind(rabbitmq.exchange, "#")
            await channel.close()
        outcome = await queue.publish([message(rabbitmq, 3)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]


async def test_a_queue_deleted_under_the_sink_is_declared_again(rabbitmq: RabbitNames) -> None:
    """Every publish came back unroutable while the probe (the exchange declared again) passed:
    the sink flapped between outage and recovery for ever. The probe now declares the queues and
    bindings again, as at start."""
    async with core_queue(rabbitmq) as queue:
        assert (await queue.publish([message(rabbitmq, 1)])).stored == 1
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(rabbitmq.queue)
            await channel.close()
        with pytest.raises(BackendError, match="unroutable"):
            await queue.publish([message(rabbitmq, 2)])
        await queue.probe()
        assert (await queue.publish([message(rabbitmq, 3)])).stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]  # 1 went with the deleted queue, 2 came back


async def test_dead_letters_land_in_their_queue_with_reason(rabbitmq: RabbitNames) -> None:
    device = f"{rabbitmq.routing_prefix}-dev"
    letters = [
        DeadLetterMessage(
            device, f"devices/{device}/a.b", b"\x00bad", "topic level 'a.b'", 5, f"{device}/e/1"
        ),
        DeadLetterMessage(
            "we.ird *#id", "devices/x", b"{", "malformed envelope", 6, "we.ird *#id/e/2"
        ),
        DeadLetterMessage(device, "devices/x", b"long", "event id too long", 7, "é" * 200),
    ]
    async with core_queue(rabbitmq) as queue:
        await queue.dead_letter(letters)
    received = await drain_queue(
        rabbitmq.url, rabbitmq.dead_letter_queue, expected=3, timeout=DRAIN_TIMEOUT
    )
    assert [r.body for r in received] == [b"\x00bad", b"{", b"long"]
    assert [r.routing_key for r in received] == [device, "we_ird___id", device]
    # Consumers dedupe a resent letter by its message id; one too long for it is its digest.
    assert [r.message_id for r in received] == [
        f"{device}/e/1",
        "we.ird *#id/e/2",
        hashlib.sha256(("é" * 200).encode()).hexdigest(),
    ]
    assert received[0].headers == {
        "reason": "topic level 'a.b'",
        "device-id": device,
        "topic": f"devices/{device}/a.b",
        "received-at": 5,
    }
    assert received[1].headers["reason"] == "malformed envelope"
    assert received[1].headers["device-id"] == "we.ird *#id"
    assert all(r.delivery_mode == 2 for r in received)
    # Nothing reached the event queue.
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        events = await channel.declare_queue(rabbitmq.queue, passive=True)
        assert events.declaration_result.message_count == 0
        await channel.close()


async def test_an_event_over_max_message_size_is_refused_alone(rabbitmq: RabbitNames) -> None:
    """RabbitMQ closes the channel on a body over its ``max_message_size``: one such event failed
    the whole stage call, other devices' events included, at every resend. It is refused alone
    now (not acknowledged; too large for the dead letters too), the rest is stored. The limit is
    the body's, headers aside, as RabbitMQ counts it (checked against RabbitMQ 3.10 by lowering
    its limit)."""
    identity = Identity("dev-1", {})
    events = [
        IngestEvent(identity, "dev-1", "devices/dev-1/t", b"s" * size, 1, False, 1.0)
        for size in (4096, 4097, 10)
    ]
    async with core_queue(rabbitmq, max_message_size=4096) as queue:
        forwarder = Forwarder(queue, Counters(), max_body=1024**2)
        refused = await forwarder.store(events)
    assert refused is not None
    assert [None if r is None else str(r) for r in refused] == [
        None,
        "4097 bytes, over RabbitMQ's max_message_size (4096, [backend] max_message_size)"
        " (nor as a dead letter: 4097 bytes, over RabbitMQ's max_message_size (4096, [backend]"
        " max_message_size))",
        None,
    ]
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [len(r.body) for r in received] == [4096, 10]


def test_dead_letter_routing_key_is_one_safe_word() -> None:
    assert dead_letter_routing_key("dev-1") == "dev-1"
    assert dead_letter_routing_key("") == "_"
    assert dead_letter_routing_key("a/b.c*d#e>f g\x00") == "a_b_c_d_e_f_g_"
    assert len(dead_letter_routing_key("é" * 300).encode()) <= 255


async def test_quorum_queue(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue_type="quorum") as queue:
        await queue.publish([message(rabbitmq, seq) for seq in range(1, 6)])
        await queue.dead_letter([DeadLetterMessage("d", "t", b"x", "r", 1, "d/e/1")])
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(
            rabbitmq.queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        assert declared.declaration_result.message_count == 5
        await channel.close()
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=5, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p1", b"p2", b"p3", b"p4", b"p5"]


async def test_conflicting_queue_type_fails_open(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq, queue_type="classic"):
        pass
    with pytest.raises(BackendError, match=r"PRECONDITION_FAILED|inequivalent"):
        async with core_queue(rabbitmq, queue_type="quorum"):
            pass


async def test_unreachable_url_fails_within_timeout(rabbitmq: RabbitNames) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError):
        async with core_queue(rabbitmq, url=via(rabbitmq.url, free_port()), timeout=SHORT_TIMEOUT):
            pass
    assert time.monotonic() - started < SHORT_TIMEOUT + 1.0


async def test_silent_server_fails_open_within_timeout(rabbitmq: RabbitNames) -> None:
    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(ignore, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="no answer"):
            async with core_queue(rabbitmq, url=via(rabbitmq.url, port), timeout=SHORT_TIMEOUT):
                pass
        assert time.monotonic() - started < SHORT_TIMEOUT + 1.0
    finally:
        server.close()
        await server.wait_closed()


async def test_lost_connection_raises_then_reconnects(
    rabbitmq: RabbitNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    host, port = urlsplit(rabbitmq.url).hostname or "127.0.0.1", urlsplit(rabbitmq.url).port
    proxy = await chaos_proxy_factory(host, port or 5672)
    url = via(rabbitmq.url, proxy.port)
    async with core_queue(rabbitmq, url=url, timeout=SHORT_TIMEOUT) as queue:
        await queue.publish([message(rabbitmq, 1)])

        # A silent cut: no confirm ever comes, the publish gives up at the deadline.
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(BackendError):
            await queue.publish([message(rabbitmq, 2)])
        assert time.monotonic() - started < 2 * SHORT_TIMEOUT + 1.0

        # A reset connection, and new connections refused while it lasts.
        await proxy.reset()
        started = time.monotonic()
        with pytest.raises(BackendError):
            await queue.publish([message(rabbitmq, 3)])
        assert time.monotonic() - started < 2 * SHORT_TIMEOUT + 1.0

        # The path is back: the next publish opens a new connection.
        proxy.pass_through()
        await queue.publish([message(rabbitmq, 4)])

    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        events = await channel.declare_queue(rabbitmq.queue, passive=True)
        count = events.declaration_result.message_count
        await channel.close()
    received = await drain_queue(
        rabbitmq.url, rabbitmq.queue, expected=count or 0, timeout=DRAIN_TIMEOUT
    )
    # 2 and 3 may or may not have reached the broker before the cut (then the sink resends them);
    # 1 and 4 were confirmed.
    bodies = [r.body for r in received]
    assert bodies[0] == b"p1"
    assert bodies[-1] == b"p4"


async def test_a_call_failing_on_an_old_connection_keeps_the_new_one(
    rabbitmq: RabbitNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """Two publishes wait on a connection that went silent; the first times out and drops it,
    and a probe connects again. When the second then times out, it must drop its own, old
    connection: it dropped whichever was current, the new one that works, failing whatever was
    in flight on it. The first connection goes through one proxy (blackholed), later ones
    through another (fine), so that the new connections can be counted."""
    host, port = urlsplit(rabbitmq.url).hostname or "127.0.0.1", urlsplit(rabbitmq.url).port
    silent = await chaos_proxy_factory(host, port or 5672)
    fine = await chaos_proxy_factory(host, port or 5672)
    timeout = 2.0
    async with core_queue(rabbitmq, url=via(rabbitmq.url, silent.port), timeout=timeout) as queue:
        await queue.publish([message(rabbitmq, 1)])
        silent.blackhole()
        queue.url = via(rabbitmq.url, fine.port)  # where the next connection goes
        first = asyncio.create_task(queue.publish([message(rabbitmq, 2)]))
        await asyncio.sleep(timeout / 2)
        second = asyncio.create_task(queue.publish([message(rabbitmq, 3)]))
        with pytest.raises(BackendError, match="no answer"):
            await first
        await queue.probe()  # a new connection
        assert not second.done()
        with pytest.raises(BackendError, match="no answer"):
            await second
        assert (await queue.publish([message(rabbitmq, 4)])).stored == 1
        assert fine.stats.accepted == 1  # the new connection was kept


def client_sockets_to(port: int) -> int:
    """This machine's TCP sockets connected to loopback ``port`` (client ends, any state but
    TIME_WAIT and CLOSE, listeners aside): what a connection the sink dropped still holds."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if int(remote.rpartition(":")[2], 16) == port and state not in ("06", "07", "0A"):
                    count += 1
    return count


async def test_a_dropped_connection_with_unsent_bytes_is_closed_within_its_bound(
    rabbitmq: RabbitNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """The broker stops reading mid-batch (as RabbitMQ does to a publishing connection under a
    memory or disk alarm, while it still sends heartbeats): the publish times out and the
    session is dropped. Its close must end within its bound and let the socket go, unsent batch
    and all. A graceful close waited for those bytes to drain, the cancellation of its deadline
    swallowed inside aiormq: the socket and its batch stayed for minutes (aiormq's heartbeat
    grace), one more for each publish and probe cycle of a long alarm, and closing the queue
    (the sink's stop) hung as long."""
    host, port = urlsplit(rabbitmq.url).hostname or "127.0.0.1", urlsplit(rabbitmq.url).port
    silent = await chaos_proxy_factory(host, port or 5672)
    fine = await chaos_proxy_factory(host, port or 5672)
    timeout = 2.0
    body = b"x" * 10_000
    batch = [message(rabbitmq, n)._replace(payload=body) for n in range(2, 2_002)]
    queue = await AmqpCoreQueue.open(
        url=via(rabbitmq.url, silent.port),
        exchange=rabbitmq.exchange,
        queue=rabbitmq.queue,
        queue_type="classic",
        dead_letter_exchange=rabbitmq.dead_letter_exchange,
        dead_letter_queue=rabbitmq.dead_letter_queue,
        timeout=timeout,
    )
    try:
        await queue.publish([message(rabbitmq, 1)])
        assert client_sockets_to(silent.port) == 1
        silent.blackhole(direction=Direction.UPSTREAM)  # the broker reads nothing more
        queue.url = via(rabbitmq.url, fine.port)
        with pytest.raises(BackendError, match="no answer"):
            await queue.publish(batch)  # 20 MB: most of it still unsent
        await queue.probe()  # connected again, through the other proxy
        bound = min(timeout, 5.0) + 2.0  # the close's own bound, and slack for a loaded machine
        deadline = time.monotonic() + bound
        while client_sockets_to(silent.port) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert client_sockets_to(silent.port) == 0, "the dropped connection's socket is still open"
    finally:
        started = time.monotonic()
        await queue.aclose()
        closed_in = time.monotonic() - started
    assert closed_in < timeout + 2.0, f"closing the queue took {closed_in:.1f}s"


async def test_closed_queue_raises(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq) as queue:
        pass
    with pytest.raises(BackendError, match="closed"):
        await queue.publish([message(rabbitmq, 1)])
    with pytest.raises(BackendError, match="closed"):
        await queue.dead_letter([DeadLetterMessage("d", "t", b"x", "r", 1, "d/e/1")])


# -- the hand-written publish frames: byte for byte what pamqp writes ---------------------------

_INTEGERS = [0, 1, -1, 127, 128, -128, -129, 32_767, 32_768, -32_768, -32_769, 65_535, 65_536]
_INTEGERS += [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]
_INTEGERS += [1_700_000_000_000]


def pamqp_properties(m: CoreMessage, message_id: str) -> Basic.Properties:
    """The properties the backend gave pamqp before it wrote its own (and a consumer reads)."""
    headers: dict[str, FieldValue] = {
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
    return Basic.Properties(headers=headers, message_id=message_id, delivery_mode=2)


@pytest.mark.parametrize("value", _INTEGERS)
@pytest.mark.parametrize("optional", ["absent", "seq", "event-time", "both"])
def test_event_properties_are_pamqps_bytes(value: int, optional: str) -> None:
    m = CoreMessage(
        event_id=f"dév-ü/epoch/{value}",
        device_id="dév-ü" * 40,  # non-ASCII, table strings over 255 bytes
        topic="devices/dév-ü/" + "level/" * 60,
        payload=b"x",
        qos=value if optional == "absent" else 1,
        received_at_ms=value,
        seq=value if optional in ("seq", "both") else None,
        event_time_ms=value if optional in ("event-time", "both") else None,
    )
    ours = event_properties(m, m.event_id)
    assert ours == pamqp_properties(m, m.event_id).marshal()
    # and a consumer reads back what it always did
    decoded = Basic.Properties()
    decoded.unmarshal(int.from_bytes(ours[:2], "big"), ours[2:])
    assert decoded == pamqp_properties(m, m.event_id)


def test_event_properties_refuse_what_pamqp_refuses() -> None:
    m = core_message(1)
    with pytest.raises(ValueError, match="message id"):
        event_properties(m, "é" * 128)  # 256 bytes
    assert event_properties(m, "é" * 127 + "e") == pamqp_properties(m, "é" * 127 + "e").marshal()
    with pytest.raises(ValueError, match="empty"):
        event_properties(m, "")
    with pytest.raises(ValueError, match="out of range"):
        event_properties(m._replace(seq=2**63), m.event_id)


@pytest.mark.parametrize("size", [0, 1, 200, 131_063, 131_064, 131_065, 3 * 131_064 + 5])
def test_publish_frames_are_pamqps_bytes(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    m = core_message(7)
    max_content = 131_064  # frame_max 131072 less a frame's 8 bytes of envelope
    properties = pamqp_properties(m, m.event_id)
    expected = ChannelFrame.marshall(
        5,
        [
            Basic.Publish(exchange="ex.ch:1-_", routing_key="devices.dév.t", mandatory=True),
            ContentHeader(properties=properties, body_size=len(body)),
            *[ContentBody(body[at : at + max_content]) for at in range(0, size, max_content)],
        ],
    ).payload
    out: list[bytes] = []
    method = publish_method(5, "ex.ch:1-_", "devices.dév.t")
    publish_frames(out, 5, method, event_properties(m, m.event_id), body, max_content)
    assert b"".join(out) == expected


def test_publish_method_refuses_what_pamqp_refuses() -> None:
    with pytest.raises(ValueError, match="exchange"):
        publish_method(1, "e" * 128, "k")
    with pytest.raises(ValueError, match="exchange"):
        publish_method(1, "é", "k")
    with pytest.raises(TypeError, match="exceeds maximum length"):
        publish_method(1, "ex", "k" * 256)


# -- confirms: one future per batch, tags matched across batches ---------------------------------


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


async def test_channel_closed_by_the_broker_fails_the_batch(rabbitmq: RabbitNames) -> None:
    async with core_queue(rabbitmq) as queue:
        await queue.publish([message(rabbitmq, 1)])
        async with amqp_connection(rabbitmq.url) as connection:
            channel = await connection.channel()
            await channel.exchange_delete(rabbitmq.exchange)
            await channel.close()
        # Publishing to a missing exchange: the broker closes the channel (404).
        with pytest.raises(BackendError, match=r"NOT_FOUND|ChannelNotFoundEntity"):
            await queue.publish([message(rabbitmq, 2), message(rabbitmq, 3)])
        # The next call opens a new channel and declares the exchange (and binding) again.
        outcome = await queue.publish([message(rabbitmq, 4)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p1", b"p4"]


async def test_event_id_over_255_bytes_is_refused_before_sending(rabbitmq: RabbitNames) -> None:
    long_id = message(rabbitmq, 2)._replace(event_id="é" * 128)
    async with core_queue(rabbitmq) as queue:
        with pytest.raises(BackendError, match="message id over 255 bytes"):
            await queue.publish([message(rabbitmq, 1), long_id])
        outcome = await queue.publish([message(rabbitmq, 3)])
        assert outcome.stored == 1
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=1, timeout=DRAIN_TIMEOUT)
    assert [r.body for r in received] == [b"p3"]


async def bind_queue(rabbitmq: RabbitNames, device: str) -> None:
    """The test's queue, bound to the events of ``device`` only (others are unroutable)."""
    async with amqp_connection(rabbitmq.url) as connection:
        channel = await connection.channel()
        bound = await channel.declare_queue(rabbitmq.queue, durable=True)
        await bound.bind(rabbitmq.exchange, f"devices.{device}.*")
        await channel.close()
