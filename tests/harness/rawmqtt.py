"""A byte-level MQTT 3.1.1 client for tests: hand-built packets, independent of the code under test.

Real client libraries never send malformed packets or hold back acks on purpose; this one does
exactly what a test says, and reads back what the server sends.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from dataclasses import dataclass

__all__ = [
    "RawClient",
    "ServerPacket",
    "connect_packet",
    "encode_length",
    "packet",
    "publish_packet",
    "pubrel_packet",
    "subscribe_packet",
    "tls_connect",
    "utf8",
]

DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


def encode_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def utf8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_length(len(body)) + body


def connect_packet(
    client_id: str = "raw",
    *,
    keep_alive: int = 60,
    clean: bool = True,
    username: str | None = None,
    password: bytes | None = None,
    will: tuple[str, bytes] | None = None,
    level: int = 4,
    name: str = "MQTT",
) -> bytes:
    flags = 0x02 if clean else 0
    payload = utf8(client_id)
    if will is not None:
        flags |= 0x04
        payload += utf8(will[0]) + utf8(will[1])
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
    if password is not None:
        flags |= 0x40
        payload += utf8(password)
    body = utf8(name) + bytes([level, flags]) + struct.pack("!H", keep_alive) + payload
    return packet(0x10, body)


def publish_packet(
    topic: str | bytes,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int | None = None,
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = utf8(topic)
    if qos:
        body += struct.pack("!H", packet_id if packet_id is not None else 1)
    return packet(first, body + payload)


def pubrel_packet(packet_id: int) -> bytes:
    return packet(0x62, struct.pack("!H", packet_id))


def subscribe_packet(packet_id: int, *filters: tuple[str, int]) -> bytes:
    body = struct.pack("!H", packet_id)
    for name, qos in filters:
        body += utf8(name) + bytes([qos])
    return packet(0x82, body)


def tls_connect(
    port: int, context: ssl.SSLContext, connect: bytes, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """Blocking (run it in a thread): a TLS handshake offering ``session`` (resumption), then
    ``connect``; returns (the first 4 bytes back, the TLS session, whether it was resumed). A
    failed handshake returns ``b""`` and no session."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        except (ssl.SSLError, OSError):
            return b"", None, False
        answer = b""
        with tls:
            try:
                tls.sendall(connect)
                answer = tls.recv(4)  # also reads a TLS 1.3 ticket sent after the handshake
                if answer == b"\x20\x02\x00\x00":
                    # A clean end: DISCONNECT, and the server closes with a close_notify.
                    # OpenSSL drops a session from its cache when its connection ends without
                    # one, and the resumption tests would then test nothing (or fail).
                    tls.sendall(DISCONNECT)
                    while tls.recv(1024):
                        pass
            except (ssl.SSLError, OSError):
                pass  # TLS 1.3: the certificate is refused after the client's Finished
            return answer, tls.session, bool(tls.session_reused)


@dataclass(frozen=True)
class ServerPacket:
    kind: int  # the packet type, 2 = CONNACK, 4 = PUBACK, ...
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        value: int = struct.unpack("!H", self.body[:2])[0]
        return value


_ACKS = {4: "PUBACK", 5: "PUBREC", 7: "PUBCOMP"}


class RawClient:
    """One TCP (or TLS) connection; `read` returns the server's next packet or None at EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        return cls(reader, writer)

    @classmethod
    async def connected(cls, port: int, client_id: str = "raw", **connect: object) -> RawClient:
        """Open, CONNECT and check the CONNACK accepted."""
        client = await cls.open(port)
        await client.send(connect_packet(client_id, **connect))  # type: ignore[arg-type]
        connack = await client.read()
        assert connack is not None, "server closed instead of answering CONNECT"
        assert (connack.kind, connack.body) == (2, b"\x00\x00"), connack
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = 5.0) -> ServerPacket | None:
        async with asyncio.timeout(timeout):
            try:
                first = await self.reader.readexactly(1)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            length, shift = 0, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = await self.reader.readexactly(length)
        return ServerPacket(first[0] >> 4, first[0] & 0x0F, body)

    async def closed_within(self, timeout: float) -> bool:
        """True if the server closes this connection within ``timeout``.

        Packets before the close are skipped, except acknowledgements (PUBACK, PUBREC, PUBCOMP):
        one of those fails the test, so that "closed" can never hide "acknowledged, then
        closed". A test that expects acknowledgements first reads them with `read`. When the
        server closes, our side is closed too.
        """
        try:
            async with asyncio.timeout(timeout):
                while (packet := await self.read(timeout)) is not None:
                    assert packet.kind not in _ACKS, (
                        f"{_ACKS[packet.kind]} for packet id {packet.packet_id} before the close"
                    )
        except TimeoutError:
            return False
        await self.aclose()
        return True

    async def aclose(self) -> None:
        self.writer.transport.abort()
