"""AMQP 0-9-1 frames of one ``basic.publish``: the content header of an event and the body
frames written here, without pamqp's generic marshalling.

pamqp encodes every property and header-table value through a chain of type lookups; for the
sink's fixed content-header shape (persistent, a message id, the seven metadata headers of
SPEC §3) that was the largest part of the sink's CPU per event with RabbitMQ
(docs/benchmarks.md, "Sink"). The bytes here are exactly pamqp's (tests compare them): the
header table in pamqp's order (keys sorted) and with pamqp's choice of integer type (the
smallest that holds the value), strings as long strings, the flags of the properties present.
The method frame, the same for every message of a routing key, is still pamqp's.
"""

from __future__ import annotations

import struct

import pamqp.frame
from pamqp.commands import Basic

from cloud_sink.backends.base import CoreMessage

__all__ = ["MAX_SHORT_STRING_BYTES", "event_properties", "publish_frames", "publish_method"]

MAX_SHORT_STRING_BYTES = 255

_FRAME_END = b"\xce"
# The property flags (AMQP 0-9-1 basic class): headers, delivery-mode and message-id present.
_EVENT_FLAGS = (1 << 13) | (1 << 12) | (1 << 7)
_PERSISTENT = b"\x02"
_HEADER = struct.Struct(">BHIHHQ")  # content header frame header, class 60, weight 0, body size
_BODY = struct.Struct(">BHI")  # content body frame header
_U32 = struct.Struct(">I")
_FLAGS_AND_TABLE_SIZE = struct.Struct(">HI")

# pamqp's `encode.table_integer`: the first type whose range holds the value.
_INTEGER_TYPES = (
    (-(2**7), 2**7 - 1, b"b", struct.Struct(">b")),
    (-(2**15), 2**15 - 1, b"s", struct.Struct(">h")),
    (0, 2**16 - 1, b"u", struct.Struct(">H")),
    (-(2**31), 2**31 - 1, b"I", struct.Struct(">i")),
    (0, 2**32 - 1, b"i", struct.Struct(">I")),
    (-(2**63), 2**63 - 1, b"l", struct.Struct(">q")),
)
_LONG = struct.Struct(">q")


def _short_string(value: str, what: str) -> bytes:
    encoded = value.encode("utf-8")
    if len(encoded) > MAX_SHORT_STRING_BYTES:
        raise ValueError(f"{what} over {MAX_SHORT_STRING_BYTES} bytes: {value[:64]!r}...")
    return bytes((len(encoded),)) + encoded


def _integer(value: int) -> bytes:
    # Millisecond timestamps (the common case) are 'l'; skip the smaller types for them.
    if value > 2**32 - 1 and value <= 2**63 - 1:
        return b"l" + _LONG.pack(value)
    for low, high, tag, packer in _INTEGER_TYPES:
        if low <= value <= high:
            return tag + packer.pack(value)
    raise ValueError(f"header integer out of range: {value}")


def event_properties(m: CoreMessage, message_id: str) -> bytes:
    """The basic properties of an event as a content header carries them: persistent,
    ``message_id``, and the metadata headers (`event-id`, `device-id`, `topic`, `seq`,
    `event-time`, `received-at`, `qos`; `seq` and `event-time` only when set).

    The same bytes as pamqp's ``Basic.Properties(headers=..., message_id=message_id,
    delivery_mode=2).marshal()``; ``ValueError`` if ``message_id`` is empty or over 255 bytes,
    or an integer does not fit 64 bits.
    """
    if not message_id:
        raise ValueError("message id is empty")
    event_id = m.event_id.encode("utf-8")
    device_id = m.device_id.encode("utf-8")
    topic = m.topic.encode("utf-8")
    # Keys in sorted order, as pamqp writes them.
    parts = [b"\x09device-idS", _U32.pack(len(device_id)), device_id]
    parts += (b"\x08event-idS", _U32.pack(len(event_id)), event_id)
    if m.event_time_ms is not None:
        parts += (b"\x0aevent-time", _integer(m.event_time_ms))
    parts += (b"\x03qos", _integer(m.qos), b"\x0breceived-at", _integer(m.received_at_ms))
    if m.seq is not None:
        parts += (b"\x03seq", _integer(m.seq))
    parts += (b"\x05topicS", _U32.pack(len(topic)), topic)
    table = b"".join(parts)
    return b"".join(
        (
            _FLAGS_AND_TABLE_SIZE.pack(_EVENT_FLAGS, len(table)),
            table,
            _PERSISTENT,
            _short_string(message_id, "message id"),
        )
    )


def publish_method(channel: int, exchange: str, routing_key: str) -> bytes:
    """The ``basic.publish`` method frame, ``mandatory`` set: marshalled by pamqp, which also
    checks the names (``ValueError``; ``TypeError`` for a routing key over 255 bytes). Once per
    routing key and batch, so its cost does not matter."""
    method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    return pamqp.frame.marshal(method, channel)


def publish_frames(
    out: list[bytes],
    channel: int,
    method: bytes,
    properties: bytes,
    body: bytes,
    max_content: int,
) -> None:
    """Append to ``out`` the frames of one publish: ``method`` (from `publish_method`), the
    content header with ``properties`` (marshalled basic properties), then ``body`` in content
    frames of at most ``max_content`` bytes (none for an empty body)."""
    out += (
        method,
        _HEADER.pack(2, channel, 12 + len(properties), 60, 0, len(body)),
        properties,
        _FRAME_END,
    )
    if len(body) <= max_content:
        if body:
            out += (_BODY.pack(3, channel, len(body)), body, _FRAME_END)
        return
    for at in range(0, len(body), max_content):
        chunk = body[at : at + max_content]
        out += (_BODY.pack(3, channel, len(chunk)), chunk, _FRAME_END)
