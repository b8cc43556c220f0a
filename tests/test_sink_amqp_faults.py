"""The RabbitMQ core queue when the broker or the link to it fails (a dead port, a silent server, a
chaos proxy in front of the shared broker): opening fails within the timeout; a silent cut or a
reset fails the call within it and a later call connects again; a call failing on an old
connection drops that one, not the new one; and a dropped connection with unsent bytes is closed
within its bound, its socket let go."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from cloud_sink.backends.amqp import AmqpCoreQueue
from cloud_sink.backends.base import BackendError
from tests.harness.amqp_queue import DRAIN_TIMEOUT, core_queue, message
from tests.harness.brokers import RabbitNames, amqp_connection, drain_queue
from tests.harness.chaos import ChaosProxyFactory, Direction

SHORT_TIMEOUT = 1.5


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
