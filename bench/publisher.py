"""The benchmarks' MQTT client: pre-encoded QoS 1 PUBLISH packets kept in flight up to a window.

An asyncio protocol, no MQTT library: the load generators of ``bench.ingest`` and ``bench.sink``
run many of these in one process, and what they cost is part of what those benchmarks report.
"""

from __future__ import annotations

import asyncio

from bench.wire import CONNACK_ACCEPTED, DISCONNECT, PINGREQ

__all__ = ["Publisher"]

PUBACK = 0x40  # first byte of a PUBACK; its remaining length is 2
PINGRESP = 0xD0  # first byte of a PINGRESP; its remaining length is 0


class Publisher(asyncio.Protocol):
    """One MQTT client: sends ``connect``, then keeps up to ``window`` QoS 1 PUBLISH packets
    unacknowledged, topped up in chunks of ``refill`` (0: half the window); counts PUBACKs and
    PINGRESPs (``pongs``).

    ``packets`` are sent in order, again and again: their packet ids must not repeat within a
    window (PUBACK ids are not checked: amqtt may acknowledge out of order). ``connected``
    resolves on an accepting CONNACK; `publish` returns a future that resolves once ``count``
    publishes are acknowledged. Both fail with `ConnectionError` when the connection is lost
    (``lost`` then says why; not after `close`), and with `RuntimeError` (the connection aborted)
    on a refused CONNECT, a packet other than PUBACK or PINGRESP, or more PUBACKs than publishes.
    The errors' messages start with ``name`` when one is given.
    """

    def __init__(
        self, connect: bytes, packets: list[bytes], window: int, refill: int = 0, name: str = ""
    ) -> None:
        loop = asyncio.get_running_loop()
        self._connect = connect
        self._packets = packets
        self._window = window
        self._refill = max(1, min(refill or window // 2, window))
        self._prefix = f"{name}: " if name else ""
        self._next = 0
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self.connected: asyncio.Future[None] = loop.create_future()
        self.lost: str | None = None
        self._closing = False
        self._done: asyncio.Future[None] = loop.create_future()
        self._target = self._sent = self._acked = 0
        self.pongs = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._connect)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self.lost = repr(exc) if exc else "closed by the server"
        error = ConnectionError(f"{self._prefix}connection lost ({self.lost})")
        for future in (self.connected, self._done):
            if not future.done():
                future.set_exception(error)

    def _fail(self, why: str) -> None:
        error = RuntimeError(f"{self._prefix}{why}")
        for future in (self.connected, self._done):
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self.connected.done():
            if len(buffer) < 4:
                self._buffer = buffer
                return
            if buffer[:4] != CONNACK_ACCEPTED:
                self._fail(f"CONNECT refused or unexpected reply {buffer[:4].hex()}")
                return
            self.connected.set_result(None)
            buffer = buffer[4:]
        count = len(buffer) // 4
        if (
            count * 4 == len(buffer)
            and buffer[0::4].count(PUBACK) == count
            and buffer[1::4].count(2) == count
        ):
            # Nothing but whole PUBACKs, the usual case, checked in C rather than packet by
            # packet in Python: the generator's own CPU is part of what the benchmarks report.
            acked, self._buffer = count, b""
        else:
            acked = self._parse(buffer)
            if acked < 0:
                return
        if acked:
            self._acked += acked
            if self._acked > self._sent:
                self._fail("more PUBACKs than publishes")
            elif self._acked >= self._target:
                if not self._done.done():
                    self._done.set_result(None)
            else:
                self._fill()

    def _parse(self, buffer: bytes) -> int:
        """PUBACKs in ``buffer`` (PINGRESPs counted, a partial packet kept); -1 after `_fail`."""
        acked = at = 0
        while at + 2 <= len(buffer):
            kind, size = buffer[at], buffer[at + 1]
            if kind == PUBACK and size == 2:
                if at + 4 > len(buffer):
                    break
                acked += 1
                at += 4
            elif kind == PINGRESP and size == 0:
                self.pongs += 1
                at += 2
            else:
                self._fail(f"expected PUBACK or PINGRESP, got {buffer[at : at + 16].hex()}")
                return -1
        self._buffer = buffer[at:]
        return acked

    def _fill(self) -> None:
        free = self._window - (self._sent - self._acked)
        room = min(free, self._target - self._sent)
        # Top up only once ``refill`` slots are free (or the end is near): a few large writes
        # instead of one small write per PUBACK keeps the generator cheap whatever the server's
        # acknowledgement pattern is.
        if room <= 0 or (free < self._refill and room == free) or self._transport is None:
            return
        packets, start = self._packets, self._next
        end = start + room
        if end <= len(packets):
            chunk = packets[start:end]
            self._next = end % len(packets)
        else:
            self._next = end - len(packets)
            chunk = packets[start:] + packets[: self._next]
        self._transport.write(b"".join(chunk))
        self._sent += room

    def publish(self, count: int) -> asyncio.Future[None]:
        """Send ``count`` publishes; the future resolves once all of them are acknowledged."""
        self._done = asyncio.get_running_loop().create_future()
        self._target, self._sent, self._acked = count, 0, 0
        self._fill()
        return self._done

    def ping(self) -> None:
        """Send a PINGREQ (its PINGRESP adds to ``pongs``)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(PINGREQ)

    def close(self) -> None:
        """Send DISCONNECT and close; a lost connection is no error from now on."""
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(DISCONNECT)
            self._transport.close()
