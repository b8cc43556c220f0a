"""The batch envelope (SPEC §3): consecutive events of one topic in one MQTT message.

Used between our agent (encoder) and our sink (decoder) only, and only on a connection that
announced it at CONNECT (`format_username`, `parse_username`): never guessed from the payload.
The format is specified in docs/envelope.md. Both versions share a header::

    magic  b"MEB"        3 bytes
    version              1 byte   (1 or 2: the ``format`` announced, `BATCH_FORMATS`)
    flags                1 byte   (bit 0: body is zstd-compressed; other bits must be 0)
    epoch                8 bytes  (the agent buffer's epoch)
    body:                         (zstd frame of the following when bit 0 is set)

``batch-v1`` (all integers unsigned LEB128 varints of at most 2**63 - 1)::

        count            varint   (1 .. MAX_EVENTS)
        count times:
            seq          varint   (> 0, strictly increasing within the envelope)
            event_time   varint   (milliseconds since the Unix epoch, device clock)
            length       varint
            payload      length bytes

``batch-v2`` (columns of little-endian integers: encoded and decoded by `struct` and
`itertools` in C, about 4 times faster than v1's varints in Python; 10 bytes per event against
v1's 9 to 13, by the seq's size)::

        count            u16      (1 .. MAX_EVENTS)
        widths           u8       (bit 0: seq steps are u64, else u32; bit 1: time steps are
                                   i64, else i32; bit 2: lengths are u32, else u16)
        first seq        u64      (> 0)
        first time       u64      (milliseconds since the Unix epoch, device clock)
        seq steps        (count - 1) x u32/u64: each seq minus the one before, > 0
        time steps       (count - 1) x i32/i64: each event time minus the one before
        lengths          count x u16/u32
        payloads         concatenated, nothing after them

Seqs and event times are at most 2**63 - 1 in both. `decode` checks everything and raises
`EnvelopeError` with the reason; it never allocates more than ``max_body`` bytes, compressed or
not (a zstd bomb is refused, not inflated).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, repeat
from operator import attrgetter, sub
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "BATCH_FORMATS",
    "FORMAT_BATCH_V1",
    "FORMAT_BATCH_V2",
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
FORMAT_BATCH_V2 = "batch-v2"
BATCH_FORMATS = {FORMAT_BATCH_V1: 1, FORMAT_BATCH_V2: 2}
"""The ``format`` a connection announces at CONNECT -> the envelope version it carries."""
MAGIC = b"MEB"
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


def encode(
    epoch: str, events: Sequence[EventLike], *, version: int = 1, zstd_level: int | None = None
) -> bytes:
    """One envelope of ``version`` (1 or 2, `BATCH_FORMATS`); ``zstd_level`` compresses the body
    when that makes it smaller (None: uncompressed)."""
    if not 1 <= len(events) <= MAX_EVENTS:
        raise ValueError(f"an envelope holds 1 to {MAX_EVENTS} events, got {len(events)}")
    if version not in _BODIES:
        raise ValueError(f"envelope version {version} is not one of {sorted(_BODIES)}")
    try:
        epoch_bytes = bytes.fromhex(epoch)
    except ValueError:
        raise ValueError(f"epoch must be 16 hex digits, got {epoch!r}") from None
    if len(epoch_bytes) != 8:
        raise ValueError(f"epoch must be 16 hex digits, got {epoch!r}")
    packed = _BODIES[version](events)
    flags = 0
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
    return MAGIC + bytes([version, flags]) + epoch_bytes + packed


def _body_v1(events: Sequence[EventLike]) -> bytes:
    body = bytearray()
    _varint(len(events), body)
    previous = 0
    append = body.append
    for event in events:
        seq, when, payload = event.seq, event.event_time_ms, event.payload
        if seq <= previous:
            raise ValueError("seq must be positive and strictly increasing within an envelope")
        previous = seq
        # The three varints inline (the hot path of every batch-v1 drain).
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
    return bytes(body)


_HEAD_V2 = struct.Struct("<HBQQ")  # count, widths, first seq, first time
_WIDE_SEQS, _WIDE_TIMES, _WIDE_LENGTHS = 0x01, 0x02, 0x04
_SEQ = attrgetter("seq")
_TIME = attrgetter("event_time_ms")
_PAYLOAD = attrgetter("payload")
_new_event = tuple.__new__  # EnvelopeEvent from a 3-tuple, in C (its __new__ is Python)


@lru_cache(maxsize=128)
def _columns(count: int, widths: int) -> struct.Struct:
    """The columns of a v2 body of ``count`` events after its head (seq steps, time steps,
    lengths)."""
    steps = count - 1
    seq = "Q" if widths & _WIDE_SEQS else "I"
    time = "q" if widths & _WIDE_TIMES else "i"
    length = "I" if widths & _WIDE_LENGTHS else "H"
    return struct.Struct(f"<{steps}{seq}{steps}{time}{count}{length}")


def _body_v2(events: Sequence[EventLike]) -> bytes:
    # Every step in C (map, attrgetter, struct): no Python code runs per event.
    seqs = list(map(_SEQ, events))
    times = list(map(_TIME, events))
    payloads = list(map(_PAYLOAD, events))
    lengths = list(map(len, payloads))
    seq_steps = list(map(sub, seqs[1:], seqs))
    time_steps = list(map(sub, times[1:], times))
    if seqs[0] <= 0 or (seq_steps and min(seq_steps) <= 0):
        raise ValueError("seq must be positive and strictly increasing within an envelope")
    if seqs[-1] > MAX_INTEGER:
        raise ValueError(f"seq {seqs[-1]} is over 2**63 - 1")
    if min(times) < 0 or max(times) > MAX_INTEGER:
        when = next(t for t in times if not 0 <= t <= MAX_INTEGER)
        raise ValueError(f"event time {when} is outside 0..2**63 - 1")
    widths = 0
    if seq_steps and max(seq_steps) > 0xFFFFFFFF:
        widths |= _WIDE_SEQS
    if time_steps and (min(time_steps) < -(2**31) or max(time_steps) >= 2**31):
        widths |= _WIDE_TIMES
    if max(lengths) > 0xFFFF:
        widths |= _WIDE_LENGTHS
    head = _HEAD_V2.pack(len(seqs), widths, seqs[0], times[0])
    columns = _columns(len(seqs), widths).pack(*seq_steps, *time_steps, *lengths)
    return b"".join([head, columns, *payloads])


def decode(
    data: bytes, *, max_body: int = DEFAULT_MAX_BODY, version: int | None = None
) -> Envelope:
    """Parse and check one envelope, of ``version`` if given (the connection's announced
    format, `BATCH_FORMATS`; None: any known version); raise `EnvelopeError`."""
    if len(data) < _HEADER:
        raise EnvelopeError(f"{len(data)} bytes is shorter than the {_HEADER}-byte header")
    if data[:3] != MAGIC:
        raise EnvelopeError("bad magic")
    found, flags = data[3], data[4]
    if found not in _BODIES:
        raise EnvelopeError(f"unsupported version {found}")
    if version is not None and found != version:
        raise EnvelopeError(f"version {found} on a connection that announced version {version}")
    if flags & ~FLAG_ZSTD:
        raise EnvelopeError(f"unknown flags {flags:#04x}")
    epoch = data[5:13].hex()
    body = data[13:]
    if flags & FLAG_ZSTD:
        body = _decompress(body, max_body)
    elif len(body) > max_body:
        raise EnvelopeTooLarge(f"body of {len(body)} bytes is over the limit of {max_body}")
    if found == 2:
        return Envelope(epoch, tuple(_events_v2(body)))
    events = _events_v1(body)
    if events is None:
        _explain_v1(body)  # raises EnvelopeError with the reason
        raise EnvelopeError(
            "malformed body"
        )  # not reached: _explain_v1 refuses what _events_v1 does
    return Envelope(epoch, tuple(events))


def _events_v2(body: bytes) -> list[EnvelopeEvent]:
    """The events of a v2 body; `EnvelopeError` with the reason if anything is off."""
    size = len(body)
    if size < _HEAD_V2.size:
        raise EnvelopeError(f"body of {size} bytes is shorter than its {_HEAD_V2.size}-byte head")
    count, widths, first_seq, first_time = _HEAD_V2.unpack_from(body)
    if not 1 <= count <= MAX_EVENTS:
        raise EnvelopeError(f"event count {count} is outside 1..{MAX_EVENTS}")
    if widths & ~(_WIDE_SEQS | _WIDE_TIMES | _WIDE_LENGTHS):
        raise EnvelopeError(f"unknown width bits {widths:#04x}")
    columns = _columns(count, widths)
    start = _HEAD_V2.size + columns.size
    if start > size:
        raise EnvelopeError(f"the columns of {count} events run past the end")
    values = columns.unpack_from(body, _HEAD_V2.size)
    steps = count - 1
    seqs = list(accumulate(values[:steps], initial=first_seq))
    times = list(accumulate(values[steps : 2 * steps], initial=first_time))
    offsets = list(accumulate(values[2 * steps :], initial=start))
    if (
        first_seq == 0
        or (steps and min(values[:steps]) == 0)
        or seqs[-1] > MAX_INTEGER
        or min(times) < 0
        or max(times) > MAX_INTEGER
        or offsets[-1] != size
    ):
        _explain_v2(seqs, times, offsets, size)
    payloads = map(body.__getitem__, map(slice, offsets, offsets[1:]))
    return list(map(_new_event, repeat(EnvelopeEvent), zip(seqs, times, payloads, strict=True)))


def _explain_v2(seqs: list[int], times: list[int], offsets: list[int], size: int) -> None:
    """Raise `EnvelopeError` with what is wrong with the v2 body `_events_v2` refused, naming
    the first event at fault (checked in the order v1 reads its fields)."""
    previous = 0
    for index, (seq, when) in enumerate(zip(seqs, times, strict=True)):
        if seq <= previous:
            raise EnvelopeError(f"seq {seq} of event {index} does not increase")
        if seq > MAX_INTEGER:
            raise EnvelopeError(f"seq of event {index} is over 2**63 - 1")
        previous = seq
        if not 0 <= when <= MAX_INTEGER:
            raise EnvelopeError(f"event time of event {index} is outside 0..2**63 - 1")
        if offsets[index + 1] > size:
            raise EnvelopeError(f"payload of {index} runs past the end")
    raise EnvelopeError(f"{size - offsets[-1]} bytes after the last event")


_BODIES = {1: _body_v1, 2: _body_v2}


def events_at_most(data: bytes) -> int:
    """An upper bound of the events in envelope ``data``, without decoding it (1 for what is
    not an envelope: it is dead-lettered as one message). Exact for an uncompressed one; for a
    compressed one, what the declared body size could hold (each event takes 3 bytes or more in
    v1, 10 or more in v2)."""
    if len(data) <= _HEADER or data[:3] != MAGIC or data[3] not in _BODIES:
        return 1
    least = 3 if data[3] == 1 else 10
    if data[4] & FLAG_ZSTD:
        import zstandard

        try:
            size = zstandard.get_frame_parameters(data[_HEADER:]).content_size
        except zstandard.ZstdError:
            return 1
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            return 1  # refused as such at decoding
        return max(1, min(MAX_EVENTS, size // least))
    if data[3] == 2:
        if len(data) < _HEADER + 2:
            return 1
        return max(1, min(MAX_EVENTS, int.from_bytes(data[_HEADER : _HEADER + 2], "little")))
    try:
        count, _ = _varint_at(data, _HEADER)
    except (IndexError, OverflowError):
        return 1
    return max(1, min(MAX_EVENTS, count))


def _events_v1(body: bytes) -> list[EnvelopeEvent] | None:
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


def _explain_v1(body: bytes) -> None:
    """Walk a body `_events_v1` refused and raise `EnvelopeError` with what is wrong."""
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
