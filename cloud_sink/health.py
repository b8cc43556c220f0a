"""The core queue's health: one outage state for the whole sink, and the task that ends it (F9).

`BackendGuard` wraps the configured `CoreQueue` and is what the forwarder publishes through. The
first `BackendError` turns the state to ``DOWN`` (one log line) and from then on:

- publishes fail at once, without touching the backend (their events are not acknowledged; the
  devices still hold them and send them again);
- the guard, being the ingest server's `Availability` gate, makes the server stop reading every
  connection and refuse new CONNECTs with CONNACK 3 "server unavailable";
- one background task (`run`) probes the backend with exponential backoff and full jitter
  (``uniform(0, min(cap, initial * 2**attempt))``), so N sink instances do not hammer a recovering
  broker in step. The first successful probe turns the state back to ``UP`` (one log line) and
  the server reads and accepts again.

While it is up and nothing was confirmed (published or dead-lettered) for `IDLE_PROBE` seconds (an
idle sink), the same task probes the backend, so that readiness stops saying "ready" for a core
queue that went away while nothing was published to it. A failed probe is an outage like a failed
publish.

A slow backend is not an outage: as long as it confirms within its own timeout, the forwarder just
waits, the connections reach their in-flight limit and stop reading (TCP backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Sequence

from cloud_sink.backends.base import (
    BackendError,
    CoreMessage,
    CoreQueue,
    DeadLetterMessage,
    PublishOutcome,
)
from mqtt_ingest import Metrics
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.lifecycle import being_cancelled

__all__ = ["BackendDown", "BackendGuard", "BackendState", "Backoff"]

log = logging.getLogger(__name__)


class BackendState(enum.Enum):
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


IDLE_PROBE = 10.0
"""Seconds without a confirmed publish after which a backend that is up is probed."""
FLAP_WINDOW = 60.0
"""An outage that begins within this many seconds of the previous one's end continues that one's
backoff instead of starting it over."""


class BackendDown(BackendError):
    """A call the guard refused without asking the backend: the core queue is down (or closed).
    Not a backend error of its own, so `cloud_sink_core_queue_errors_total` leaves it out."""


class BackendGuard:
    """A `CoreQueue` that knows whether its backend is up, and the ingest server's gate.

    Start `run` in a task group for the guard's whole life; `aclose` closes the backend.
    """

    def __init__(self, queue: CoreQueue, backoff: Backoff, metrics: Metrics) -> None:
        self._queue = queue
        self.refusal = queue.refusal  # asked per message: no pass-through call per layer
        self.recheck_limits = queue.recheck_limits
        self._backoff = backoff
        self._metrics = metrics
        self._state = BackendState.UP
        self._up = asyncio.Event()
        self._up.set()
        self._down = asyncio.Event()
        self._reason = ""
        self._down_since = 0.0
        self._up_since = -math.inf
        self._ended_at_attempt = 0  # the backoff attempt at which the last outage ended
        self._first_attempt = 0  # where this outage's backoff starts
        self._answered_at = time.monotonic()  # the backend's last answer (confirm, probe)
        self.outages = 0

    @property
    def state(self) -> BackendState:
        return self._state

    @property
    def reason(self) -> str:
        """Why the backend is down (empty while it is up)."""
        return self._reason

    # -- Availability (the ingest server's gate) ---------------------------------------------

    @property
    def available(self) -> bool:
        return self._state is BackendState.UP

    async def wait_available(self) -> None:
        await self._up.wait()

    # -- CoreQueue -----------------------------------------------------------------------------

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        self._check()
        try:
            outcome = await self._queue.publish(messages)
        except BackendError as exc:
            self._mark_down(exc)
            raise
        self._answered_at = time.monotonic()
        return outcome

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        self._check()
        try:
            await self._queue.dead_letter(messages)
        except BackendError as exc:
            self._mark_down(exc)
            raise
        # A confirmed dead letter is an answer too: a sink that only dead-letters (every topic
        # unmappable) probed its backend every IDLE_PROBE seconds for nothing.
        self._answered_at = time.monotonic()

    async def probe(self) -> None:
        await self._queue.probe()

    async def _probe(self) -> None:
        """The backend's probe, for this task. A CancelledError it raises itself (aiormq fails
        what it awaits that way when its connection closes; nobody cancelled this task) is a
        failed probe: it ended this task, without a word, and the sink stayed down for good."""
        try:
            await self._queue.probe()
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            raise BackendError("probe cancelled from within the backend") from None

    async def aclose(self) -> None:
        self._state = BackendState.CLOSED
        self._up.clear()
        await self._queue.aclose()

    # -- the reconnect task --------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled or closed: probe while idle (`IDLE_PROBE`) until an outage, then probe
        with backoff until the backend answers."""
        while True:
            await self._while_up()
            if self._state is BackendState.CLOSED:
                return
            # A probe can pass while publishing still fails (a queue or stream deleted, a full
            # disk): each such flap starts the backoff further on, so it slows to the cap instead
            # of cycling at the initial delay for ever.
            attempt = self._first_attempt
            while self._state is BackendState.DOWN:
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
                try:
                    await self._probe()
                except Exception as exc:
                    # Any failure (a backend's untranslated error too) is a failed probe: this
                    # task ending would take the sink down with it.
                    self._metrics.inc("backend_probes", reason="failed")
                    log.debug("core queue still down (probe %d): %r", attempt, exc)
                    continue
                self._metrics.inc("backend_probes", reason="ok")
                self._mark_up(attempt, probes=attempt - self._first_attempt)

    async def _while_up(self) -> None:
        """Until the state is no longer up: probe the backend whenever it has not answered for
        `IDLE_PROBE` seconds (a publish that confirmed counts as an answer)."""
        while self._state is BackendState.UP:
            quiet = time.monotonic() - self._answered_at
            if quiet < IDLE_PROBE:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_PROBE - quiet):
                        await self._down.wait()
                continue
            try:
                await self._probe()
            except BackendError as exc:
                self._mark_down(exc)
            except Exception as exc:  # untranslated: still no answer (see `run`)
                self._mark_down(BackendError(f"probe failed: {exc!r}"))
            else:
                self._answered_at = time.monotonic()

    def _check(self) -> None:
        if self._state is not BackendState.UP:
            raise BackendDown(f"core queue {self._state.value}: {self._reason}")

    def _mark_down(self, exc: BackendError) -> None:
        if self._state is not BackendState.UP:
            return
        self._state = BackendState.DOWN
        self._reason = str(exc)
        self._down_since = time.monotonic()
        soon = self._down_since - self._up_since < FLAP_WINDOW
        # The backoff goes on from where the last outage's ended (n = its last attempt): a
        # probe can pass while publishing still fails (a queue deleted, a full disk), and the
        # flaps slow to the cap. (It went on from the number of flaps in a row: after an
        # outage of many probes, the next one began at the short delays again.)
        self._first_attempt = self._ended_at_attempt if soon else 0
        self.outages += 1
        self._metrics.inc("backend_outages")
        self._up.clear()
        self._down.set()
        log.warning(
            "core queue down: %s; not reading any connection, refusing new ones (CONNACK 3),"
            " reconnecting with backoff",
            exc,
        )

    def _mark_up(self, attempt: int, *, probes: int) -> None:
        """Up again after ``probes`` probes, its backoff at ``attempt`` (where the next outage's
        goes on from, if it begins soon)."""
        if self._state is not BackendState.DOWN:
            return
        self._ended_at_attempt = attempt
        self._state = BackendState.UP
        self._reason = ""
        self._up_since = self._answered_at = time.monotonic()
        self._down.clear()
        self._up.set()
        log.info(
            "core queue back after %.1fs (%d probe(s)): accepting and reading again",
            time.monotonic() - self._down_since, probes,
        )  # fmt: skip
