"""The hand-written AMQP publish frames (cloud_sink/backends/amqp_wire.py): byte for byte what
pamqp writes, for the event properties (integers at every width's edge, optional headers, non-ASCII
and long strings), the publish method and the content header and body frames; and refused where
pamqp refuses."""

from __future__ import annotations

import pytest
from aio_pika.abc import FieldValue
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from cloud_sink.backends.amqp_wire import event_properties, publish_frames, publish_method
from cloud_sink.backends.base import CoreMessage
from tests.harness.sink import core_message

_INTEGERS = [0, 1, -1, 127, 128, -128, -129, 32_767, 32_768, -32_768, -32_769, 65_535, 65_536]
_INTEGERS += [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]
_INTEGERS += [1_700_000_000_000]


def pamqp_properties(m: CoreMessage, message_id: str) -> Basic.Properties:
    """The properties the backend gave pamqp before it wrote its own (and a consumer reads)."""
    headers: dict[str, FieldValue] = {
        "event-id": m.event_id,
        "device-id": m.device_id,
        "topic": m.topic,
        "received-at": m.received_at_ms,
        "qos": m.qos,
    }
    if m.seq is not None:
        headers["seq"] = m.seq
    if m.event_time_ms is not None:
        headers["event-time"] = m.event_time_ms
    return Basic.Properties(headers=headers, message_id=message_id, delivery_mode=2)


@pytest.mark.parametrize("value", _INTEGERS)
@pytest.mark.parametrize("optional", ["absent", "seq", "event-time", "both"])
def test_event_properties_are_pamqps_bytes(value: int, optional: str) -> None:
    m = CoreMessage(
        event_id=f"dév-ü/epoch/{value}",
        device_id="dév-ü" * 40,  # non-ASCII, table strings over 255 bytes
        topic="devices/dév-ü/" + "level/" * 60,
        payload=b"x",
        qos=value if optional == "absent" else 1,
        received_at_ms=value,
        seq=value if optional in ("seq", "both") else None,
        event_time_ms=value if optional in ("event-time", "both") else None,
    )
    ours = event_properties(m, m.event_id)
    assert ours == pamqp_properties(m, m.event_id).marshal()
    # and a consumer reads back what it always did
    decoded = Basic.Properties()
    decoded.unmarshal(int.from_bytes(ours[:2], "big"), ours[2:])
    assert decoded == pamqp_properties(m, m.event_id)


def test_event_properties_refuse_what_pamqp_refuses() -> None:
    m = core_message(1)
    with pytest.raises(ValueError, match="message id"):
        event_properties(m, "é" * 128)  # 256 bytes
    assert event_properties(m, "é" * 127 + "e") == pamqp_properties(m, "é" * 127 + "e").marshal()
    with pytest.raises(ValueError, match="empty"):
        event_properties(m, "")
    with pytest.raises(ValueError, match="out of range"):
        event_properties(m._replace(seq=2**63), m.event_id)


@pytest.mark.parametrize("size", [0, 1, 200, 131_063, 131_064, 131_065, 3 * 131_064 + 5])
def test_publish_frames_are_pamqps_bytes(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    m = core_message(7)
    max_content = 131_064  # frame_max 131072 less a frame's 8 bytes of envelope
    properties = pamqp_properties(m, m.event_id)
    expected = ChannelFrame.marshall(
        5,
        [
            Basic.Publish(exchange="ex.ch:1-_", routing_key="devices.dév.t", mandatory=True),
            ContentHeader(properties=properties, body_size=len(body)),
            *[ContentBody(body[at : at + max_content]) for at in range(0, size, max_content)],
        ],
    ).payload
    out: list[bytes] = []
    method = publish_method(5, "ex.ch:1-_", "devices.dév.t")
    publish_frames(out, 5, method, event_properties(m, m.event_id), body, max_content)
    assert b"".join(out) == expected


def test_publish_method_refuses_what_pamqp_refuses() -> None:
    with pytest.raises(ValueError, match="exchange"):
        publish_method(1, "e" * 128, "k")
    with pytest.raises(ValueError, match="exchange"):
        publish_method(1, "é", "k")
    with pytest.raises(TypeError, match="exceeds maximum length"):
        publish_method(1, "ex", "k" * 256)
