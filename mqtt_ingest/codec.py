"""MQTT 3.1.1 packets on the server side: amqtt's packet classes plus the strictness they lack.

amqtt's classes decode and encode the packets, except the PUBLISH body on the hot path, parsed
here (every check below applies to it; the fuzz tests cover it). They are lenient where a server
at a trust boundary must not be, so this module adds, around them:

- the fixed header is read here, and the declared remaining length checked against the limit
  *before* the body is read (F15);
- each body is decoded from memory, bounded to exactly the declared length: a field that claims more
  bytes than the packet holds is malformed instead of eating the next packet, and bytes left over
  are malformed too;
- every string is re-checked on the raw bytes: amqtt returns ``str(raw_bytes)`` for invalid UTF-8,
  we refuse it, and U+0000 (MQTT-1.5.3-2);
- fixed-header flags, QoS 3, packet id 0, wildcards in a PUBLISH topic, an empty topic, a CONNECT
  with missing flagged fields and a SUBSCRIBE without filters are refused;
- the CONNECT password stays binary (amqtt decodes it as text).

Any violation raises `MalformedPacket`; the server closes the connection on it.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.unsuback import UnsubackPacket

__all__ = [
    "CONNECT",
    "ConnackCode",
    "Connect",
    "Disconnect",
    "MalformedPacket",
    "PacketTooLarge",
    "PingReq",
    "PubRel",
    "Publish",
    "Subscribe",
    "UnexpectedPacket",
    "Unsubscribe",
    "UnsupportedProtocol",
    "encode_connack",
    "encode_pingresp",
    "encode_puback",
    "encode_pubcomp",
    "encode_pubrec",
    "encode_suback",
    "encode_unsuback",
    "read_packet",
]

CONNECT, PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 1, 3, 6, 8, 10, 12, 14
_NAMES = {
    0: "reserved(0)",
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "reserved(15)",
}
# Fixed-header flags every client-to-server packet but PUBLISH must carry (MQTT 3.1.1 §2.2.2).
_REQUIRED_FLAGS = {CONNECT: 0, PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}
SUBACK_FAILURE = 0x80


class ConnackCode(enum.IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class MalformedPacket(Exception):
    """The peer broke the protocol; ``reason`` is a short, loggable description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedProtocol(MalformedPacket):
    """A CONNECT of another protocol or version: its other fields were not decoded (an MQTT 5
    CONNECT carries properties where 3.1.1 has the client id)."""

    def __init__(self, name: str, level: int) -> None:
        super().__init__(f"protocol {name!r} level {level} (only 'MQTT' 4, MQTT 3.1.1, is served)")
        self.name = name
        self.level = level


class UnexpectedPacket(MalformedPacket):
    """Not the packet type expected (another one than CONNECT first); its body was not read."""

    def __init__(self, name: str, expected: str) -> None:
        super().__init__(f"{name} where {expected} was expected")
        self.name = name


class PacketTooLarge(MalformedPacket):
    """The fixed header declared more than the limit; the body was not read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet declares {size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Connect:
    protocol_name: str
    protocol_level: int
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None
    password: bytes | None
    will_topic: str | None
    will_message: bytes | None
    will_qos: int
    will_retain: bool


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    retain: bool
    dup: bool
    size: int  # the whole packet on the wire, for byte counters


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = Connect | Publish | PubRel | Subscribe | Unsubscribe | PingReq | Disconnect


class _BodyReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's reader interface over one packet body held in memory."""

    __slots__ = ("_data", "position")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.position = 0

    async def read(self, n: int = -1) -> bytes:
        start = self.position
        end = len(self._data) if n < 0 else min(start + n, len(self._data))
        self.position = end
        return self._data[start:end]

    def feed_eof(self) -> None:
        return None


async def read_packet(
    reader: asyncio.StreamReader,
    max_size: int,
    progress: Callable[[], object] | None = None,
    *,
    only: int | None = None,
) -> Packet:
    """Read one client-to-server packet (with ``only``: of that type, e.g. `CONNECT` first).

    ``progress`` is called whenever part of a large body (over `PROGRESS_BYTES`) arrives: a
    keep-alive deadline must not expire while such a packet is still coming in over a slow link
    (RELIABILITY F6).

    Raises `UnexpectedPacket` and `PacketTooLarge` (checked on the fixed header, before the body
    is read: a client not yet authenticated cannot make us hold ``max_size`` of anything else),
    `MalformedPacket`, or `asyncio.IncompleteReadError` when the peer closes mid-packet or between
    packets (``partial`` is empty then).
    """
    first = (await reader.readexactly(1))[0]
    packet_type, flags = first >> 4, first & 0x0F
    if only is not None and packet_type != only:
        raise UnexpectedPacket(_NAMES[packet_type], _NAMES[only])
    remaining = 0
    for shift in (0, 7, 14, 21):
        byte = (await reader.readexactly(1))[0]
        remaining |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("remaining length longer than 4 bytes")
    # The whole packet: 1 type byte + the length bytes + the body.
    size = 1 + (shift // 7 + 1) + remaining
    if size > max_size:
        raise PacketTooLarge(size, max_size)
    if packet_type in (SUBSCRIBE, UNSUBSCRIBE) and size > MAX_SUBSCRIBE_BYTES:
        raise PacketTooLarge(size, MAX_SUBSCRIBE_BYTES)
    name = _NAMES[packet_type]
    if packet_type != PUBLISH and packet_type in _REQUIRED_FLAGS:
        if flags != _REQUIRED_FLAGS[packet_type]:
            raise MalformedPacket(f"{name} with fixed-header flags {flags:#x}")
    elif packet_type != PUBLISH:
        raise MalformedPacket(f"{name} is not a packet a client may send to this server")
    if progress is not None and remaining > PROGRESS_BYTES:
        body = await _read_reporting(reader, remaining, progress)
    else:
        body = await reader.readexactly(remaining) if remaining else b""
    if packet_type == PUBLISH:
        return _decode_publish(flags, body, size)
    return await decode_body(MQTTFixedHeader(packet_type, flags, remaining), body, size)


MAX_SUBSCRIBE_BYTES = 16 * 1024
"""The largest SUBSCRIBE or UNSUBSCRIBE read (about 4,000 filters): nothing is ever delivered
here, and one of 1 MiB (the packet limit) held 260,000 filters whose decoding and SUBACK held
the event loop, every other client waiting, for seconds per packet (RELIABILITY F14)."""

PROGRESS_BYTES = 4096
"""Bodies up to this size are read in one go (2 s at 2 kB/s); larger ones report progress."""


async def _read_reporting(
    reader: asyncio.StreamReader, size: int, progress: Callable[[], object]
) -> bytes:
    body = bytearray()
    while len(body) < size:
        chunk = await reader.read(size - len(body))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(body), size)
        body += chunk
        progress()
    return bytes(body)


async def decode_body(fixed: MQTTFixedHeader, body: bytes, size: int) -> Packet:
    """Decode a body whose fixed header `read_packet` has already vetted."""
    kind = fixed.packet_type
    if kind in (PINGREQ, DISCONNECT):
        if body:
            raise MalformedPacket(f"{_NAMES[kind]} with a body")
        return PingReq() if kind == PINGREQ else Disconnect()
    reader = _BodyReader(body)
    try:
        if kind == PUBREL:
            rel = await PubrelPacket.from_stream(reader, fixed_header=fixed)
            _expect_end(reader, body, "PUBREL")
            return PubRel(_packet_id(rel.variable_header.packet_id))
        if kind == CONNECT:
            return await _connect(fixed, reader, body)
        # SUBSCRIBE and UNSUBSCRIBE: the raw walk alone (amqtt's pass stopped quietly at a
        # truncated filter, and cost a coroutine per field).
        packet_id = _packet_id(int.from_bytes(_Walker(body).take(2), "big"))
        if kind == SUBSCRIBE:
            filters = _strings_with_qos(body[2:])
            if not filters:
                raise MalformedPacket("SUBSCRIBE without topic filters")
            return Subscribe(packet_id, filters)
        names = _strings(body[2:])
        if not names:
            raise MalformedPacket("UNSUBSCRIBE without topic filters")
        return Unsubscribe(packet_id, names)
    except (NoDataError, MQTTError, AMQTTError, ValueError, IndexError) as exc:
        raise MalformedPacket(f"{_NAMES[kind]}: {exc or type(exc).__name__}") from None


def _decode_publish(flags: int, body: bytes, size: int) -> Publish:
    """PUBLISH, the hot path, parsed here directly (amqtt's class re-parses what we must check
    anyway and costs about a third of the server's time per event; see docs/benchmarks.md)."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    if qos == 0 and flags & 0x08:
        raise MalformedPacket("PUBLISH QoS 0 with the DUP flag")  # MQTT-3.3.1-2
    length = int.from_bytes(body[:2], "big")
    end = 2 + length
    if len(body) < 2 or end + (2 if qos else 0) > len(body):
        raise MalformedPacket("PUBLISH topic longer than the packet")
    topic = _utf8(body[2:end], "PUBLISH topic")
    if not topic:
        raise MalformedPacket("PUBLISH with an empty topic")
    if "+" in topic or "#" in topic:
        raise MalformedPacket("PUBLISH topic with a wildcard")  # MQTT-3.3.2-2
    packet_id: int | None = None
    if qos:
        packet_id = _packet_id(int.from_bytes(body[end : end + 2], "big"))
        end += 2
    return Publish(
        topic=topic,
        payload=body[end:],
        qos=qos,
        packet_id=packet_id,
        retain=bool(flags & 0x01),
        dup=bool(flags & 0x08),
        size=size,
    )


async def _connect(fixed: MQTTFixedHeader, reader: _BodyReader, body: bytes) -> Connect:
    # The version first: the rest of the variable header is laid out per version.
    version = _Walker(body)
    name, level = version.string("protocol name"), version.byte()
    if (name, level) != ("MQTT", 4):
        raise UnsupportedProtocol(name, level)
    packet = await ConnectPacket.from_stream(reader, fixed_header=fixed)
    header = packet.variable_header
    # amqtt tolerates missing fields and decodes text leniently: walk the raw body once more.
    fields = _Walker(body)
    protocol_name = fields.string("protocol name")
    level = fields.byte()
    flags = fields.byte()
    keep_alive = int.from_bytes(fields.take(2), "big")
    if (protocol_name, level, flags, keep_alive) != (
        header.proto_name,
        header.proto_level,
        header.flags,
        header.keep_alive,
    ):
        raise MalformedPacket("CONNECT variable header does not decode consistently")
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")  # MQTT-3.1.2-3
    client_id = fields.string("client identifier")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT will QoS/retain without the will flag")  # MQTT-3.1.2-11
    if will_qos == 3:
        raise MalformedPacket("CONNECT will QoS 3")
    will_topic = fields.string("will topic") if will_flag else None
    will_message = fields.binary("will message") if will_flag else None
    username = fields.string("user name") if flags & 0x80 else None
    if flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("CONNECT password without a user name")  # MQTT-3.1.2-22
    password = fields.binary("password") if flags & 0x40 else None
    if fields.position != len(body):
        raise MalformedPacket(f"CONNECT has {len(body) - fields.position} bytes after its fields")
    return Connect(
        protocol_name=protocol_name,
        protocol_level=level,
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keep_alive=keep_alive,
        username=username,
        password=password,
        will_topic=will_topic,
        will_message=will_message,
        will_qos=will_qos,
        will_retain=will_retain,
    )


class _Walker:
    """Strict sequential reader of MQTT fields from a packet body."""

    __slots__ = ("_body", "position")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.position = 0

    def take(self, n: int) -> bytes:
        end = self.position + n
        if end > len(self._body):
            raise MalformedPacket("field runs past the end of the packet")
        chunk = self._body[self.position : end]
        self.position = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def binary(self, what: str) -> bytes:
        try:
            return self.take(int.from_bytes(self.take(2), "big"))
        except MalformedPacket:
            raise MalformedPacket(f"{what} runs past the end of the packet") from None

    def string(self, what: str) -> str:
        return _utf8(self.binary(what), what)


def _utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text


def _filter(walker: _Walker) -> str:
    name = walker.string("topic filter")
    if not name:
        raise MalformedPacket("an empty topic filter")  # MQTT-4.7.3-1
    return name


def _strings(raw: bytes) -> tuple[str, ...]:
    walker = _Walker(raw)
    found: list[str] = []
    while walker.position < len(raw):
        found.append(_filter(walker))
    return tuple(found)


def _strings_with_qos(raw: bytes) -> tuple[tuple[str, int], ...]:
    walker = _Walker(raw)
    found: list[tuple[str, int]] = []
    while walker.position < len(raw):
        name = _filter(walker)
        qos = walker.byte()
        if qos > 2:
            raise MalformedPacket(f"SUBSCRIBE requested QoS byte {qos:#x}")  # MQTT-3.8.3-4
        found.append((name, qos))
    return tuple(found)


def _packet_id(value: int | None) -> int:
    if not value:
        raise MalformedPacket("packet identifier 0")  # MQTT-2.3.1-1
    return value


def _expect_end(reader: _BodyReader, body: bytes, name: str) -> None:
    if reader.position != len(body):
        raise MalformedPacket(f"{name} has {len(body) - reader.position} unexpected bytes")


def encode_connack(code: ConnackCode, session_present: bool = False) -> bytes:
    return bytes(ConnackPacket.build(int(session_present), int(code)).to_bytes())


# PUBACK, PUBREC and PUBCOMP: the type, a remaining length of 2, the packet id. Packed here (one
# per acknowledged event) rather than built through amqtt's packet classes (3 µs against 0.08
# here), and not cached per packet id, which would keep up to 65,535 of each per process.
_ACK = struct.Struct("!BBH")


def encode_puback(packet_id: int) -> bytes:
    return _ACK.pack(0x40, 2, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    return _ACK.pack(0x50, 2, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    return _ACK.pack(0x70, 2, packet_id)


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    body = struct.pack("!H", packet_id) + bytes(codes)
    length = bytearray()
    remaining = len(body)
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        length.append(byte | (0x80 if remaining else 0))
        if not remaining:
            return bytes([0x90]) + bytes(length) + body


def encode_unsuback(packet_id: int) -> bytes:
    return bytes(UnsubackPacket.build(packet_id).to_bytes())


_PINGRESP = bytes(PingRespPacket.build().to_bytes())


def encode_pingresp() -> bytes:
    return _PINGRESP
