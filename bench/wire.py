"""MQTT 3.1.1 packets as bytes, for the benchmarks' load generators (no parsing, no checks)."""

from __future__ import annotations

import struct

__all__ = [
    "CONNACK_ACCEPTED",
    "DISCONNECT",
    "PINGREQ",
    "connect_packet",
    "length",
    "publish_packet",
    "utf8",
]

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


def length(value: int) -> bytes:
    """The remaining-length varint."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    """A length-prefixed UTF-8 string."""
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str,
    keep_alive: int = 60,
    *,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT with a clean session, and a user name and password when given."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive) + utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return b"\x10" + length(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH; ``topic`` as `utf8` encodes it (callers encode it once for many)."""
    body = topic + struct.pack("!H", packet_id) + payload
    return b"\x32" + length(len(body)) + body
