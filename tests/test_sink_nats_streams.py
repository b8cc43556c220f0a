"""The NATS core queue's JetStream streams against the real server: a stream that exists before
the sink is checked at open (its subjects, duplicate window, storage, persist mode, ``no_ack`` and
``sealed``) and refused with the reason, or named once if its limits remove unread messages; a
subject prefix that is no subject's start is refused before connecting; a full stream, or none for
the subject, is a refusal; a stream deleted under the sink is created again by the probe, and
another stream over our subjects confirms nothing."""

from __future__ import annotations

import logging
import time

import nats.js.errors
import pytest
from nats.js.api import (
    DiscardPolicy,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cloud_sink.backends.base import BackendError, DeadLetterMessage
from cloud_sink.backends.nats import NatsCoreQueue, subject_covers
from cloud_sink.backends.nats_streams import check_stream, removals
from tests.harness.brokers import NatsNames, nats_connection
from tests.harness.nats_queue import in_flight, open_queue
from tests.harness.sink import core_message


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


def test_subject_covers() -> None:
    assert subject_covers("a.>", "a.>")
    assert subject_covers(">", "a.>")
    assert subject_covers("*.>", "a.>")
    assert subject_covers("a.*.>", "a.b.>")
    assert not subject_covers("a.*", "a.>")
    assert not subject_covers("a.b.>", "a.>")
    assert not subject_covers("b.>", "a.>")
    assert not subject_covers("a", "a.>")


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
    configuration refuses them (tests/test_sink_config.py); so does `open`, before connecting."""
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
