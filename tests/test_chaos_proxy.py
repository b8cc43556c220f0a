"""The chaos proxy against a real echo server on loopback, one test per mode.

Timing assertions are lower bounds only: a noisy machine can make anything slower, never faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from edge_agent.link import tcp_send_state
from tests.harness.chaos import (
    PIPE_LIMIT,
    ChaosProxy,
    ChaosProxyFactory,
    ChaosStats,
    Direction,
)
from tests.harness.report import figures

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

WAIT = 5.0  # generous bound on waits that should succeed; failures only, never a speed claim
SILENCE = 0.3  # how long "nothing arrives" is watched for


class EchoServer:
    """Echoes every connection; records each read and how each connection ended."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.first_read_at: float | None = None
        self.connections = 0
        self.endings: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._echo, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def received(self) -> bytes:
        return b"".join(self.reads)

    async def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait up to `WAIT` seconds until ``predicate()`` holds; fail naming ``what`` if not."""
        try:
            async with asyncio.timeout(WAIT):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"echo server: no {what} within {WAIT}s")

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self._changed.set()
        try:
            while data := await reader.read(65536):
                if self.first_read_at is None:
                    self.first_read_at = time.monotonic()
                self.reads.append(data)
                self._changed.set()
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            self._changed.set()
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WAIT):
                    await writer.wait_closed()
            self._tasks.discard(task)

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        async with asyncio.timeout(WAIT):
            await self._server.wait_closed()


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


@pytest_asyncio.fixture
async def proxy(echo: EchoServer, chaos_proxy_factory: ChaosProxyFactory) -> ChaosProxy:
    return await chaos_proxy_factory("127.0.0.1", echo.port)


@contextlib.asynccontextmanager
async def client(
    proxy: ChaosProxy,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(WAIT):
                await writer.wait_closed()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(WAIT):
        return await reader.readexactly(len(data))


async def assert_silent(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(SILENCE):
            await reader.read(1)


async def test_pass_through_echoes_both_ways_and_counts(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"hello") == b"hello"
        assert await roundtrip(reader, writer, b"world!") == b"world!"
        async with client(proxy) as (reader2, writer2):
            assert await roundtrip(reader2, writer2, b"x" * 100_000) == b"x" * 100_000
            stats = await proxy.wait_until(lambda s: s.bytes_downstream == 100_011)
            assert stats.accepted == 2
            assert stats.open == 2
            assert stats.bytes_upstream == 100_011
            assert stats.upstream_failures == 0
    await proxy.wait_until(lambda s: s.open == 0)
    assert echo.received == b"helloworld!" + b"x" * 100_000
    assert echo.connections == 2


async def test_half_close_is_forwarded(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        writer.write(b"last words")
        writer.write_eof()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b"last words"  # echo closes on EOF; we see its FIN
    await echo.wait_for("eof", lambda: echo.endings == ["eof"])


async def test_latency_delays_each_direction(proxy: ChaosProxy, echo: EchoServer) -> None:
    delay = 0.15
    proxy.latency(delay)
    async with client(proxy) as (reader, writer):
        started = time.monotonic()
        data = b"".join(b"%03d" % i for i in range(200))
        for i in range(0, len(data), 30):  # many small writes: order must hold
            writer.write(data[i : i + 30])
            await writer.drain()
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(len(data)) == data
        assert time.monotonic() - started >= 2 * delay


async def test_latency_one_direction(proxy: ChaosProxy, echo: EchoServer) -> None:
    delay = 0.2
    proxy.latency(delay, direction=Direction.DOWNSTREAM)
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"ping") == b"ping"
        got_back = time.monotonic()
    assert echo.first_read_at is not None
    assert got_back - echo.first_read_at >= delay


async def test_slice_one_byte_reaches_server_as_many_reads(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    data = bytes(range(200))
    proxy.slice(1, direction=Direction.UPSTREAM)
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, data) == data
    assert echo.received == data
    assert proxy.stats.writes_upstream == len(data)  # one send per byte
    # The server shares our event loop, which the proxy yields to between bytes, so it reads one
    # byte at a time; the margin is for a loaded kernel that defers loopback delivery.
    assert sum(len(r) == 1 for r in echo.reads) >= len(data) // 2


async def test_slice_with_interval_gives_one_byte_per_read(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    data = b"MQTT-connect"
    proxy.slice(1, interval=0.005, direction=Direction.UPSTREAM)
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, data) == data
    assert echo.received == data
    assert sum(len(r) == 1 for r in echo.reads) >= len(data) - 2


async def test_slice_n_bytes(proxy: ChaosProxy, echo: EchoServer) -> None:
    data = bytes(1000)
    proxy.slice(7)
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, data) == data
    stats = await proxy.wait_until(lambda s: s.bytes_downstream == len(data))
    assert stats.writes_upstream == -(-len(data) // 7)


async def test_bandwidth_is_a_ceiling(proxy: ChaosProxy, echo: EchoServer) -> None:
    rate = 40_000
    data = bytes(20_000)
    proxy.bandwidth(rate, direction=Direction.UPSTREAM)
    async with client(proxy) as (reader, writer):
        started = time.monotonic()
        assert await roundtrip(reader, writer, data) == data
        elapsed = time.monotonic() - started
    # The first 10 ms worth goes at once; the rest is paced.
    assert elapsed >= (len(data) - rate * 0.01) / rate


async def test_a_small_hold_backs_a_slow_direction_up_into_the_sender(
    echo: EchoServer, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """With the default hold the proxy takes in 256 KiB at once, so the sender's TCP sees its
    bytes acknowledged long before they cross; with a small one they wait in the sender's send
    queue, as on a slow real path (the uplink's F6 test of large messages needs that)."""
    queued = {}
    for hold in (PIPE_LIMIT, 4096):
        proxy = await chaos_proxy_factory("127.0.0.1", echo.port, hold=hold)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)
        sock = socket.create_connection(proxy.address)
        try:
            sock.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < 200_000:
                    sent += sock.send(bytes(200_000 - sent))
            await asyncio.sleep(0.5)
            state = tcp_send_state(sock)
            assert state is not None
            queued[hold] = state[1]
        finally:
            sock.close()
    figures("chaos proxy hold", **{f"queued_with_hold_{k}": v for k, v in queued.items()})
    assert queued[4096] > 150_000
    assert queued[PIPE_LIMIT] == 0


async def test_blackhole_holds_data_and_heals(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"before") == b"before"
        proxy.blackhole()
        writer.write(b"lost?")
        await writer.drain()
        await assert_silent(reader)
        assert not reader.at_eof()
        assert not writer.is_closing()
        assert echo.received == b"before"
        assert proxy.stats.open == 1

        # A connection made during the cut does not reach the server until it heals.
        async with client(proxy) as (reader2, writer2):
            await proxy.wait_until(lambda s: s.accepted == 2)
            writer2.write(b"second")
            await writer2.drain()
            await assert_silent(reader2)
            assert echo.connections == 1

            proxy.pass_through()
            async with asyncio.timeout(WAIT):
                assert await reader2.readexactly(6) == b"second"
        # Held bytes arrive after the cut heals, then new data flows as usual.
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(5) == b"lost?"
        assert await roundtrip(reader, writer, b"after") == b"after"


async def test_blackhole_one_direction(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"a") == b"a"
        proxy.blackhole(direction=Direction.DOWNSTREAM)
        writer.write(b"b")
        await writer.drain()
        await echo.wait_for("upstream still flows", lambda: echo.received == b"ab")
        await assert_silent(reader)
        proxy.pass_through(direction=Direction.DOWNSTREAM)
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(1) == b"b"


async def test_close_sends_fin_to_both_sides(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"hi") == b"hi"
        await proxy.close()
        assert proxy.stats.open == 0
        async with asyncio.timeout(WAIT):
            assert await reader.read(100) == b""
    await echo.wait_for("server sees EOF", lambda: echo.endings == ["eof"])

    # While in close mode a new connection is closed at once, without reaching the server.
    async with client(proxy) as (reader, _), asyncio.timeout(WAIT):
        assert await reader.read(100) == b""
    assert echo.connections == 1

    proxy.pass_through()
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"again") == b"again"


async def test_reset_sends_rst_to_both_sides(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"hi") == b"hi"
        await proxy.reset()
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                await reader.read(100)
    await echo.wait_for("server sees RST", lambda: echo.endings == ["reset"])

    async with client(proxy) as (reader, _):
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                await reader.read(100)
    assert echo.connections == 1

    proxy.pass_through()
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"again") == b"again"
    stats = proxy.stats
    assert (stats.accepted, stats.upstream_failures) == (3, 0)


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_a_cut_path_that_ends_delivers_nothing_it_held(
    proxy: ChaosProxy, echo: EchoServer, ending: str
) -> None:
    """Bytes a blackhole held die with the connection: the proxy let its pumps see the path
    healed before it cancelled them, and they could deliver what they held just before the RST
    (the agent then saw acknowledgements a cut should have lost: a flaky uplink test)."""
    for _ in range(20):  # the race went either way
        async with client(proxy) as (reader, writer):
            assert await roundtrip(reader, writer, b"a") == b"a"
            proxy.blackhole(direction=Direction.DOWNSTREAM)
            writer.write(b"held")
            await writer.drain()
            await echo.wait_for("upstream flows", lambda: echo.received.endswith(b"held"))
            await asyncio.sleep(0.02)  # the echo's answer reaches the proxy, which holds it
            await (proxy.reset() if ending == "reset" else proxy.close())
            async with asyncio.timeout(WAIT):
                try:
                    after = await reader.read(100)
                except ConnectionResetError:
                    after = b""
            assert after == b""
        proxy.pass_through()


async def test_peer_reset_is_passed_on(proxy: ChaosProxy, echo: EchoServer) -> None:
    async with client(proxy) as (reader, writer):
        assert await roundtrip(reader, writer, b"hi") == b"hi"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    await echo.wait_for("server sees RST", lambda: echo.endings == ["reset"])
    await proxy.wait_until(lambda s: s.open == 0)


async def test_unreachable_upstream_resets_client(chaos_proxy_factory: ChaosProxyFactory) -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    proxy = await chaos_proxy_factory("127.0.0.1", port)  # nothing listens there now
    async with client(proxy) as (reader, _):
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                await reader.read(1)
    stats = await proxy.wait_until(lambda s: s.open == 0)
    assert stats == ChaosStats(
        accepted=1,
        open=0,
        bytes_upstream=0,
        bytes_downstream=0,
        writes_upstream=0,
        writes_downstream=0,
        upstream_failures=1,
    )


async def test_aclose_closes_connections_and_listener(echo: EchoServer) -> None:
    async with ChaosProxy(("127.0.0.1", echo.port)) as proxy:
        address = proxy.address
        proxy.latency(0.05)
        async with client(proxy) as (reader, writer):
            assert await roundtrip(reader, writer, b"x") == b"x"
            await proxy.aclose()
            async with asyncio.timeout(WAIT):
                assert await reader.read(1) == b""
        await proxy.aclose()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(WAIT):
            await asyncio.open_connection(*address)


async def test_mode_arguments_are_validated(proxy: ChaosProxy) -> None:
    with pytest.raises(ValueError, match="latency"):
        proxy.latency(-1)
    with pytest.raises(ValueError, match="bandwidth"):
        proxy.bandwidth(0)
    with pytest.raises(ValueError, match="slice size"):
        proxy.slice(0)
    with pytest.raises(ValueError, match="interval"):
        proxy.slice(1, interval=-0.1)
    assert "up=pass down=pass" in repr(proxy)
