"""A TCP chaos proxy for fault tests: sits on loopback between a client and its server.

`ChaosProxy` listens on ``127.0.0.1`` port 0 and relays every accepted connection to one upstream
address. Its mode can change at any moment and applies to connections already open as well as new
ones: pass-through, latency, bandwidth, slicing into n-byte writes, blackhole (silent cut), close
(FIN) and reset (RST). The shaping modes take a ``direction``: ``UPSTREAM`` is client to server,
``DOWNSTREAM`` server to client, ``BOTH`` the default.

The proxy works on raw non-blocking sockets with ``loop.sock_recv`` / ``loop.sock_sendall``, so what
it holds is exactly what the code says: per direction one bounded pipe of chunks read but not yet
written (`PIPE_LIMIT` bytes plus one chunk). When the destination stops reading, the pipe fills, the
proxy stops reading the source and the sender's kernel buffers fill, as they would on a real path.

Waits on peer data have no timeout on purpose (an idle MQTT connection is legitimate and the proxy
must stay transparent); every wait the proxy starts itself (connect, teardown, `wait_until`) is
bounded, and `aclose` cancels and awaits every task it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import pytest_asyncio

__all__ = [
    "ChaosProxy",
    "ChaosProxyError",
    "ChaosProxyFactory",
    "ChaosStats",
    "Direction",
    "chaos_proxy_factory",
]

_log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
"""Seconds the proxy waits for the upstream to accept a connection before resetting the client."""
TEARDOWN_TIMEOUT = 5.0
"""Seconds `close`, `reset` and `aclose` wait for the proxy's tasks to finish."""
WAIT_TIMEOUT = 5.0
"""Default seconds `ChaosProxy.wait_until` waits."""
MAX_CONNECTIONS = 256
"""Open connections at which the proxy stops accepting (the kernel backlog then holds clients)."""
PIPE_LIMIT = 256 * 1024
"""Bytes one direction of one connection may hold between reading and writing (one chunk more)."""
CHUNK_SIZE = 64 * 1024
"""Largest single read from a socket."""
_PACING_QUANTUM = 0.01  # bandwidth mode writes about 10 ms worth of bytes at a time
_MAX_DISCARD_READS = 64  # bounded: data can keep arriving while we drain before a FIN


class ChaosProxyError(AssertionError):
    """The proxy itself failed: a task crashed or did not stop within `TEARDOWN_TIMEOUT`."""


class Direction(enum.StrEnum):
    """Which way a shaping mode applies."""

    UPSTREAM = "upstream"  # client -> server
    DOWNSTREAM = "downstream"  # server -> client
    BOTH = "both"


_ONE_WAY = (Direction.UPSTREAM, Direction.DOWNSTREAM)


class _Kind(enum.StrEnum):
    FORWARD = "pass"
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    SLICE = "slice"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True, slots=True)
class _Shaping:
    kind: _Kind
    latency: float = 0.0
    rate: float = 0.0
    size: int = 0
    interval: float = 0.0

    def __str__(self) -> str:
        match self.kind:
            case _Kind.LATENCY:
                return f"latency({self.latency}s)"
            case _Kind.BANDWIDTH:
                return f"bandwidth({self.rate}B/s)"
            case _Kind.SLICE:
                return f"slice({self.size}, interval={self.interval}s)"
            case _:
                return self.kind.value


_PASS = _Shaping(_Kind.FORWARD)


class _Ending(enum.StrEnum):
    CLOSE = "close"  # FIN
    RESET = "reset"  # RST


@dataclass(frozen=True, slots=True)
class ChaosStats:
    """A snapshot of the proxy's counters since `start`.

    ``accepted`` counts every client connection, including those closed or reset at once in
    close/reset mode; ``open`` those relayed (or waiting for the upstream) and not yet torn down.
    ``bytes_*`` count bytes handed to the destination socket, ``writes_*`` the separate sends that
    carried them (``slice(n)`` makes one per n bytes). ``upstream_failures`` counts clients reset
    because the upstream could not be reached.
    """

    accepted: int
    open: int
    bytes_upstream: int
    bytes_downstream: int
    writes_upstream: int
    writes_downstream: int
    upstream_failures: int


class _Pulse:
    """Wakes every current waiter each time it fires; never holds a backlog."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(frozen=True, slots=True)
class _Chunk:
    arrived: float  # loop.time() when read; latency counts from here
    data: bytes  # b"" is the source's EOF


class _Pipe:
    """FIFO of chunks between one direction's reader and writer, bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: deque[_Chunk] = deque()
        self._bytes = 0
        self._cond = asyncio.Condition()

    async def put(self, chunk: _Chunk) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._bytes < self._limit)
            self._chunks.append(chunk)
            self._bytes += len(chunk.data)
            self._cond.notify_all()

    async def get(self) -> _Chunk:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._chunks))
            chunk = self._chunks.popleft()
            self._bytes -= len(chunk.data)
            self._cond.notify_all()
            return chunk


@dataclass(eq=False)
class _Connection:
    ident: int
    client: socket.socket
    upstream: socket.socket | None = None
    ending: _Ending | None = None  # set by close()/reset() or by a peer's reset; None ends with FIN
    finished: bool = False
    task: asyncio.Task[None] = field(init=False)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class ChaosProxy:
    """A TCP proxy from ``127.0.0.1:<ephemeral>`` to ``upstream`` whose faults switch at run time.

    Use ``async with ChaosProxy(("127.0.0.1", port)) as proxy`` or `start` / `aclose`; point the
    client at `address`. Mode setters return at once and apply to the next byte each direction
    forwards; `close` and `reset` return once every connection open at the call is torn down.
    Any shaping call leaves close/reset mode.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        hold: int = PIPE_LIMIT,
    ) -> None:
        """``hold``: bytes one direction may hold between reading and writing. Below
        `PIPE_LIMIT` the proxy's sockets also get a receive buffer that small, so a slow
        direction backs up into the sender's send queue, as on a slow real path (with the
        default the proxy takes in up to 256 KiB at loopback speed, and the sender's TCP sees
        its bytes acknowledged long before they cross)."""
        self.upstream = upstream
        self._hold = hold
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._shaping: dict[Direction, _Shaping] = dict.fromkeys(_ONE_WAY, _PASS)
        self._terminal: _Ending | None = None
        self._mode_changed = _Pulse()
        self._state_changed = _Pulse()
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connections: dict[int, _Connection] = {}
        self._accepted = 0
        self._upstream_failures = 0
        self._bytes = dict.fromkeys(_ONE_WAY, 0)
        self._writes = dict.fromkeys(_ONE_WAY, 0)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``127.0.0.1`` port 0 and start accepting; `port` is valid afterwards."""
        if self._listener is not None:
            raise RuntimeError("ChaosProxy.start() called twice")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._small_receive_buffer(listener)  # before listen: accepted sockets inherit it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._runner = asyncio.create_task(
            self._accept_loop(listener), name=f"chaos_proxy.{self.port}.accept"
        )
        _log.info("chaos proxy %s -> %s:%s started", self.port, *self.upstream)

    async def aclose(self) -> None:
        """Stop listening and close every connection with a FIN; idempotent.

        Raises `ChaosProxyError` if a proxy task crashed while running or did not stop in time.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.cancel()
        try:
            await asyncio.wait({runner}, timeout=TEARDOWN_TIMEOUT)
        finally:
            # Only once the runner is done is no socket registered with the loop any more.
            if runner.done():
                for conn in list(self._connections.values()):
                    self._finish(conn)
                if self._listener is not None:
                    self._listener.close()
        if not runner.done():
            raise ChaosProxyError(f"chaos proxy {self.port} did not stop in {TEARDOWN_TIMEOUT}s")
        if not runner.cancelled() and (exc := runner.exception()) is not None:
            raise ChaosProxyError(f"chaos proxy {self.port} crashed") from exc
        _log.info("chaos proxy %s closed", self.port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        """The proxy's listening port (kept after `aclose`); `RuntimeError` before `start`."""
        if self._port is None:
            raise RuntimeError("ChaosProxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)``: where clients connect."""
        return ("127.0.0.1", self.port)

    # -- modes ------------------------------------------------------------------------------

    def pass_through(self, *, direction: Direction = Direction.BOTH) -> None:
        """Forward bytes as they come; releases anything a blackhole held."""
        self._shape(direction, _PASS)

    def latency(self, seconds: float, *, direction: Direction = Direction.BOTH) -> None:
        """Deliver each chunk ``seconds`` after the proxy read it, order kept, reads pipelined."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        self._shape(direction, _Shaping(_Kind.LATENCY, latency=seconds))

    def bandwidth(self, bytes_per_second: float, *, direction: Direction = Direction.BOTH) -> None:
        """Pace writes to ``bytes_per_second`` (in pieces of about 10 ms worth of bytes)."""
        if bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bytes_per_second}")
        self._shape(direction, _Shaping(_Kind.BANDWIDTH, rate=bytes_per_second))

    def slice(
        self, n: int = 1, *, interval: float = 0.0, direction: Direction = Direction.BOTH
    ) -> None:
        """Write data in ``n``-byte pieces, each sent separately (TCP_NODELAY is set).

        Between pieces the proxy yields to the event loop (a peer on the same loop then reads each
        piece separately), or sleeps ``interval`` seconds when it is positive, which gives a peer in
        another process time to do the same.
        """
        if n < 1:
            raise ValueError(f"slice size must be >= 1, got {n}")
        if interval < 0:
            raise ValueError(f"slice interval must be >= 0, got {interval}")
        self._shape(direction, _Shaping(_Kind.SLICE, size=n, interval=interval))

    def blackhole(self, *, direction: Direction = Direction.BOTH) -> None:
        """Silently cut: sockets stay open, nothing is forwarded, not even FIN or RST.

        The proxy stops reading, so senders see what a dead path gives them: their writes succeed
        until their buffers fill, then block. Bytes already read are held, not dropped, and are
        delivered after a later mode switch (TCP retransmission would deliver them too). A new
        connection is accepted but reaches the upstream only once no direction is cut, since a
        handshake needs both.
        """
        self._shape(direction, _Shaping(_Kind.BLACKHOLE))

    async def close(self) -> None:
        """Send FIN on both sides of every open connection; close new ones at once until the next
        mode call. Returns once every connection open at the call is closed.

        Unread inbound bytes are discarded first: Linux answers a close with unread data with RST.
        Raises `ChaosProxyError` if a connection task does not stop in time.
        """
        await self._terminate(_Ending.CLOSE)

    async def reset(self) -> None:
        """Abort both sides of every open connection with RST (SO_LINGER 0); reset new ones at once
        until the next mode call. Returns once every connection open at the call is gone.

        Raises `ChaosProxyError` if a connection task does not stop in time.
        """
        await self._terminate(_Ending.RESET)

    # -- observation ------------------------------------------------------------------------

    @property
    def stats(self) -> ChaosStats:
        """The counters now."""
        return ChaosStats(
            accepted=self._accepted,
            open=len(self._connections),
            bytes_upstream=self._bytes[Direction.UPSTREAM],
            bytes_downstream=self._bytes[Direction.DOWNSTREAM],
            writes_upstream=self._writes[Direction.UPSTREAM],
            writes_downstream=self._writes[Direction.DOWNSTREAM],
            upstream_failures=self._upstream_failures,
        )

    async def wait_until(
        self,
        predicate: Callable[[ChaosStats], bool],
        *,
        timeout: float = WAIT_TIMEOUT,
    ) -> ChaosStats:
        """Wait until ``predicate(stats)`` holds and return those stats.

        Raises `TimeoutError` after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate(stats := self.stats):
                await self._state_changed.wait()
        return stats

    def __repr__(self) -> str:
        where = "unstarted" if self._port is None else f"127.0.0.1:{self._port}"
        if self._terminal is not None:
            mode = self._terminal.value
        else:
            up, down = (self._shaping[d] for d in _ONE_WAY)
            mode = f"up={up} down={down}"
        return f"<ChaosProxy {where} -> {self.upstream[0]}:{self.upstream[1]} {mode}>"

    # -- internals --------------------------------------------------------------------------

    def _small_receive_buffer(self, sock: socket.socket) -> None:
        if self._hold < PIPE_LIMIT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._hold)

    def _shape(self, direction: Direction, shaping: _Shaping) -> None:
        targets = _ONE_WAY if direction is Direction.BOTH else (direction,)
        for one_way in targets:
            self._shaping[one_way] = shaping
        self._terminal = None
        self._mode_changed.fire()
        _log.info("chaos proxy %s: %s %s", self._port, direction.value, shaping)

    async def _terminate(self, how: _Ending) -> None:
        self._terminal = how
        _log.info("chaos proxy %s: %s", self._port, how.value)
        victims = list(self._connections.values())
        for conn in victims:
            conn.ending = how
            conn.task.cancel()
        # The shaping stays until the connections are gone: pumps woken by a healed path would
        # deliver what a blackhole held before their cancellation reached them.
        if victims:
            _, pending = await asyncio.wait({c.task for c in victims}, timeout=TEARDOWN_TIMEOUT)
            if pending:
                raise ChaosProxyError(f"{len(pending)} connection(s) did not stop on {how.value}")
        # A task cancelled before its first step never runs its finally; finish those here.
        for conn in victims:
            self._finish(conn)
        if self._terminal is how:  # no mode call meanwhile
            self._shaping = dict.fromkeys(_ONE_WAY, _PASS)
            self._mode_changed.fire()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                while len(self._connections) >= self._max_connections:
                    await self._state_changed.wait()
                sock, _ = await loop.sock_accept(listener)
                _prepare(sock)
                self._accepted += 1
                conn = _Connection(self._accepted, sock)
                if self._terminal is not None:
                    conn.ending = self._terminal
                    conn.finished = True
                    _shut(sock, self._terminal)
                    self._state_changed.fire()
                    continue
                conn.task = tg.create_task(
                    self._serve(conn), name=f"chaos_proxy.{self.port}.conn{conn.ident}"
                )
                self._connections[conn.ident] = conn
                self._state_changed.fire()

    async def _serve(self, conn: _Connection) -> None:
        try:
            # A TCP handshake needs both directions, so a cut path never shows the upstream a
            # connection.
            while any(self._shaping[d].kind is _Kind.BLACKHOLE for d in _ONE_WAY):
                await self._mode_changed.wait()
            try:
                conn.upstream = await self._connect_upstream()
            except OSError as exc:
                self._upstream_failures += 1
                conn.ending = conn.ending or _Ending.RESET
                _log.info("chaos proxy %s: upstream unreachable: %r", self.port, exc)
                return
            await self._relay(conn, conn.upstream)
            # In 3.11 a TaskGroup whose children failed raises their errors instead of our own
            # cancellation; don't let close()/reset()/aclose() be swallowed by `except*` below.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
        finally:
            self._finish(conn)

    async def _relay(self, conn: _Connection, upstream: socket.socket) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for direction, src, dst in (
                    (Direction.UPSTREAM, conn.client, upstream),
                    (Direction.DOWNSTREAM, upstream, conn.client),
                ):
                    pipe = _Pipe(self._hold)
                    name = f"chaos_proxy.{self.port}.conn{conn.ident}.{direction.value}"
                    tg.create_task(self._read_side(direction, src, pipe), name=f"{name}.read")
                    tg.create_task(self._write_side(direction, pipe, dst), name=f"{name}.write")
        except* ConnectionResetError:
            # A peer's RST is passed on as an RST, as it would travel along a real path.
            conn.ending = conn.ending or _Ending.RESET
        except* OSError:
            pass  # the other peer then sees a FIN

    async def _connect_upstream(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = self.upstream
        async with asyncio.timeout(self._connect_timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                _prepare(sock)
                self._small_receive_buffer(sock)  # before connect: the window scale is set then
                await loop.sock_connect(sock, addr)
            except BaseException:
                sock.close()
                raise
        return sock

    async def _read_side(self, direction: Direction, src: socket.socket, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._gate(direction)  # a cut path stops taking data
            try:
                data = await loop.sock_recv(src, CHUNK_SIZE)
            except OSError:
                await self._gate(direction)  # a reset behind a cut is not seen until it heals
                raise
            await pipe.put(_Chunk(loop.time(), data))
            if not data:
                return

    async def _write_side(self, direction: Direction, pipe: _Pipe, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        paced_until = 0.0  # bandwidth mode: when the bytes sent so far are "paid for"
        while True:
            chunk = await pipe.get()
            # Latency counts from the read and uses the mode current now, so lowering it
            # releases chunks already waiting.
            while True:
                shaping = await self._gate(direction)
                due = chunk.arrived + shaping.latency - loop.time()
                if due <= 0:
                    break
                await self._sleep_unless_mode_changes(due)
            if not chunk.data:
                dst.shutdown(socket.SHUT_WR)
                return
            pos = 0
            while pos < len(chunk.data):
                shaping = await self._gate(direction)  # a cut mid-chunk holds the rest
                if shaping.kind is _Kind.BANDWIDTH:
                    wait = paced_until - loop.time()
                    if wait > 0:
                        await self._sleep_unless_mode_changes(wait)
                        continue
                    size = max(1, int(shaping.rate * _PACING_QUANTUM))
                elif shaping.kind is _Kind.SLICE:
                    size = shaping.size
                else:
                    size = len(chunk.data)
                piece = chunk.data[pos : pos + size]
                await loop.sock_sendall(dst, piece)
                pos += len(piece)
                self._bytes[direction] += len(piece)
                self._writes[direction] += 1
                self._state_changed.fire()
                if shaping.kind is _Kind.BANDWIDTH:
                    # max(): idle time earns no credit, so a burst after a pause is paced too.
                    paced_until = max(paced_until, loop.time()) + len(piece) / shaping.rate
                elif shaping.kind is _Kind.SLICE:
                    if shaping.interval > 0:
                        await self._sleep_unless_mode_changes(shaping.interval)
                    else:
                        # Two loop turns: one for a same-loop peer's readiness callback, one for
                        # its reading task, so such a peer sees each piece as a read of its own.
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)

    async def _gate(self, direction: Direction) -> _Shaping:
        """Wait while ``direction`` is blackholed; return its shaping once it is not."""
        while (shaping := self._shaping[direction]).kind is _Kind.BLACKHOLE:
            await self._mode_changed.wait()
        return shaping

    async def _sleep_unless_mode_changes(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._mode_changed.wait()

    def _finish(self, conn: _Connection) -> None:
        """Close ``conn``'s sockets the way its ending says; idempotent and synchronous."""
        if conn.finished:
            return
        conn.finished = True
        self._connections.pop(conn.ident, None)
        how = conn.ending or _Ending.CLOSE
        for sock in conn.sockets():
            _shut(sock, how)
        self._state_changed.fire()


def _prepare(sock: socket.socket) -> None:
    sock.setblocking(False)
    # Without Nagle each slice leaves as its own segment instead of waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shut(sock: socket.socket, how: _Ending) -> None:
    """Close ``sock`` with a FIN or an RST; it must not be registered with the event loop."""
    if sock.fileno() == -1:
        return
    try:
        if how is _Ending.RESET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            # Linux turns a close with unread received data into an RST; read it away first.
            for _ in range(_MAX_DISCARD_READS):
                if not sock.recv(CHUNK_SIZE):
                    break
    except OSError:  # BlockingIOError: nothing left to read; others: the peer is already gone
        pass
    finally:
        sock.close()


class ChaosProxyFactory:
    """Starts `ChaosProxy` objects for one test and closes them all at teardown."""

    def __init__(self) -> None:
        self._proxies: list[ChaosProxy] = []

    async def __call__(
        self, upstream_host: str, upstream_port: int, *, hold: int = PIPE_LIMIT
    ) -> ChaosProxy:
        """A started proxy relaying to ``upstream_host:upstream_port`` (``hold``: see
        `ChaosProxy`)."""
        proxy = ChaosProxy((upstream_host, upstream_port), hold=hold)
        await proxy.start()
        self._proxies.append(proxy)
        return proxy

    async def aclose(self) -> None:
        """Close every proxy, newest first; errors are raised after all were closed."""
        async with contextlib.AsyncExitStack() as stack:
            for proxy in self._proxies:
                stack.push_async_callback(proxy.aclose)
            self._proxies.clear()


@pytest_asyncio.fixture
async def chaos_proxy_factory() -> AsyncIterator[ChaosProxyFactory]:
    """``await chaos_proxy_factory(host, port)`` gives a started proxy; all close at teardown."""
    factory = ChaosProxyFactory()
    try:
        yield factory
    finally:
        await factory.aclose()
