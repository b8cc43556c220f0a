"""The batch envelope (SPEC §3): consecutive events of one topic in one MQTT message.

Used between our agent (encoder) and our sink (decoder) only, and only on a connection that
announced it at CONNECT (`format_username`, `parse_username`): never guessed from the payload.
The format is specified in docs/envelope.md; in short, all integers unsigned LEB128 varints of at
most 2**63 - 1::

    magic  b"MEB"        3 bytes
    version              1 byte   (1)
    flags                1 byte   (bit 0: body is zstd-compressed; other bits must be 0)
    epoch                8 bytes  (the agent buffer's epoch)
    body:                         (zstd frame of the following when bit 0 is set)
        count            varint   (1 .. MAX_EVENTS)
        count times:
            seq          varint   (> 0, strictly increasing within the envelope)
            event_time   varint   (milliseconds since the Unix epoch, device clock)
            length       varint
            payload      length bytes

`decode` checks everything and raises `EnvelopeError` with the reason; it never allocates more
than ``max_body`` bytes, compressed or not (a zstd bomb is refused, not inflated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "FORMAT_BATCH_V1",
    "MAX_EVENTS",
    "Envelope",
    "EnvelopeError",
    "EnvelopeEvent",
    "EnvelopeTooLarge",
    "decode",
    "encode",
    "events_at_most",
    "format_username",
    "parse_username",
]

FORMAT_BATCH_V1 = "batch-v1"
MAGIC = b"MEB"
VERSION = 1
FLAG_ZSTD = 0x01
MAX_EVENTS = 1000
"""Events per envelope. The sink decodes and stores a whole batch of envelopes in one stage call:
with 10,000, one device's batch of 512 envelopes of empty events made 5 million core messages
(1.4 GB, about a minute of storing, every other device's events in that call timed out)."""
MAX_INTEGER = 2**63 - 1
"""The largest value of any field: a signed 64-bit integer, as SQLite and AMQP headers store
seq and event time (a larger one failed the sink's whole batch on the way in)."""
DEFAULT_MAX_BODY = 16 * 1024 * 1024
_HEADER = len(MAGIC) + 2 + 8


class EnvelopeError(ValueError):
    """A malformed envelope; ``reason`` is short and loggable."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed batch envelope: {reason}")
        self.reason = reason


class EnvelopeTooLarge(EnvelopeError):
    """A well-formed envelope whose body (decompressed) is over the receiver's limit: too large
    here, not malformed. Not to be acknowledged: the sender keeps its events (sent alone, they
    may fit), as it keeps a packet over the size limit."""


class EnvelopeEvent(NamedTuple):
    seq: int
    event_time_ms: int
    payload: bytes


class EventLike(Protocol):
    """What `encode` reads of an event (an `EnvelopeEvent`, or the agent's stored event)."""

    @property
    def seq(self) -> int: ...
    @property
    def event_time_ms(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    epoch: str  # 16 hex digits
    events: tuple[EnvelopeEvent, ...]


def _varint(value: int, out: bytearray) -> None:
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode(epoch: str, events: Sequence[EventLike], *, zstd_level: int | None = None) -> bytes:
    """One envelope; ``zstd_level`` compresses the body when that makes it smaller (None:
    uncompressed)."""
    if not 1 <= len(events) <= MAX_EVENTS:
        raise ValueError(f"an envelope holds 1 to {MAX_EVENTS} events, got {len(events)}")
    try:
        epoch_bytes = bytes.fromhex(epoch)
    except ValueError:
        raise ValueError(f"epoch must be 16 hex digits, got {epoch!r}") from None
    if len(epoch_bytes) != 8:
        raise ValueError(f"epoch must be 16 hex digits, got {epoch!r}")
    body = bytearray()
    _varint(len(events), body)
    previous = 0
    append = body.append
    for event in events:
        seq, when, payload = event.seq, event.event_time_ms, event.payload
        if seq <= previous:
            raise ValueError("seq must be positive and strictly increasing within an envelope")
        previous = seq
        # The three varints inline (the hot path of every batch drain).
        while seq >= 0x80:
            append((seq & 0x7F) | 0x80)
            seq >>= 7
        append(seq)
        if not 0 <= when <= MAX_INTEGER:
            raise ValueError(f"event time {when} is outside 0..2**63 - 1")
        while when >= 0x80:
            append((when & 0x7F) | 0x80)
            when >>= 7
        append(when)
        length = len(payload)
        while length >= 0x80:
            append((length & 0x7F) | 0x80)
            length >>= 7
        append(length)
        body += payload
    if previous > MAX_INTEGER:
        raise ValueError(f"seq {previous} is over 2**63 - 1")
    flags = 0
    packed = bytes(body)
    if zstd_level is not None:
        import zstandard

        compressed = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(
            packed
        )
        # Only if smaller: a small or incompressible body came out up to tens of bytes larger,
        # which can take a packet sized to the sink's limit over it.
        if len(compressed) < len(packed):
            packed = compressed
            flags |= FLAG_ZSTD
    return MAGIC + bytes([VERSION, flags]) + epoch_bytes + packed


def decode(data: bytes, *, max_body: int = DEFAULT_MAX_BODY) -> Envelope:
    """Parse and check one envelope; raise `EnvelopeError`."""
    if len(data) < _HEADER:
        raise EnvelopeError(f"{len(data)} bytes is shorter than the {_HEADER}-byte header")
    if data[:3] != MAGIC:
        raise EnvelopeError("bad magic")
    version, flags = data[3], data[4]
    if version != VERSION:
        raise EnvelopeError(f"unsupported version {version}")
    if flags & ~FLAG_ZSTD:
        raise EnvelopeError(f"unknown flags {flags:#04x}")
    epoch = data[5:13].hex()
    body = data[13:]
    if flags & FLAG_ZSTD:
        body = _decompress(body, max_body)
    elif len(body) > max_body:
        raise EnvelopeTooLarge(f"body of {len(body)} bytes is over the limit of {max_body}")
    events = _events(body)
    if events is None:
        _explain(body)  # raises EnvelopeError with the reason
        raise EnvelopeError("malformed body")  # not reached: _explain refuses what _events does
    return Envelope(epoch, tuple(events))


def events_at_most(data: bytes) -> int:
    """An upper bound of the events in envelope ``data``, without decoding it (1 for what is
    not an envelope: it is dead-lettered as one message). Exact for an uncompressed one; for a
    compressed one, what the declared body size could hold (each event takes 3 bytes or more)."""
    if len(data) <= _HEADER or data[:3] != MAGIC:
        return 1
    if data[4] & FLAG_ZSTD:
        import zstandard

        try:
            size = zstandard.get_frame_parameters(data[_HEADER:]).content_size
        except zstandard.ZstdError:
            return 1
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            return 1  # refused as such at decoding
        return max(1, min(MAX_EVENTS, size // 3))
    try:
        count, _ = _varint_at(data, _HEADER)
    except (IndexError, OverflowError):
        return 1
    return max(1, min(MAX_EVENTS, count))


def _events(body: bytes) -> list[EnvelopeEvent] | None:
    """The events of a well-formed body, quickly; None if anything is off (no reasons here)."""
    size = len(body)
    try:
        count, position = _varint_at(body, 0)
        if not 1 <= count <= MAX_EVENTS:
            return None
        events: list[EnvelopeEvent] = []
        append = events.append
        previous = 0
        for _ in range(count):
            seq, position = _varint_at(body, position)
            if seq <= previous:
                return None
            previous = seq
            event_time, position = _varint_at(body, position)
            length, position = _varint_at(body, position)
            end = position + length
            if end > size:
                return None
            append(EnvelopeEvent(seq, event_time, body[position:end]))
            position = end
    except (IndexError, OverflowError):
        return None
    return events if position == size else None


def _varint_at(data: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it; IndexError past the end,
    OverflowError over `MAX_INTEGER`."""
    byte = data[position]
    if byte < 0x80:
        return byte, position + 1
    value = byte & 0x7F
    shift = 7
    while True:
        position += 1
        byte = data[position]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > MAX_INTEGER:
                raise OverflowError
            return value, position + 1
        shift += 7
        if shift > 63:
            raise OverflowError


def _explain(body: bytes) -> None:
    """Walk a body `_events` refused and raise `EnvelopeError` with what is wrong."""
    reader = _Reader(body)
    count = reader.varint("count")
    if not 1 <= count <= MAX_EVENTS:
        raise EnvelopeError(f"event count {count} is outside 1..{MAX_EVENTS}")
    previous = 0
    for index in range(count):
        seq = reader.varint(f"seq of event {index}")
        if seq <= previous:
            raise EnvelopeError(f"seq {seq} of event {index} does not increase")
        previous = seq
        reader.varint(f"event time of event {index}")
        length = reader.varint(f"payload length of event {index}")
        reader.take(length, f"payload of {index}")
    if reader.position != len(body):
        raise EnvelopeError(f"{len(body) - reader.position} bytes after the last event")


def _decompress(body: bytes, max_body: int) -> bytes:
    import zstandard

    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise EnvelopeError(f"not a zstd frame: {exc}") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise EnvelopeError("the zstd frame does not declare its size")
    if size > max_body:
        raise EnvelopeTooLarge(f"compressed body declares {size} bytes; the limit is {max_body}")
    # One frame and nothing after it: a second frame's events would be acknowledged and never
    # forwarded. zstd finds the frame's end itself (walking its block headers in Python cost
    # 0.4 s of the event loop for a packet of empty blocks) and refuses output beyond the
    # declared size.
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = decompressor.decompress(body)
    except zstandard.ZstdError as exc:
        raise EnvelopeError(f"zstd: {exc}") from None
    if not decompressor.eof:
        raise EnvelopeError("the zstd frame is cut short")
    if decompressor.unused_data:
        raise EnvelopeError(f"{len(decompressor.unused_data)} bytes after the zstd frame")
    if len(out) != size:
        raise EnvelopeError(f"the zstd frame declares {size} bytes and holds {len(out)}")
    return bytes(out)


class _Reader:
    __slots__ = ("_data", "position")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.position = 0

    def varint(self, what: str) -> int:
        try:
            value, self.position = _varint_at(self._data, self.position)
        except IndexError:
            raise EnvelopeError(f"{what} runs past the end") from None
        except OverflowError:
            raise EnvelopeError(f"{what} is over 2**63 - 1") from None
        return value

    def take(self, length: int, what: str) -> bytes:
        end = self.position + length
        if end > len(self._data):
            raise EnvelopeError(f"{what} runs past the end")
        chunk = self._data[self.position : end]
        self.position = end
        return chunk


def format_username(device_id: str, **params: str) -> str:
    """The CONNECT user name announcing connection parameters: ``dev-42?format=batch-v1``."""
    return f"{device_id}?{urlencode(sorted(params.items()))}" if params else device_id


def parse_username(username: str) -> tuple[str, dict[str, str]]:
    """Split ``dev-42?format=batch-v1&zstd=1`` into the name and its parameters.

    Raises ValueError for a repeated or empty parameter name.
    """
    name, _, query = username.partition("?")
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if not key or key in params:
            raise ValueError(f"connection parameter {key!r} is empty or repeated")
        params[key] = value
    return name, params
