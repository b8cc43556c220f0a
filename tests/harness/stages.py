"""A durable stage for ingest-server tests: keeps events in memory, can be held, refuse or fail.

It implements the `DurableStage` seam the server is built around; the server itself is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mqtt_ingest import Anonymous, Counters, IngestEvent, IngestServer, StageRefused

__all__ = ["Gate", "RecordingStage", "SlowStage", "counters", "running_server", "stage"]


class RecordingStage:
    def __init__(self) -> None:
        self.events: list[IngestEvent] = []
        self.batch_sizes: list[int] = []
        self.calls = 0
        self.failure: Exception | None = None
        self.refuse: Callable[[IngestEvent], str | None] | None = None
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = asyncio.Event()  # set while a call is held

    def hold(self) -> None:
        """Calls from now on wait until `release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        self.calls += 1
        if not self._open.is_set():
            self.waiting.set()
            await self._open.wait()
            self.waiting.clear()
        if self.failure is not None:
            raise self.failure
        outcomes: list[StageRefused | None] = []
        for event in events:
            why = self.refuse(event) if self.refuse is not None else None
            outcomes.append(StageRefused(why) if why else None)
            if not why:
                self.events.append(event)
        self.batch_sizes.append(len(events))
        return outcomes if any(outcomes) else None

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [e.payload for e in self.events if topic is None or e.topic == topic]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the stage holds ``count`` events (QoS 0 events are not acknowledged)."""
        async with asyncio.timeout(timeout):
            while len(self.events) < count:  # noqa: ASYNC110  # polling a plain list
                await asyncio.sleep(0.01)


class SlowStage(RecordingStage):
    """A slow but healthy stage: every call takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.2) -> None:
        super().__init__()
        self.delay = delay

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        await asyncio.sleep(self.delay)
        return await super().store(events)


class Gate:
    """A hand-operated `Availability` gate."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    @property
    def available(self) -> bool:
        return self._open.is_set()

    async def wait_available(self) -> None:
        await self._open.wait()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def stage() -> RecordingStage:
    return RecordingStage()


@asynccontextmanager
async def running_server(stage: RecordingStage, **kwargs: Any) -> AsyncIterator[IngestServer]:
    """An `IngestServer` on an ephemeral loopback port with anonymous access unless overridden."""
    kwargs.setdefault("authenticator", Anonymous())
    async with IngestServer(stage=stage, **kwargs) as server:
        yield server


def counters(server: IngestServer) -> Counters:
    """The server's in-memory counters (the default `Metrics`)."""
    assert isinstance(server.metrics, Counters)
    return server.metrics
