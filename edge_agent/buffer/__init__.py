"""The agent's SQLite buffer: every SQL statement and transaction boundary of the agent is in this
package (`model`: schema and types; `files`: lock, open, checks, recovery, transactions; `store`:
the statements of accepting; `drain`: those of draining and inspecting, and the `Buffer` methods
that run them; here: the `Buffer` the rest of the agent uses, on the event loop: its open, close
and group commit).

Guarantees (SPEC §2, §5; RELIABILITY F1, F2, F7, F8, F20):

- `Buffer.append` returns only once its events are committed. Concurrent appends are committed
  together (group commit: one transaction, one fsync, after a short linger), so a durable commit
  costs about one fsync per group, not per event.
- ``durability = "full"``: ``synchronous=FULL`` in WAL mode, the WAL is fsynced at every commit
  and a committed event survives power loss. ``"normal"``: it survives a crash of the agent (the
  kernel still holds the writes) but a power loss can roll back the commits since the last
  checkpoint.
- ``seq`` is monotonic per database and never reused, even after the newest events are deleted
  and the agent restarts: the buffer assigns it, and a delete that removes the newest seq records
  it (``meta.high_water``) in the same transaction. The database gets a random ``epoch`` at
  creation: ``device_id/epoch/seq`` is globally unique even after a wipe.
- Bounded by event count and payload bytes. When full, each event's topic rule decides: ``reject``
  raises `BufferFull` for that event (its producer gets no ack), ``drop-oldest`` drops the oldest
  events of lower or equal priority (counted per reason and topic, exactly, in ``drops``; logged
  once per burst of a reason and topic: when it starts, once a minute while it lasts and with
  its whole count and seq range when it ends, `droplog.DropLog`).
- One agent per data directory (an exclusive ``flock``); a second one gets `BufferLocked`. An
  open that fails after taking the lock lets go of it, of the connection and of the thread.
- At open, ``PRAGMA integrity_check``: a corrupt database is moved aside with its ``-wal``/``-shm``
  into ``quarantine/``, a fresh one is created and the incident (with what could be counted) is
  recorded and logged; so is one whose first reads find damaged content no check sees (a topic
  that is not UTF-8, a ``meta`` value that is not a number). Indexes that do not match their
  table (the tables sound) are rebuilt instead (REINDEX, nothing lost; a ``reindexed``
  incident). A WAL deleted after an unclean stop, or one whose damaged frame made SQLite's
  recovery drop commits, is reported too (``wal-missing``, ``wal-damaged``; ``wal-torn`` when
  that is only the last commit of a ``full`` run, cut before it was synced and acknowledged).
- After every unclean stop the seqs jump by ``SEQ_GAP``: commits lost in it (a power loss with
  ``normal`` durability, a missing or damaged WAL) never have their seqs given out again.

All SQLite work runs on one dedicated thread, one call per transaction: an ``await`` cancelled
mid-commit does not undo the commit (STYLE 9), so every state change is idempotent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from edge_agent.buffer.checks import _is_damage
from edge_agent.buffer.drain import _Draining, _first_reads
from edge_agent.buffer.droplog import DropLog
from edge_agent.buffer.files import (
    _close_cleanly,
    _connect,
    _lock,
    _open_checked,
    agent_pid,
)
from edge_agent.buffer.model import (
    CACHE_KIB,
    DB_NAME,
    DISK_RESERVE,
    LOCK_NAME,
    PAGE_SIZE,
    SCHEMA_VERSION,
    STATE_NAME,
    BufferError,
    BufferFull,
    BufferLocked,
    BufferStats,
    DeadLetter,
    Incident,
    NewEvent,
    StoredEvent,
    T,
    TopicStats,
    _Pending,
    _Totals,
)
from edge_agent.buffer.readonly import inspect, read_dead_letters, read_epoch, read_events
from edge_agent.buffer.reserve import RESERVE_REFUSALS, DiskReserve, WalRescue
from edge_agent.buffer.store import _insert_group, _timed
from mqtt_ingest import failpoints
from mqtt_ingest.clock import Clock, SystemClock

__all__ = [
    "CACHE_KIB",
    "DB_NAME",
    "DISK_RESERVE",
    "LOCK_NAME",
    "PAGE_SIZE",
    "SCHEMA_VERSION",
    "STATE_NAME",
    "Buffer",
    "BufferError",
    "BufferFull",
    "BufferLocked",
    "BufferStats",
    "DeadLetter",
    "Incident",
    "NewEvent",
    "StoredEvent",
    "TopicStats",
    "agent_pid",
    "inspect",
    "read_dead_letters",
    "read_epoch",
    "read_events",
]

log = logging.getLogger("edge_agent.buffer")


class Buffer(_Draining):
    """Open with ``async with await Buffer.open(...)`` (or `open` then `aclose`)."""

    def __init__(
        self,
        directory: Path,
        connection: sqlite3.Connection,
        executor: concurrent.futures.ThreadPoolExecutor,
        lock_fd: int | None,
        *,
        max_events: int,
        max_bytes: int,
        linger: float,
        max_group: int,
        clock: Clock,
        disk_reserve: int = 0,
    ) -> None:
        self.directory = directory
        self._disk = DiskReserve(directory, disk_reserve) if disk_reserve > 0 else None
        self._disk_refusal: str | None = None
        """The reason the last group commit refused events for the disk reserve, if it did."""
        self._rescue = WalRescue()
        self._held: set[int] = set()
        """Seqs the drain read with ``hold`` (or took with `hold`) and has not deleted or
        released: the TTL sweep and ``drop-oldest`` pass them over. Only the buffer's thread
        touches it."""
        self._db = connection
        self._executor = executor
        self._lock_fd = lock_fd
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._linger = linger
        self._max_group = max_group
        self._clock = clock
        self._drop_log = DropLog(clock)
        self._pending: deque[_Pending] = deque()
        self._pending_events = 0
        self._oldest = 0.0
        """Loop time at which the oldest pending event was queued."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._totals = _Totals()
        self.epoch = ""
        self.commits = 0
        """Group commits so far (each one transaction, one fsync with ``durability = "full"``)."""
        self.on_commit: Callable[[int], None] | None = None
        """Called after each group commit with its highest priority (wakes the uplink)."""
        self.accepted = 0
        """Events committed by group commits so far (this run)."""
        self.failure: BaseException | None = None
        """What left the buffer unusable this run, if anything: an error that means the
        database is damaged (`_is_damage`; no check at the open saw it: the next open
        quarantines what its checks find), or the committer stopped by an error (every later
        append is refused at once instead of waiting for ever)."""
        self.on_failure: Callable[[BaseException], None] | None = None
        """Called once, at that failure (`edge-agent run` then exits 1: systemd restarts it)."""
        self.on_commit_timed: Callable[[float, int], None] | None = None
        """Called after each group commit with the seconds its transaction took on the buffer
        thread (inserts, drops and the COMMIT with its fsync) and the events it committed."""

    # -- open / close ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        durability: Literal["full", "normal"] = "full",
        max_events: int = 1_000_000,
        max_bytes: int = 512 * 1024**2,
        commit_linger: float = 0.005,
        commit_max_events: int = 1000,
        clock: Clock | None = None,
        max_page_count: int | None = None,
        connect: Callable[[Path], sqlite3.Connection] | None = None,
        disk_reserve: int = DISK_RESERVE,
        run_files: Sequence[str] = (),
    ) -> Buffer:
        """Lock ``directory``, check or create the database and start the group committer.

        ``max_page_count`` caps the database file in pages (a hard disk budget; tests use it to
        simulate a full disk). ``connect`` opens the database connection (a seam: the power-loss
        tests run the buffer over a VFS that drops unsynced writes). ``disk_reserve``: bytes of
        the filesystem that new events never take, kept for the drain's deletes and the
        checkpoints (`DiskReserve`; 0: no check). ``run_files``: names of files in ``directory``
        that describe the lock holder's run (the agent's ``listener.json``), removed as soon as the
        lock is taken: one left by a crashed run may name this process's pid (PID 1 in a
        container) while the checks below take seconds. Raises `BufferLocked` if another agent
        holds the directory.
        """
        lock_fd = await _lock(directory)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edge-buffer")
        loop = asyncio.get_running_loop()
        opening: asyncio.Future[tuple[sqlite3.Connection, tuple[_Totals, str]]] | None = None
        try:
            for name in run_files:
                (directory / name).unlink(missing_ok=True)
            opening = loop.run_in_executor(
                executor,
                _open_checked,
                directory,
                durability,
                max_page_count,
                clock or SystemClock(),
                connect or _connect,
                _first_reads,
            )
            # Shielded: cancelled, the open still ends (below) before the lock is let go.
            connection, (totals, epoch) = await asyncio.shield(opening)
            buffer = cls(
                directory,
                connection,
                executor,
                lock_fd,
                max_events=max_events,
                max_bytes=max_bytes,
                linger=commit_linger,
                max_group=commit_max_events,
                clock=clock or SystemClock(),
                disk_reserve=disk_reserve,
            )
            buffer._totals = totals
            buffer.epoch = epoch
            buffer._committer = loop.create_task(
                buffer._commit_loop(), name="edge_agent.buffer.commit"
            )
            buffer._committer.add_done_callback(buffer._committer_done)
        except BaseException:
            # Whatever failed after the lock was taken: nothing of this open stays behind (the
            # next open in this process found the directory locked by its own pid).
            if opening is not None:
                await asyncio.wait((opening,))
                if not opening.cancelled() and opening.exception() is None:
                    executor.submit(opening.result()[0].close).result()
            executor.shutdown(wait=True)
            os.close(lock_fd)
            raise
        return buffer

    async def __aenter__(self) -> Buffer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Commit what is pending, checkpoint, close and unlock. Idempotent; cancelled, the close
        goes on, and a second call waits for it (the first one set the buffer closed and, once
        cancelled, a second returned at once: the lock and the thread stayed)."""
        if self._closing is None:
            self._closed = True
            self._wakeup.set()
            self._closing = self._loop.create_task(self._close(), name="edge_agent.buffer.close")
        # asyncio.wait: our own cancellation still propagates (STYLE 8); the close does not stop.
        await asyncio.wait((self._closing,))
        self._closing.result()

    async def _close(self) -> None:
        if self._committer is not None:
            await asyncio.wait((self._committer,))  # it commits what is pending, then ends
        self._drop_log.flush(all_bursts=True)
        try:
            await self._run(_close_cleanly, self.directory)
        finally:
            self._executor.shutdown(wait=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        # Shielded: the thread finishes the transaction whatever happens to the awaiting task.
        call = loop.run_in_executor(self._executor, function, self._db, *args)
        try:
            return await asyncio.shield(call)
        except sqlite3.DatabaseError as exc:
            if self.failure is None and _is_damage(exc):
                log.error(
                    "buffer: the database is damaged (%s); nothing can be committed or read"
                    " reliably until a restart quarantines it",
                    exc,
                )
                self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)

    def _committer_done(self, task: asyncio.Task[None]) -> None:
        """The committer ended. Before `aclose`, only by an error (a bug): the events waiting
        and every later append are refused at once; they waited for ever (no ack, no error)."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        for _, future, _ in self._pending:
            if not future.done():
                future.set_exception(BufferError(f"the buffer's committer stopped: {exc!r}"))
        self._pending.clear()
        self._pending_events = 0
        if self.failure is None:  # once (also called by an append before this callback runs)
            log.error("buffer: the committer stopped: %r; refusing every event", exc, exc_info=exc)
            self._failed(exc)

    # -- accepting ------------------------------------------------------------------------------

    # `append` and `append_one` are plain functions returning a future: no coroutine per call on
    # the accept path, and events are queued in the order of the calls.

    def append(self, events: Sequence[NewEvent]) -> asyncio.Future[list[int | BufferFull]]:
        """Commit ``events``: the future gets, per event, its ``seq`` or the `BufferFull` that
        refused it."""
        future: asyncio.Future[list[int | BufferFull]] = self._enqueue(events, one=False)
        return future

    def append_one(self, event: NewEvent) -> asyncio.Future[int]:
        """Commit one event: the future gets its ``seq``, or `BufferFull` if it was refused."""
        future: asyncio.Future[int] = self._enqueue((event,), one=True)
        return future

    def _enqueue(self, events: Sequence[NewEvent], *, one: bool) -> asyncio.Future[Any]:
        # The hot path of every source (one call per event from Agent.publish): no coroutine,
        # one future, one tuple.
        if self._closed:
            raise BufferError("the buffer is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self._loop:
            # Before anything is queued: from another thread the queue would be shared without
            # a lock, and the event committed while its caller, unable to await this loop's
            # future, was told it failed (and sent it again).
            raise RuntimeError(
                "the buffer (the agent) runs on another event loop: publish from the loop"
                " that started it (asyncio.run_coroutine_threadsafe from other threads)"
            )
        committer = self._committer
        if committer is not None and committer.done():
            self._committer_done(committer)
            raise BufferError(f"the buffer's committer stopped: {self.failure!r}")
        future = self._loop.create_future()
        if not self._pending:
            self._oldest = self._loop.time()
        self._pending.append((events, future, one))
        self._pending_events += len(events)
        self._wakeup.set()
        # Not shielded: a cancelled caller cancels only this future, whose events the committer
        # leaves out unless their commit began (see `withdraw`).
        return future

    def withdraw(self, future: asyncio.Future[Any]) -> None:
        """Take back the events of a cancelled append at once, unless their commit began. The
        committer leaves them out anyway, but only when it takes its next group: behind a
        stalled commit, the local listener's stage timeout (30 s) cancelled appends whose
        producers then sent them again, every round piling up in memory (and, when they were
        committed after all, storing each event again under a new seq)."""
        for index, (events, queued, _) in enumerate(self._pending):
            if queued is future:
                del self._pending[index]
                self._pending_events -= len(events)
                return

    async def _commit_loop(self) -> None:
        """Commit groups until closed and drained.

        The wake-up flag is only cleared right before waiting, never after taking a group: a
        close signalled meanwhile (during the linger) must not be lost.
        """
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Linger for more only while the group is small (half a group, from the listener or
            # piled up during the last commit, is worth committing at once), and only until the
            # oldest pending event has waited `linger`: events that arrived during the last
            # commit have waited already.
            if self._pending_events < self._max_group // 2 and not self._closed:
                delay = self._oldest + self._linger - self._loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not self._pending:  # all withdrawn meanwhile: no empty commit
                    continue
            if self._pending_events <= self._max_group:
                group, self._pending = self._pending, deque()
                count = self._pending_events
            else:
                group, count = deque(), 0
                while self._pending and (
                    not group or count + len(self._pending[0][0]) <= self._max_group
                ):
                    pending = self._pending.popleft()
                    group.append(pending)
                    count += len(pending[0])
                self._oldest = -math.inf  # the rest waited for this group: no linger for it
            self._pending_events -= count
            if any(pending[1].cancelled() for pending in group):
                # Nobody waits for them: their producers were told nothing was stored.
                group = deque(pending for pending in group if not pending[1].cancelled())
                if not group:
                    continue
            await self._commit(group)

    async def _commit(self, group: deque[_Pending]) -> None:
        now_ms = int(self._clock.time() * 1000)
        flat = group[0][0] if len(group) == 1 else [e for events, _, _ in group for e in events]
        last_seq = self._totals.last_seq
        try:
            (outcomes, dropped), seconds = await self._run(
                _timed,
                _insert_group,
                flat,
                self._totals,
                self._max_events,
                self._max_bytes,
                now_ms,
                self._disk,
                self._rescue,
                self._held,
            )
        except Exception as exc:
            log.error("buffer: commit of %d events failed: %r", len(flat), exc)
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(BufferError(f"commit failed: {exc!r}"))
            return
        try:
            for (reason, topic), (events, first, last) in dropped.items():
                self._drop_log.record(reason, topic, events, first, last)
            self.commits += 1
            # Seqs are assigned consecutively and only to committed events: no per-event count.
            committed = self._totals.last_seq - last_seq
            self.accepted += committed
            if committed < len(flat) or self._disk_refusal is not None:
                self._log_disk_refusals(outcomes, committed)
            if self.on_commit_timed is not None:
                self.on_commit_timed(seconds, committed)
            failpoints.hit("buffer.after_commit_before_ack")
        finally:
            # The group is committed whatever the bookkeeping above raised (a bug ends the
            # committer, `_committer_done`): its producers get their seqs, not a wait for ever.
            start = 0
            for appended, future, one in group:
                if not future.done():
                    if not one:
                        future.set_result(outcomes[start : start + len(appended)])
                    elif isinstance(outcome := outcomes[start], BufferFull):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                start += len(appended)
        if self.on_commit is not None and flat:
            self.on_commit(max(event.priority for event in flat))

    def _log_disk_refusals(self, outcomes: list[int | BufferFull], committed: int) -> None:
        """One line when events start being refused for the disk reserve, one when events are
        committed again without such refusals."""
        refusal = next(
            (
                o.reason
                for o in outcomes
                if isinstance(o, BufferFull) and o.reason.startswith(RESERVE_REFUSALS)
            ),
            None,
        )
        if refusal is not None:
            if self._disk_refusal is None:
                log.warning("buffer: refusing events: %s", refusal)
            self._disk_refusal = refusal
        elif committed and self._disk_refusal is not None:
            log.warning("buffer: room on the disk again: accepting events")
            self._disk_refusal = None
