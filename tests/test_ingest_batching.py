"""The batcher between connections and the durable stage: one call at a time by default, or
several at once, started in arrival order, for a stage that groups events itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from mqtt_ingest import Counters, Identity, IngestEvent, StageRefused
from mqtt_ingest.batching import Batcher, StageFailed


class GatedStage:
    """Records the events of each call when it starts; each call waits for its own gate."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        self.calls.append([e.payload for e in events])  # before the first await, like the buffer
        gate = asyncio.Event()
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        return None

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.calls) < count:
                self.started.clear()
                await self.started.wait()


def event(payload: bytes) -> IngestEvent:
    return IngestEvent(
        identity=Identity("dev"),
        client_id="dev",
        topic="t",
        payload=payload,
        qos=1,
        retain=False,
        received_at=0.0,
    )


def batcher(stage: GatedStage, concurrency: int) -> Batcher:
    return Batcher(stage, Counters(), max_events=2, linger=0, timeout=10, concurrency=concurrency)


@asynccontextmanager
async def feeding(stage: GatedStage, concurrency: int) -> AsyncIterator[Batcher]:
    """A running batcher (at most two events per call), stopped on the way out."""
    running = batcher(stage, concurrency)
    runner = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_concurrent_calls_start_in_arrival_order_without_waiting() -> None:
    stage = GatedStage()
    async with feeding(stage, concurrency=3) as batches:
        futures = [batches.submit(event(b"%d" % i)) for i in range(5)]
        await stage.wait_calls(3)  # the first call is still open while the next ones start
        assert stage.calls == [[b"0", b"1"], [b"2", b"3"], [b"4"]]
        for gate in reversed(stage.gates):
            gate.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*futures)


async def test_calls_beyond_the_concurrency_wait_for_a_free_one() -> None:
    stage = GatedStage()
    async with feeding(stage, concurrency=1) as batches:
        first = batches.submit(event(b"a"))
        await stage.wait_calls(1)
        second = batches.submit(event(b"b"))
        await asyncio.sleep(0.05)
        assert stage.calls == [[b"a"]], "a second call started while the first was open"
        stage.gates[0].set()
        await stage.wait_calls(2)
        stage.gates[1].set()
        async with asyncio.timeout(5):
            await asyncio.gather(first, second)


async def test_stopping_fails_the_calls_still_open() -> None:
    stage = GatedStage()
    batches = batcher(stage, concurrency=2)
    runner = asyncio.create_task(batches.run())
    futures = [batches.submit(event(b"%d" % i)) for i in range(4)]
    await stage.wait_calls(2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    for future in futures:
        with pytest.raises(StageFailed, match="server stopping"):
            await future
    with pytest.raises(StageFailed):
        await batches.submit(event(b"late"))


async def test_close_alone_ends_the_batcher_and_fails_every_call_not_started() -> None:
    """`close()` during the linger sleep was lost (the wakeup was cleared after the take) and
    `run` never ended. With calls in flight, a call created and cancelled before it started
    left its events' futures pending for ever (and `withdraw` skipped them)."""
    lingering = GatedStage()
    batches = Batcher(lingering, Counters(), max_events=10, linger=0.1, timeout=10)
    runner = asyncio.create_task(batches.run())
    waiting = batches.submit(event(b"lingers"))
    await asyncio.sleep(0.02)  # in the linger sleep
    batches.close()
    async with asyncio.timeout(5):
        await runner
    with pytest.raises(StageFailed, match="server stopping"):
        await waiting
    assert lingering.calls == []

    stage = GatedStage()
    batches = batcher(stage, concurrency=2)
    runner = asyncio.create_task(batches.run())
    futures = [batches.submit(event(b"%d" % i)) for i in range(6)]
    await stage.wait_calls(2)  # both calls busy: the batcher waits for a free one
    batches.close()
    for gate in stage.gates:
        gate.set()
    async with asyncio.timeout(5):
        await runner
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[:4] == [None] * 4  # the two calls that ran
    assert all(isinstance(o, StageFailed) for o in outcomes[4:]), outcomes


class CancelSwallowingStage:
    """A call that, cancelled, returns as if it had completed: what Python 3.11's
    ``asyncio.wait_for`` inside aio-pika, nats-py or aiomqtt does when the cancellation lands as
    the call completes."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return None
        raise AssertionError("not reached")


async def test_a_closed_batcher_ends_even_if_the_stage_swallows_the_cancellation() -> None:
    stage = CancelSwallowingStage()
    batches = Batcher(stage, Counters(), max_events=2, linger=0, timeout=60)
    runner = asyncio.create_task(batches.run())
    stored = batches.submit(event(b"in the call"))
    async with asyncio.timeout(5):
        await stage.started.wait()
    batches.close()
    runner.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(runner, return_exceptions=True)
    await stored  # the call returned: its event counts as stored
    with pytest.raises(StageFailed, match="server stopping"):
        await batches.submit(event(b"late"))


class CancelledOnceStage:
    """The first call raises CancelledError without anyone cancelling it: what aiormq's pending
    confirms get when its connection closes (``close(exc=asyncio.CancelledError)``)."""

    def __init__(self) -> None:
        self.calls = 0

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        self.calls += 1
        if self.calls == 1:
            raise asyncio.CancelledError
        return None


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_cancelled_error_from_the_stage_fails_its_call_only(concurrency: int) -> None:
    """The batcher took it for its own cancellation and ended: every event after it was refused
    ("server stopping") until the server was restarted."""
    stage = CancelledOnceStage()
    batches = Batcher(
        stage, Counters(), max_events=2, linger=0, timeout=10, concurrency=concurrency
    )
    runner = asyncio.create_task(batches.run())
    try:
        with pytest.raises(StageFailed, match="cancelled from within"):
            await batches.submit(event(b"first"))
        async with asyncio.timeout(5):
            await batches.submit(event(b"second"))  # stored
        assert (stage.calls, runner.done()) == (2, False)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_weighed_events_bound_each_call_by_weight() -> None:
    """The sink weighs an envelope by its events: a call holds at most ``max_weight`` of them,
    however few MQTT messages that is (always at least one, however heavy)."""
    stage = GatedStage()
    weights = {b"light": 1, b"half": 50, b"heavy": 150}
    batches = Batcher(
        stage, Counters(), max_events=10, linger=0, timeout=10,
        weigh=lambda e: weights[e.payload], max_weight=100,
    )  # fmt: skip
    names = [b"half", b"half", b"half", b"heavy", b"light", b"light", b"half"]
    futures = [batches.submit(event(name)) for name in names]
    futures[1].cancel()  # withdrawn before any call took it: weighs nothing
    runner = asyncio.create_task(batches.run())
    try:
        for call in range(3):
            await stage.wait_calls(call + 1)
            stage.gates[call].set()
        async with asyncio.timeout(5):
            await asyncio.gather(*(f for f in futures if not f.cancelled()))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert stage.calls == [
        [b"half", b"half"],
        [b"heavy"],
        [b"light", b"light", b"half"],
    ]
