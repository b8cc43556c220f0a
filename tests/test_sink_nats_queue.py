"""The NATS JetStream core queue against the real server: confirmed means PubAck'd, an event id is
stored once within the duplicate window, failures surface as `BackendError` within the timeout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit

import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import (
    DiscardPolicy,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cloud_sink.backends import nats as nats_backend
from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage, PublishOutcome
from cloud_sink.backends.nats import NatsCoreQueue, _event_headers, _header_value, subject_covers
from cloud_sink.backends.nats_batch import read_reply
from cloud_sink.backends.nats_streams import check_stream, removals
from cloud_sink.forward import Forwarder
from mqtt_ingest import Counters, Identity, IngestEvent
from tests.harness.brokers import NatsNames, nats_connection, read_stream
from tests.harness.chaos import ChaosProxy, ChaosProxyFactory, Direction
from tests.harness.report import figures
from tests.harness.sink import core_message

READ_TIMEOUT = 10.0


async def open_queue(
    names: NatsNames, *, url: str | None = None, **options: float
) -> NatsCoreQueue:
    return await NatsCoreQueue.open(
        url=url or names.url,
        stream=names.stream,
        subject_prefix=names.subject_prefix,
        dead_letter_stream=names.dead_letter_stream,
        dead_letter_subject_prefix=names.dead_letter_subject_prefix,
        storage="memory",
        **options,
    )


async def queue_behind_proxy(
    names: NatsNames, factory: ChaosProxyFactory, timeout: float
) -> tuple[NatsCoreQueue, ChaosProxy]:
    """A queue connected to NATS through a fresh chaos proxy."""
    upstream = urlsplit(names.url)
    proxy = await factory(upstream.hostname or "127.0.0.1", upstream.port or 4222)
    queue = await open_queue(names, url=f"nats://127.0.0.1:{proxy.port}", timeout=timeout)
    return queue, proxy


async def publish_once_reconnected(
    queue: NatsCoreQueue, messages: list[CoreMessage], within: float = 10.0
) -> PublishOutcome:
    """Publish ``messages`` again and again until nats-py has reconnected and it goes through."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await queue.publish(messages)
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


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


async def test_existing_stream_is_checked(nats_jetstream: NatsNames) -> None:
    async with nats_connection(nats_jetstream.url) as client:
        jsm = client.jsm(timeout=5)
        await jsm.add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[f"{nats_jetstream.subject_prefix}.other.>"],
                duplicate_window=120,
            )
        )
        with pytest.raises(BackendError, match="do not cover"):
            await open_queue(nats_jetstream)
        await jsm.update_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[f"{nats_jetstream.subject_prefix}.>"],
                duplicate_window=5,
            )
        )
        with pytest.raises(BackendError, match="duplicate window"):
            await open_queue(nats_jetstream)
    # A compatible existing stream is accepted as it is.
    queue = await open_queue(nats_jetstream, duplicate_window=5)
    await queue.aclose()


async def test_an_existing_memory_stream_is_refused_for_file_storage(
    nats_jetstream: NatsNames,
) -> None:
    """A stream created beforehand in memory was taken: a NATS restart then lost every event the
    sink had confirmed (and the devices had deleted)."""
    async with nats_connection(nats_jetstream.url) as client:
        await client.jsm(timeout=5).add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[f"{nats_jetstream.subject_prefix}.>"],
                storage=StorageType.MEMORY,
                duplicate_window=120,
            )
        )
    with pytest.raises(BackendError, match="keeps its messages in memory"):
        await NatsCoreQueue.open(
            url=nats_jetstream.url,
            stream=nats_jetstream.stream,
            subject_prefix=nats_jetstream.subject_prefix,
            dead_letter_stream=nats_jetstream.dead_letter_stream,
            dead_letter_subject_prefix=nats_jetstream.dead_letter_subject_prefix,
            storage="file",
        )


async def test_a_stream_that_removes_unread_messages_is_named_once_with_how(
    nats_jetstream: NatsNames, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream made beforehand with limits that discard the oldest messages (or an age limit)
    removes events the sink confirmed, read or not: accepted, as the platform's retention choice,
    but said at start, once (not at every probe), with the limits. The same limits with
    ``discard: new`` lose nothing (a full stream refuses; `test_stream_full_is_a_refusal`)."""
    async with nats_connection(nats_jetstream.url) as client:
        await client.jsm(timeout=5).add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[f"{nats_jetstream.subject_prefix}.>"],
                storage=StorageType.MEMORY,
                duplicate_window=120,
                max_msgs=1000,
                max_age=3600,
            )
        )
        await client.jsm(timeout=5).add_stream(
            StreamConfig(
                name=nats_jetstream.dead_letter_stream,
                subjects=[f"{nats_jetstream.dead_letter_subject_prefix}.>"],
                storage=StorageType.MEMORY,
                duplicate_window=120,
                max_msgs=1000,
                max_bytes=1 << 20,
                discard=DiscardPolicy.NEW,
            )
        )
    with caplog.at_level(logging.WARNING, logger="cloud_sink.backends.nats"):
        queue = await open_queue(nats_jetstream)
        try:
            await queue.probe()
            await queue.publish([core_message(1)])
        finally:
            await queue.aclose()
    lines = [r.getMessage() for r in caplog.records if "removes messages" in r.getMessage()]
    assert len(lines) == 1
    assert nats_jetstream.stream in lines[0]
    assert "max_msgs 1000 with discard old; max_age 3600s" in lines[0]


@pytest.mark.parametrize(
    ("config", "found"),
    [
        (StreamConfig(), []),
        (StreamConfig(max_msgs=-1, max_bytes=-1, max_age=0, max_msgs_per_subject=-1), []),
        (StreamConfig(max_bytes=10, discard=DiscardPolicy.OLD), ["max_bytes 10 with discard old"]),
        (StreamConfig(max_msgs=5, max_bytes=10, discard=DiscardPolicy.NEW), []),
        (
            StreamConfig(max_msgs_per_subject=3, discard=DiscardPolicy.NEW),
            ["max_msgs_per_subject 3 (the oldest of a subject go)"],
        ),
        (
            StreamConfig(
                max_msgs_per_subject=3, discard=DiscardPolicy.NEW, discard_new_per_subject=True
            ),
            [],
        ),
        (StreamConfig(max_age=60.5, discard=DiscardPolicy.NEW), ["max_age 60.5s"]),
        (
            StreamConfig(retention=RetentionPolicy.INTEREST),
            ["retention interest (what no consumer is interested in goes at once)"],
        ),
        (StreamConfig(retention=RetentionPolicy.WORK_QUEUE), []),  # removed once consumed
    ],
)
def test_what_makes_a_stream_remove_unread_messages(config: StreamConfig, found: list[str]) -> None:
    assert removals(config) == found


def test_a_stream_acknowledging_before_its_disk_is_refused_for_file_storage() -> None:
    """nats-server 2.12's ``persist_mode: async`` sends the PubAck before the write is on disk
    (the server here is older: checked on the stream's configuration as the server returns it)."""
    config = StreamConfig(subjects=["events.>"], duplicate_window=120, storage=StorageType.FILE)
    check_stream("s", config, "events.>", 120, StorageType.FILE)
    config.persist_mode = PersistMode.ASYNC
    with pytest.raises(BackendError, match="persist_mode async"):
        check_stream("s", config, "events.>", 120, StorageType.FILE)
    check_stream("s", config, "events.>", 120, StorageType.MEMORY)  # memory asked for: as asked


async def test_unreachable_server_fails_within_timeout(nats_jetstream: NatsNames) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError, match="cannot connect"):
        await open_queue(nats_jetstream, url="nats://127.0.0.1:1", timeout=2.0)
    assert time.monotonic() - started < 4.0
    queue = await open_queue(nats_jetstream)
    await queue.aclose()
    with pytest.raises(BackendError):
        await queue.publish([core_message(1)])


# nats-py (2.16) does not close the socket of a failed reconnect attempt (here: the proxy accepts
# and hangs up before INFO) before opening the next one; the warning is its leak, not ours.
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
async def test_server_gone_mid_session_fails_within_timeout(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 2.0)
    try:
        assert (await queue.publish([core_message(1)])).stored == 1
        proxy.blackhole()  # silent: the client still believes it is connected
        started = time.monotonic()
        with pytest.raises(BackendError, match="PubAck"):
            await queue.publish([core_message(2), core_message(3)])
        assert time.monotonic() - started < 3.5
        await proxy.close()  # FIN: the client notices and reconnects in the background
        started = time.monotonic()
        with pytest.raises(BackendError):
            await queue.publish([core_message(2), core_message(3)])
        assert time.monotonic() - started < 3.5
        proxy.pass_through()
        # the resend succeeds once reconnected; nothing is stored twice
        outcome = await publish_once_reconnected(queue, [core_message(2), core_message(3)])
        assert outcome.stored + outcome.duplicates == 2
    finally:
        await queue.aclose()
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=3, timeout=READ_TIMEOUT
    )
    assert [m.headers["seq"] for m in stored] == ["1", "2", "3"]


def test_subject_covers() -> None:
    assert subject_covers("a.>", "a.>")
    assert subject_covers(">", "a.>")
    assert subject_covers("*.>", "a.>")
    assert subject_covers("a.*.>", "a.b.>")
    assert not subject_covers("a.*", "a.>")
    assert not subject_covers("a.b.>", "a.>")
    assert not subject_covers("b.>", "a.>")
    assert not subject_covers("a", "a.>")


def in_flight(queue: NatsCoreQueue) -> int:
    """Batches the queue's publisher still tracks (each must go on completion or failure)."""
    return queue._publisher.in_flight


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


async def test_message_over_max_payload_fails_before_sending(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream)
    try:
        limit = queue._client.max_payload
        big = CoreMessage("dev-1/e/2", "dev-1", "devices/dev-1/t", bytes(limit), 1, 2, 2)
        with pytest.raises(BackendError, match="max_payload"):
            await queue.publish([core_message(1), big])
        assert in_flight(queue) == 0
        assert (await queue.publish([core_message(3)])).stored == 1
    finally:
        await queue.aclose()
    # Nothing of the refused batch went out (nor did the server drop the connection).
    [stored] = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=1, timeout=READ_TIMEOUT
    )
    assert stored.headers["seq"] == "3"


async def test_stream_full_is_a_refusal(nats_jetstream: NatsNames) -> None:
    async with nats_connection(nats_jetstream.url) as client:
        await client.jsm(timeout=5).add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[f"{nats_jetstream.subject_prefix}.>"],
                duplicate_window=120,
                max_msgs=2,
                discard=DiscardPolicy.NEW,
            )
        )
    queue = await open_queue(nats_jetstream)
    try:
        with pytest.raises(BackendError, match="refused: maximum messages exceeded"):
            await queue.publish([core_message(s) for s in range(1, 4)])
        assert in_flight(queue) == 0
        assert queue.duplicates == 0
        # The first two were stored: a resend of them is a duplicate, the third still refused.
        with pytest.raises(BackendError, match="refused"):
            await queue.publish([core_message(s) for s in range(1, 4)])
        assert (await queue.publish([core_message(1), core_message(2)])).duplicates == 2
    finally:
        await queue.aclose()


async def test_no_stream_for_the_subject_is_a_refusal(nats_jetstream: NatsNames) -> None:
    queue = await open_queue(nats_jetstream, timeout=5.0)
    try:
        async with nats_connection(nats_jetstream.url) as client:
            await client.jsm(timeout=5).delete_stream(nats_jetstream.stream)
        started = time.monotonic()
        with pytest.raises(BackendError, match="no responders"):
            await queue.publish([core_message(1), core_message(2)])
        assert time.monotonic() - started < 2.0  # the server's answer, not the timeout
        assert in_flight(queue) == 0
    finally:
        await queue.aclose()


async def test_late_pubacks_are_not_counted_for_a_later_batch(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 1.0)
    try:
        proxy.blackhole(direction=Direction.DOWNSTREAM)  # the PubAcks are held, not lost
        with pytest.raises(BackendError, match="PubAck"):
            await queue.publish([core_message(s) for s in range(1, 4)])
        assert in_flight(queue) == 0
        # Events 1-3 are stored; their three PubAcks (not duplicates) arrive while the next batch
        # waits, before its own: they must not complete it nor be counted for it.
        later = asyncio.create_task(queue.publish([core_message(s) for s in range(1, 5)]))
        await asyncio.sleep(0.2)
        proxy.pass_through()
        outcome = await later
        assert (outcome.stored, outcome.duplicates) == (1, 3)
        assert in_flight(queue) == 0
    finally:
        await queue.aclose()


async def test_cancelled_batch_forgets_its_pubacks(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 5.0)
    try:
        proxy.blackhole(direction=Direction.DOWNSTREAM)
        task = asyncio.create_task(queue.publish([core_message(1), core_message(2)]))
        await asyncio.sleep(0.2)
        assert in_flight(queue) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert in_flight(queue) == 0
        proxy.pass_through()
        outcome = await queue.publish([core_message(2), core_message(3)])
        assert (outcome.stored, outcome.duplicates) == (1, 1)
    finally:
        await queue.aclose()


# nats-py's leak of a failed reconnect attempt's socket, as above.
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
async def test_disconnect_while_waiting_fails_at_once(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 10.0)
    try:
        proxy.blackhole()
        started = time.monotonic()
        task = asyncio.create_task(queue.publish([core_message(1), core_message(2)]))
        await asyncio.sleep(0.2)
        await proxy.reset()
        with pytest.raises(BackendError, match="while waiting for PubAcks"):
            await task
        assert time.monotonic() - started < 3.0  # not the 10 s timeout
        assert in_flight(queue) == 0
        proxy.pass_through()
        # once reconnected the resend goes through
        outcome = await publish_once_reconnected(queue, [core_message(1), core_message(2)])
        assert outcome.stored + outcome.duplicates == 2
    finally:
        await queue.aclose()
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=2, timeout=READ_TIMEOUT
    )
    assert [m.headers["seq"] for m in stored] == ["1", "2"]


async def test_a_silently_dead_connection_is_noticed_by_pings(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """No FIN, no RST (NAT state expired, a host gone): nats-py believed itself connected until
    its pings (120 s x 2 by default) went unanswered, and the sink stayed in an outage for ~6
    minutes, past the duplicate window. Pings every `timeout` notice it within ~2-3 x timeout;
    nats-py then reconnects by itself."""
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 1.0)
    try:
        assert (await queue.publish([core_message(1)])).stored == 1
        proxy.blackhole()
        started = time.monotonic()
        while True:  # a probe times out while the client believes itself connected
            with pytest.raises(BackendError) as info:
                await queue.probe()
            if "not connected" in str(info.value):
                break
            assert time.monotonic() - started < 10, "the dead connection was never noticed"
        figures("NATS silent cut noticed", seconds=round(time.monotonic() - started, 1))
        proxy.pass_through()
        outcome = await publish_once_reconnected(queue, [core_message(2)])
        assert outcome.stored == 1
    finally:
        await queue.aclose()


@pytest.mark.parametrize("deleted", ["events", "dead letters"])
async def test_a_stream_deleted_under_the_sink_is_created_again_by_the_probe(
    nats_jetstream: NatsNames, deleted: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe looked at the event stream only: with it deleted the sink stayed down for good,
    with the dead-letter stream deleted every dead letter flapped it. It now checks both and
    creates a missing one again, as at start, and says as an error that what the stream held is
    lost: the devices deleted it once the sink confirmed it."""
    queue = await open_queue(nats_jetstream)
    try:
        name = nats_jetstream.stream if deleted == "events" else nats_jetstream.dead_letter_stream
        async with nats_connection(nats_jetstream.url) as nc:
            await nc.jetstream().delete_stream(name)

        async def write() -> None:
            if deleted == "events":
                await queue.publish([core_message(1)])
            else:
                letter = DeadLetterMessage("dev-1", "devices/dev-1/t", b"x", "test", 1, "dev-1/e/1")
                await queue.dead_letter([letter])

        with pytest.raises(BackendError):
            await write()
        with caplog.at_level(logging.INFO, logger="cloud_sink.backends.nats"):
            await queue.probe()
        await write()
    finally:
        await queue.aclose()
    lines = [r for r in caplog.records if "created again" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.ERROR]
    assert name in lines[0].getMessage()
    assert "lost" in lines[0].getMessage()


@pytest.mark.parametrize("kind", ["events", "dead letters"])
async def test_another_stream_over_our_subjects_is_no_confirm(
    nats_jetstream: NatsNames, kind: str
) -> None:
    """Our stream deleted and another created over its subjects (in memory, say): its PubAcks
    were taken as confirms, and events acknowledged to devices went there. Every message now
    names its stream (Nats-Expected-Stream): the server refuses, the sink goes down."""
    queue = await open_queue(nats_jetstream)
    ours = nats_jetstream.stream if kind == "events" else nats_jetstream.dead_letter_stream
    dead = f"{queue.dead_letter_subject_prefix}.>"
    subjects = nats_jetstream.subjects if kind == "events" else dead
    other = f"{ours}-other"

    async def write() -> None:
        if kind == "events":
            await queue.publish([core_message(1)])
        else:
            await queue.dead_letter(
                [DeadLetterMessage("dev-1", "devices/dev-1/t", b"x", "t", 1, "dev-1/e/2")]
            )

    try:
        async with nats_connection(nats_jetstream.url) as nc:
            js = nc.jetstream()
            await js.delete_stream(ours)
            await js.add_stream(StreamConfig(name=other, subjects=[subjects]))
        with pytest.raises(BackendError, match="refused"):
            await write()
    finally:
        await queue.aclose()
        async with nats_connection(nats_jetstream.url) as nc:
            await nc.jetstream().delete_stream(other)


async def test_a_large_batch_on_a_cut_link_fails_within_the_timeout_and_recovers(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A full stage call (20,000 events, several MB) over a link cut without FIN or RST: past
    nats-py's 2 MiB pending limit its forced flush waited for the socket to drain and swallowed
    our timeout's cancellation, so the publish hung (20 s and more with a 2 s timeout), and
    nats-py's reconnect waited on the unsent bytes too. Now: BackendError within the timeout,
    the stalled connection closed, and once the link is back the resend goes through."""
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 2.0)
    try:
        assert (await queue.publish([core_message(0)])).stored == 1
        batch = [core_message(seq)._replace(payload=b"x" * 200) for seq in range(1, 20_001)]
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(BackendError, match="PubAck"):
            await queue.publish(batch)
        failed_after = time.monotonic() - started
        proxy.pass_through()
        outcome = await publish_once_reconnected(queue, batch, within=30.0)
        recovered_after = time.monotonic() - started
    finally:
        await queue.aclose()
    figures("nats cut link", failed_after=failed_after, recovered_after=recovered_after)
    assert failed_after < 4.0
    assert outcome.stored + outcome.duplicates == 20_000


async def test_a_cancelled_large_batch_ends_at_once_on_a_slow_link(
    nats_jetstream: NatsNames, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A cancellation (the ingest stage timeout, a SIGTERM drain) during nats-py's forced flush
    was swallowed: the call went on for 10 s more. It now ends the call at once."""
    queue, proxy = await queue_behind_proxy(nats_jetstream, chaos_proxy_factory, 10.0)
    try:
        big = [core_message(seq)._replace(payload=b"x" * 100_000) for seq in range(1, 201)]
        proxy.bandwidth(100_000, direction=Direction.UPSTREAM)
        task = asyncio.create_task(queue.publish(big))
        await asyncio.sleep(0.5)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ended_after = time.monotonic() - cancelled_at
    finally:
        proxy.pass_through()
        await queue.aclose()
    assert ended_after < 1.0


async def test_a_client_nats_py_closed_for_good_is_replaced_by_the_probe(
    nats_jetstream: NatsNames,
) -> None:
    """On some server errors on a live connection (an authorization violation after a reload of
    the server's users, an expired user) nats-py closes its client for good: it never
    reconnects, and the sink stayed down until a restart. A relay in front of the server sends
    one such error, then passes traffic through again."""
    upstream = urlsplit(nats_jetstream.url)
    writers: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            upstream.hostname or "127.0.0.1", upstream.port or 4222
        )
        writers.append(writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    queue = await open_queue(nats_jetstream, url=f"nats://127.0.0.1:{port}", timeout=2.0)
    try:
        assert (await queue.publish([core_message(1)])).stored == 1
        for writer in writers:
            writer.write(b"-ERR 'Authorization Violation'\r\n")
            await writer.drain()
            writer.close()
        async with asyncio.timeout(5):
            while not queue._client.is_closed:  # noqa: ASYNC110  # nats-py's own state
                await asyncio.sleep(0.05)
        with pytest.raises(BackendError, match="not connected"):
            await queue.publish([core_message(2)])
        await queue.probe()  # a new client
        assert (await queue.publish([core_message(2)])).stored == 1
    finally:
        await queue.aclose()
        server.close()
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=2, timeout=READ_TIMEOUT
    )
    assert [m.headers["seq"] for m in stored] == ["1", "2"]


def raw_event(device: str, payload: bytes) -> IngestEvent:
    """A raw publish of ``device`` as the ingest server hands it to the forwarder."""
    return IngestEvent(Identity(device, {}), device, f"devices/{device}/t", payload, 1, False, 1.0)


async def test_a_message_over_its_streams_max_msg_size_is_a_refusal(
    nats_jetstream: NatsNames,
) -> None:
    """An existing stream with a ``max_msg_size`` of its own under the server's ``max_payload``:
    `refusal` checked only the latter, JetStream refused the larger event with an error PubAck
    and the whole stage call failed (every other device's events unacked, an outage), at every
    resend of it. `refusal` measures as JetStream does, headers included (nats-server counts
    them: a message of exactly the limit is stored, one byte more refused)."""
    limit = 1024
    await add_limited_stream(nats_jetstream, limit)
    queue = await open_queue(nats_jetstream)
    try:
        fits = core_message(1)
        head = len(_event_headers(fits, nats_jetstream.stream).encode())
        fits = fits._replace(payload=bytes(limit - head))
        over = core_message(2)._replace(payload=bytes(limit - head + 1))
        assert queue.refusal(fits) is None
        assert queue.refusal(over) == (
            f"{limit + 1} bytes with its headers: JetStream stream {nats_jetstream.stream!r}"
            f" takes {limit} (its max_msg_size)"
        )
        assert (await queue.publish([fits])).stored == 1
        with pytest.raises(BackendError, match="message size exceeds maximum allowed"):
            await queue.publish([over])  # what the forwarder no longer hands it
        # Through the forwarder: the large event goes to the dead letters by itself (the
        # dead-letter stream has no such limit), the other device's event is stored.
        forwarder = Forwarder(queue, Counters(), max_body=1024**2)
        big, small = raw_event("big-dev", bytes(4000)), raw_event("other-dev", b"fine")
        assert await forwarder.store([small, big]) is None
    finally:
        await queue.aclose()
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=2, timeout=READ_TIMEOUT
    )
    assert [m.body for m in stored] == [bytes(limit - head), b"fine"]
    [dead] = await read_stream(
        nats_jetstream.url, nats_jetstream.dead_letter_stream, expected=1, timeout=READ_TIMEOUT
    )
    assert dead.headers["device-id"] == "big-dev"
    assert "its max_msg_size" in dead.headers["reason"]


async def test_a_streams_max_msg_size_is_read_again_by_each_probe(
    nats_jetstream: NatsNames,
) -> None:
    """A limit set (or lifted) on a stream while the sink runs: the refused batch is an outage,
    the probe reads the new limit, and the resent event is dead-lettered instead of failing the
    batch again for ever. The dead-letter stream's own limit bounds dead letters."""
    queue = await open_queue(nats_jetstream)
    event = core_message(1)._replace(payload=bytes(2000))
    letter = DeadLetterMessage("dev-1", "devices/dev-1/t", bytes(2000), "why", 1, "dev-1/e/1")
    try:
        assert queue.refusal(event) is None
        assert queue.refusal(letter) is None
        async with nats_connection(nats_jetstream.url) as client:
            jsm = client.jsm(timeout=5)
            for name in nats_jetstream.streams:
                config = (await jsm.stream_info(name)).config
                config.max_msg_size = 1024
                await jsm.update_stream(config)
        with pytest.raises(BackendError, match="message size exceeds maximum allowed"):
            await queue.publish([event])
        await queue.probe()
        assert "JetStream stream" in (queue.refusal(event) or "")
        assert nats_jetstream.dead_letter_stream in (queue.refusal(letter) or "")
        async with nats_connection(nats_jetstream.url) as client:
            jsm = client.jsm(timeout=5)
            config = (await jsm.stream_info(nats_jetstream.stream)).config
            config.max_msg_size = -1
            await jsm.update_stream(config)
        await queue.probe()
        assert queue.refusal(event) is None
        assert (await queue.publish([event])).stored == 1
    finally:
        await queue.aclose()


async def set_max_msg_size(names: NatsNames, stream: str, limit: int) -> None:
    async with nats_connection(names.url) as client:
        jsm = client.jsm(timeout=5)
        config = (await jsm.stream_info(stream)).config
        config.max_msg_size = limit
        await jsm.update_stream(config)


async def stream_messages(names: NatsNames, stream: str) -> int:
    async with nats_connection(names.url) as client:
        return (await client.jsm(timeout=5).stream_info(stream)).state.messages


class BusyDevice:
    """A device whose small events the forwarder stores back to back, as on a busy sink (no
    idle gap: never probed); every call must succeed."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.calls = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            assert await self.forwarder.store([raw_event("busy-dev", b"small")]) is None
            self.calls += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> int:
        """The calls made; raises what a failed one raised."""
        if self._task.done():
            self._task.result()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.calls

    def cancel(self) -> None:
        self._task.cancel()


async def test_a_raised_max_msg_size_is_read_again_before_a_busy_sink_dead_letters(
    nats_jetstream: NatsNames,
) -> None:
    """A busy sink is never probed (`IDLE_PROBE`): a stream's max_msg_size raised while it ran
    was not noticed, and every event between the old and the new limit went to the dead letters
    until a restart or an idle gap. Before one is dead-lettered for the limit, the limit is read
    again (unless that reading is under a second old): the event is stored."""
    limit = 1024
    await add_limited_stream(nats_jetstream, limit)
    queue = await open_queue(nats_jetstream)
    forwarder = Forwarder(queue, Counters(), max_body=1024**2)
    busy = BusyDevice(forwarder)
    try:
        assert "its max_msg_size" in (
            queue.refusal(core_message(1)._replace(payload=bytes(2000))) or ""
        )
        await asyncio.sleep(0.2)
        await set_max_msg_size(nats_jetstream, nats_jetstream.stream, 4 * limit)
        await asyncio.sleep(1.2)  # still busy: not probed; the last reading over a second old
        assert await forwarder.store([raw_event("big-dev", bytes(2000))]) is None
        calls = await busy.stop()
    finally:
        busy.cancel()
        await queue.aclose()
    assert calls > 10
    assert await stream_messages(nats_jetstream, nats_jetstream.dead_letter_stream) == 0
    stored = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=calls + 1, timeout=READ_TIMEOUT
    )
    assert [m.headers["device-id"] for m in stored if len(m.body) == 2000] == ["big-dev"]


async def test_a_lowered_max_msg_size_is_read_by_a_busy_sink_within_the_refresh_period(
    nats_jetstream: NatsNames, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy sink reads its streams' limits again in the background every `_LIMITS_REFRESH`
    seconds (30; here 0.5): a lowered limit is known without a failed batch, and an event over
    it goes to the dead letters (the re-reading before that confirms it)."""
    monkeypatch.setattr(nats_backend, "_LIMITS_REFRESH", 0.5)
    queue = await open_queue(nats_jetstream)
    forwarder = Forwarder(queue, Counters(), max_body=1024**2)
    big = core_message(1)._replace(payload=bytes(2000))
    busy = BusyDevice(forwarder)
    try:
        assert queue.refusal(big) is None
        await set_max_msg_size(nats_jetstream, nats_jetstream.stream, 1024)
        deadline = time.monotonic() + 5.0
        while queue.refusal(big) is None:
            assert time.monotonic() < deadline, "the lowered limit was not read"
            await asyncio.sleep(0.05)
        waited = 5.0 - (deadline - time.monotonic())
        assert await forwarder.store([raw_event("big-dev", bytes(2000))]) is None
        calls = await busy.stop()
    finally:
        busy.cancel()
        await queue.aclose()
    figures("lowered limit read by a busy sink", seconds=round(waited, 2), calls=calls)
    [dead] = await read_stream(
        nats_jetstream.url, nats_jetstream.dead_letter_stream, expected=1, timeout=READ_TIMEOUT
    )
    assert dead.headers["device-id"] == "big-dev"
    assert "its max_msg_size" in dead.headers["reason"]


@pytest.mark.parametrize("setting", ["no_ack", "sealed"])
async def test_a_stream_that_cannot_confirm_is_refused_at_start_and_by_the_probe(
    nats_jetstream: NatsNames, setting: str
) -> None:
    """An existing stream set ``no_ack`` (no PubAck at all) or ``sealed`` (every message
    refused) passed `open` and every probe while every publish failed: the sink went down and
    up again for ever. It is refused with the setting named, as a memory stream is."""
    async with nats_connection(nats_jetstream.url) as client:
        jsm = client.jsm(timeout=5)
        await jsm.add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[nats_jetstream.subjects],
                duplicate_window=120,
                no_ack=setting == "no_ack",
            )
        )
        if setting == "sealed":
            config = (await jsm.stream_info(nats_jetstream.stream)).config
            config.sealed = True
            await jsm.update_stream(config)
    with pytest.raises(BackendError, match=f"{nats_jetstream.stream}' is {setting}"):
        await open_queue(nats_jetstream, timeout=2.0)
    # Set on the dead-letter stream while the sink runs: the probe fails with the reason.
    async with nats_connection(nats_jetstream.url) as client:
        await client.jsm(timeout=5).delete_stream(nats_jetstream.stream)
    queue = await open_queue(nats_jetstream, timeout=2.0)
    try:
        async with nats_connection(nats_jetstream.url) as client:
            jsm = client.jsm(timeout=5)
            config = (await jsm.stream_info(nats_jetstream.dead_letter_stream)).config
            setattr(config, setting, True)
            await jsm.update_stream(config)
        dead = nats_jetstream.dead_letter_stream
        with pytest.raises(BackendError, match=f"{dead}' is {setting}"):
            await queue.probe()
    finally:
        await queue.aclose()


@pytest.mark.parametrize("prefix", ["{p}.*", "{p}.>", "{p}.", "{p} x", "{p}-dlq.events"])
async def test_a_subject_prefix_that_is_no_subjects_start_is_refused_at_open(
    nats_jetstream: NatsNames, prefix: str
) -> None:
    """With a wildcard in the prefix every event's subject was a wildcard subject ("x.*":
    stored on a literal '*' subject; "x.>", "x.": every publish failed with an opaque server
    error), and prefixes that overlap make streams that take each other's subjects. The
    configuration refuses them (tests/test_sink_service.py); so does `open`, before connecting."""
    with pytest.raises(ValueError, match="subject_prefix"):
        await NatsCoreQueue.open(
            url=nats_jetstream.url,
            stream=nats_jetstream.stream,
            subject_prefix=prefix.format(p=nats_jetstream.subject_prefix),
            dead_letter_stream=nats_jetstream.dead_letter_stream,
            dead_letter_subject_prefix=nats_jetstream.dead_letter_subject_prefix,
            storage="memory",
            timeout=2.0,
        )
    async with nats_connection(nats_jetstream.url) as client:
        jsm = client.jsm(timeout=5)
        for name in nats_jetstream.streams:
            with pytest.raises(nats.js.errors.NotFoundError):
                await jsm.stream_info(name)


async def add_limited_stream(nats_jetstream: NatsNames, limit: int) -> None:
    """The test's events stream, made before the sink with a ``max_msg_size`` of its own."""
    async with nats_connection(nats_jetstream.url) as client:
        await client.jsm(timeout=5).add_stream(
            StreamConfig(
                name=nats_jetstream.stream,
                subjects=[nats_jetstream.subjects],
                duplicate_window=120,
                max_msg_size=limit,
            )
        )
