"""Message size limits of the NATS core queue against the real server: a message over the server's
``max_payload`` fails its batch before sending; one over a stream's own ``max_msg_size`` (headers
counted, as JetStream counts them) is a refusal the forwarder dead-letters alone; and the limit is
read again by each probe, before a busy sink dead-letters for it, and in the background every
`_LIMITS_REFRESH` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from nats.js.api import StreamConfig

from cloud_sink.backends import nats as nats_backend
from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage
from cloud_sink.backends.nats import _event_headers
from cloud_sink.forward import Forwarder
from mqtt_ingest import Counters, Identity, IngestEvent
from tests.harness.brokers import NatsNames, nats_connection, read_stream
from tests.harness.nats_queue import READ_TIMEOUT, in_flight, open_queue
from tests.harness.report import figures
from tests.harness.sink import core_message


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
