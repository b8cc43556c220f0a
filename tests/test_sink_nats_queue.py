"""The NATS JetStream core queue's publish path against the real server: confirmed means PubAck'd;
events are stored in order with their headers (the same ones nats-py would write); an event id is
stored once within the duplicate window and again after it, never lost (RELIABILITY F10); raw
events and dead letters; concurrent and large batches; the PubAck replies as read. The streams'
checks are in tests/test_sink_nats_streams.py, message size limits in
tests/test_sink_nats_size_limits.py, failures of the server or the link in
tests/test_sink_nats_faults.py."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from cloud_sink.backends.base import CoreMessage, DeadLetterMessage
from cloud_sink.backends.nats import _header_value
from cloud_sink.backends.nats_batch import read_reply
from tests.harness.brokers import NatsNames, nats_connection, read_stream
from tests.harness.nats_queue import READ_TIMEOUT, in_flight, open_queue
from tests.harness.report import figures
from tests.harness.sink import core_message


async def test_publish_stores_in_order_with_headers(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream)
    try:
        outcome = await queue.publish([core_message(s) for s in range(1, 21)])
    finally:
        await queue.aclose()
    assert (outcome.stored, outcome.duplicates) == (20, 0)
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=20, timeout=READ_TIMEOUT
    )
    assert [m.body for m in stored] == [f"p{s}".encode() for s in range(1, 21)]
    first = stored[0]
    assert first.subject == f"{nats_jetstream.subject_prefix}.devices.dev-1.t"
    assert first.msg_id == "dev-1/00112233aabbccdd/1"
    assert {k: v for k, v in first.headers.items() if k != "Nats-Msg-Id"} == {
        "Nats-Expected-Stream": nats_jetstream.stream,  # refused by any other stream
        "event-id": "dev-1/00112233aabbccdd/1",
        "device-id": "dev-1",
        "topic": "devices/dev-1/t",
        "seq": "1",
        "event-time": "1699999999001",
        "received-at": "1700000000001",
        "qos": "1",
    }


async def test_resent_event_ids_are_counted_not_stored(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream)
    try:
        first = await queue.publish([core_message(1), core_message(2), core_message(3)])
        again = await queue.publish([core_message(2), core_message(3), core_message(4)])
        assert queue.duplicates == 2
    finally:
        await queue.aclose()
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=4, timeout=READ_TIMEOUT
    )
    assert [m.headers["seq"] for m in stored] == ["1", "2", "3", "4"]
    async with nats_connection(nats_jetstream.url) as client:
        info = await client.jsm(timeout=5).stream_info(nats_jetstream.stream)
    assert info.state.messages == 4


async def test_a_resend_after_the_duplicate_window_is_stored_again_never_lost(
    nats_jetstream: NatsNames,
) -> None:
    """RELIABILITY F10, as docs/operations.md documents it: within `duplicate_window` a resend
    is a counted duplicate; after it, the resend is stored a second time (with the same
    event id, for consumers to dedupe); nothing is lost either way."""
    queue = await open_queue(nats_jetstream, duplicate_window=1)
    try:
        first = await queue.publish([core_message(1), core_message(2), core_message(3)])
        within = await queue.publish([core_message(3)])
        await asyncio.sleep(1.5)
        after = await queue.publish([core_message(2), core_message(3), core_message(4)])
    finally:
        await queue.aclose()
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=6, timeout=READ_TIMEOUT
    )
    ids = [m.headers["event-id"] for m in stored]
    figures("replay after the window", stored=len(stored), distinct=len(set(ids)))
    assert (first.stored, within.duplicates, after.stored, after.duplicates) == (3, 1, 3, 0)
    assert [m.headers["seq"] for m in stored] == ["1", "2", "3", "2", "3", "4"]
    assert {m.msg_id for m in stored} == {f"dev-1/00112233aabbccdd/{s}" for s in range(1, 5)}


async def test_raw_publish_and_dead_letters(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream)
    raw = CoreMessage("sink-abc", "dev-2", "devices/dev-2/x", b"\x00raw\xff", 0, 1)
    bad = DeadLetterMessage(
        "dev.2", "devices/dev.2/a.b", b"\x00", "topic level 'a.b'\r\n!", 5, "dev.2/e/1"
    )
    try:
        await queue.publish([raw])
        await queue.dead_letter([bad])
        await queue.dead_letter([bad])  # the device's resend: the same letter id
    finally:
        await queue.aclose()
    [stored] = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=1, timeout=READ_TIMEOUT
    )
    assert stored.body == b"\x00raw\xff"
    assert stored.msg_id == "sink-abc"
    assert "seq" not in stored.headers
    assert "event-time" not in stored.headers
    assert (stored.headers["qos"], stored.headers["received-at"]) == ("0", "1")
    [dead] = await read_stream(
        nats_jetstream.url, nats_jetstream.dead_letter_stream, expected=1, timeout=READ_TIMEOUT
    )
    assert dead.subject == f"{nats_jetstream.dead_letter_subject_prefix}.dev%2E2"
    assert dead.body == b"\x00"
    assert dead.headers["reason"] == "topic level 'a.b'  !"
    assert dead.headers["device-id"] == "dev.2"
    assert dead.headers["topic"] == "devices/dev.2/a.b"
    assert dead.headers["received-at"] == "5"
    assert (dead.msg_id, dead.headers["letter-id"]) == ("dev.2/e/1", "dev.2/e/1")


async def test_concurrent_batches_from_many_devices(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream)
    try:
        outcomes = await asyncio.gather(
            *(queue.publish([core_message(s, f"dev-{d}") for s in range(1, 51)]) for d in range(10))
        )
    finally:
        await queue.aclose()
    assert sum(o.stored for o in outcomes) == 500
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=500, timeout=READ_TIMEOUT
    )
    for d in range(10):
        seqs = [int(m.headers["seq"]) for m in stored if m.headers["device-id"] == f"dev-{d}"]
        assert seqs == list(range(1, 51))


async def test_headers_as_nats_py_writes_them(nats_jetstream: NatsNames) -> None:
    # Values nats-py would strip and clean; an independent consumer must read the same headers
    # whether nats-py or our batch publisher wrote them.
    odd = CoreMessage(" dév-1/ép\r\n/1 ", "dév-1", "devices/dév-1/t", b"x", 2, 7, 1, None)
    queue = await open_queue(nats_jetstream)
    try:
        await queue.publish([odd])
    finally:
        await queue.aclose()
    async with nats_connection(nats_jetstream.url) as client:
        await client.jetstream(timeout=5).publish(
            f"{nats_jetstream.subject_prefix}.devices.dév-1.t",
            b"x",
            headers={
                "Nats-Msg-Id": "other",
                "Nats-Expected-Stream": nats_jetstream.stream,
                "event-id": odd.event_id,
                "device-id": odd.device_id,
                "topic": odd.topic,
                "seq": "1",
                "received-at": "7",
                "qos": "2",
            },
        )
    ours, theirs = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=2, timeout=READ_TIMEOUT
    )
    assert ours.msg_id == "dév-1/ép  /1"
    assert ours.subject == theirs.subject
    assert {**ours.headers, "Nats-Msg-Id": "other"} == theirs.headers
    assert ours.headers["event-id"] == "dév-1/ép  /1"


@given(st.text())
def test_header_value_is_nats_py_cleaning(value: str) -> None:
    assert _header_value(value) == value.strip().translate({13: " ", 10: " "})


def test_read_reply() -> None:
    assert read_reply(b'{"stream":"s","seq":3}', None) == (None, False)
    assert read_reply(b'{"stream":"s", "seq":3, "duplicate": true}', None) == (None, True)
    assert read_reply(b'{"stream":"error","seq":3}', None) == (None, False)
    refusal, _ = read_reply(
        b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
        None,
    )
    assert refusal is not None
    assert "maximum messages exceeded" in refusal
    assert "no responders" in str(read_reply(b"", b"NATS/1.0 503\r\n\r\n")[0])
    assert read_reply(b"[]", None)[0] is not None
    assert read_reply(b"{", None)[0] is not None
    assert read_reply(b'{"stream":"s"}', None)[0] is not None


async def test_large_batch_in_order(nats_jetstream: NatsNames) -> None:
    # 3,000 events of 1 kB: one batch far beyond nats-py's 2 MB pending buffer and the server's
    # max_payload, which limits each message, not the batch.
    messages = [
        CoreMessage(f"dev-1/e/{s}", "dev-1", "devices/dev-1/t", b"%05d" % s + bytes(1019), 1, s, s)
        for s in range(1, 3001)
    ]
    queue = await open_queue(nats_jetstream)
    try:
        outcome = await queue.publish(messages)
        assert in_flight(queue) == 0
    finally:
        await queue.aclose()
    assert (outcome.stored, outcome.duplicates) == (3000, 0)
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=3000, timeout=READ_TIMEOUT
    )
    assert [int(m.body[:5]) for m in stored] == list(range(1, 3001))
