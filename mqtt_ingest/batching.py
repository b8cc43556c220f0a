"""Gather events from every connection into batches for the durable stage.

A stage with a per-call round trip (a core queue, an fsync) must not be called once per event. The
batcher takes what connections submit, waits at most ``linger`` after the first event for more, and
hands the stage up to ``max_events`` at a time, one call after another (so the stage sees events in
arrival order), or with ``concurrency`` above 1 up to that many calls at once, started in arrival
order (for a stage that orders and groups events itself). Each submitter gets a future that
resolves once its event is durable, or fails.

Memory is bounded by the callers: every connection holds at most ``max_inflight`` unresolved
futures and the server at most ``max_connections`` connections; a closing connection withdraws
the events no stage call has taken yet (`withdraw`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from mqtt_ingest import failpoints
from mqtt_ingest.lifecycle import being_cancelled
from mqtt_ingest.ports import DurableStage, IngestEvent, Metrics, StageRefused

__all__ = ["Batcher", "StageFailed"]

log = logging.getLogger(__name__)


class StageFailed(Exception):
    """The durable stage did not take this event: it raised, refused it or timed out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Batcher:
    def __init__(
        self,
        stage: DurableStage,
        metrics: Metrics,
        *,
        max_events: int,
        linger: float,
        timeout: float,
        concurrency: int = 1,
        weigh: Callable[[IngestEvent], int] | None = None,
        max_weight: int = 0,
    ) -> None:
        """``weigh`` (with ``max_weight``) bounds a stage call by more than its count of MQTT
        messages: the sink weighs a batch envelope by its events, so that one call never holds
        512 x 1,000 of them (a minute of storing; the stage timeout is 30 s)."""
        self._stage = stage
        self._weigh = weigh
        self._max_weight = max_weight
        self._metrics = metrics
        self._max_events = max_events
        self._linger = linger
        self._timeout = timeout
        self._concurrency = concurrency
        self._pending: deque[tuple[IngestEvent, asyncio.Future[None]]] = deque()
        self._withdrawn = 0
        """About how many entries of `_pending` are withdrawn (compacted past half)."""
        self._in_stage: set[asyncio.Future[None]] = set()
        """The futures of the events in stage calls now: not withdrawn."""
        self._wakeup = asyncio.Event()
        self._closed = False

    def submit(self, event: IngestEvent) -> asyncio.Future[None]:
        """Queue one event; the returned future resolves once the stage has it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(StageFailed("server stopping"))
        else:
            self._pending.append((event, future))
            self._wakeup.set()
        return future

    def withdraw(self, futures: Iterable[asyncio.Future[None]]) -> int:
        """Cancel these futures: their submitter is gone and acknowledges nothing, and the
        events no stage call has taken yet will not be stored. Those in a stage call are left
        to it: they may be stored, and a QoS 2 session kept for the client must know whether
        (cancelled, a stored event was forgotten, and the client's resend stored again).
        Returns how many were withdrawn."""
        in_stage = self._in_stage
        withdrawn = 0
        for future in futures:
            if not future.done() and future not in in_stage:
                future.cancel()
                withdrawn += 1
        self._withdrawn += withdrawn
        if self._withdrawn > len(self._pending) // 2:
            self._pending = deque(entry for entry in self._pending if not entry[1].done())
            self._withdrawn = 0
        return withdrawn

    def close(self) -> None:
        """Take no more events; `run` ends at its next turn, failing what is still queued.

        Call it before cancelling `run`'s task: the stage's call may lose that cancellation. On
        Python 3.11, ``asyncio.wait_for`` (inside aio-pika, aiormq, nats-py and aiomqtt) returns
        the call's result instead of raising when the cancellation lands as the call completes,
        and a loop that relied on the cancellation alone would wait for more events for ever.
        """
        self._closed = True
        self._wakeup.set()

    def _closing(self) -> bool:
        return self._closed  # (a call: mypy keeps the attribute narrowed across awaits)

    async def run(self) -> None:
        """Feed the stage until closed or cancelled, then fail whatever is still queued."""
        running: dict[asyncio.Task[None], list[tuple[IngestEvent, asyncio.Future[None]]]] = {}
        try:
            while True:
                await self._wakeup.wait()
                if self._closed:
                    break
                if len(self._pending) < self._max_events and self._linger > 0:
                    await asyncio.sleep(self._linger)
                while len(running) >= self._concurrency:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if self._closing():  # closed while lingering or waiting for a free call
                    break
                batch = self._take()
                if not self._pending:
                    self._wakeup.clear()
                if not batch:
                    continue
                # In a stage call from here on (`withdraw` leaves them alone), also while a
                # call's task has not started yet.
                self._in_stage.update(future for _, future in batch)
                if self._concurrency == 1:
                    await self._store(batch)
                else:
                    # Tasks start in creation order: the stage sees the calls in arrival order.
                    task = asyncio.create_task(self._store(batch))
                    running[task] = batch
                    task.add_done_callback(running.pop)
        finally:
            self._closed = True
            calls = list(running.items())
            for task, _ in calls:
                task.cancel()  # each fails its own batch: nothing of it was acknowledged
            if calls:
                await asyncio.wait([task for task, _ in calls])
            for _, batch in calls:
                # A task cancelled before it started never ran its body: its batch is failed
                # here, or its futures would wait for ever.
                self._in_stage.difference_update(future for _, future in batch)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StageFailed("server stopping"))
            while self._pending:
                _, future = self._pending.popleft()
                if not future.done():
                    future.set_exception(StageFailed("server stopping"))

    def _take(self) -> list[tuple[IngestEvent, asyncio.Future[None]]]:
        """The next stage call's events: up to ``max_events``, and with ``weigh`` up to
        ``max_weight`` of weight (always at least one event)."""
        pending = self._pending
        if self._weigh is None:
            taken = (pending.popleft() for _ in range(min(self._max_events, len(pending))))
            return [entry for entry in taken if not entry[1].done()]  # done: withdrawn
        batch: list[tuple[IngestEvent, asyncio.Future[None]]] = []
        weight = 0
        while pending and len(batch) < self._max_events:
            event, future = pending[0]
            if future.done():
                pending.popleft()
                continue
            more = self._weigh(event)
            if batch and weight + more > self._max_weight:
                break
            batch.append(pending.popleft())
            weight += more
        return batch

    async def _store(self, batch: Sequence[tuple[IngestEvent, asyncio.Future[None]]]) -> None:
        try:
            await self._store_taken(batch)
        finally:
            self._in_stage.difference_update(future for _, future in batch)

    async def _store_taken(self, batch: Sequence[tuple[IngestEvent, asyncio.Future[None]]]) -> None:
        events = [event for event, _ in batch]
        outcomes: Sequence[StageRefused | None] | None
        try:
            await failpoints.ahit("ingest.before_store")
            async with asyncio.timeout(self._timeout):
                outcomes = await self._stage.store(events)
            await failpoints.ahit("ingest.after_store")
        except TimeoutError:
            self._fail_all(batch, f"stage did not answer within {self._timeout}s")
            return
        except asyncio.CancelledError:
            if being_cancelled():
                self._fail_all(batch, "server stopping")
                raise
            # Raised by the stage, nobody cancelled us (aiormq fails the confirms it awaits with
            # a CancelledError when its connection closes): a failed call, and the batcher goes
            # on. Ending it would refuse every event from then on, until a restart.
            self._fail_all(batch, "stage call cancelled from within")
            return
        except Exception as exc:
            self._fail_all(batch, f"stage failed: {exc!r}")
            return
        if outcomes is not None and len(outcomes) != len(batch):
            self._fail_all(batch, f"stage returned {len(outcomes)} outcomes for {len(batch)}")
            return
        refused = 0
        for index, (_, future) in enumerate(batch):
            outcome = None if outcomes is None else outcomes[index]
            if future.done():
                continue
            if outcome is None:
                future.set_result(None)
            else:
                refused += 1
                future.set_exception(StageFailed(outcome.reason))
        self._metrics.inc("stage_events", len(batch) - refused, "stored")
        if refused:
            self._metrics.inc("stage_events", refused, "refused")
        self._metrics.inc("stage_batches")

    def _fail_all(
        self, batch: Sequence[tuple[IngestEvent, asyncio.Future[None]]], why: str
    ) -> None:
        log.warning("durable stage: batch of %d events failed: %s", len(batch), why)
        self._metrics.inc("stage_events", len(batch), "failed")
        for _, future in batch:
            if not future.done():
                future.set_exception(StageFailed(why))
