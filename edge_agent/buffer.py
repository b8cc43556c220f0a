"""The agent's SQLite buffer: every SQL statement and transaction boundary of the agent is here.

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
  events of lower or equal priority (counted per reason and topic, logged once per commit).
- One agent per data directory (an exclusive ``flock``); a second one gets `BufferLocked`.
- At open, ``PRAGMA quick_check``: a corrupt database is moved aside with its ``-wal``/``-shm``
  into ``quarantine/``, a fresh one is created and the incident (with what could be counted) is
  recorded and logged. A WAL deleted after an unclean stop is reported the same way.

All SQLite work runs on one dedicated thread, one call per transaction: an ``await`` cancelled
mid-commit does not undo the commit (STYLE 9), so every state change is idempotent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import itertools
import logging
import math
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

from mqtt_ingest import failpoints
from mqtt_ingest.clock import Clock, SystemClock

__all__ = [
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
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
PAGE_SIZE = 1024
"""For new databases. Every commit rewrites whole pages (at least the last leaf of ``events``),
so at a few events per commit small pages write far fewer bytes per event (docs/buffer.md)."""
CACHE_KIB = 512
"""SQLite's page cache per connection (its default is 2,000 KiB). The buffer's reads and writes are
sequential (appends, drain in seq order), so a small cache costs nothing measurable and keeps
about 1.5 MB off the resident memory of an agent draining a large backlog."""
DB_NAME = "buffer.db"
LOCK_NAME = "agent.lock"
STATE_NAME = "buffer.state"
T = TypeVar("T")

# Schema 2. ``seq`` is assigned by the buffer, not by AUTOINCREMENT, which rewrote
# sqlite_sequence's page in every commit; ``meta.high_water`` keeps it monotonic instead (see
# _keep_high_water). The drain index leaves out priority 0, the default: most events then write
# no index page at all, and priority 0 drains in rowid order (_drain_queries).
_EVENTS = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    event_time INTEGER NOT NULL,
    expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_drain ON events (priority DESC, seq) WHERE priority <> 0;
CREATE INDEX events_expiry ON events (expires_at) WHERE expires_at IS NOT NULL;
"""
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;"
    + _EVENTS
    + """
CREATE TABLE dead_letters (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    event_time INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at INTEGER NOT NULL
) STRICT;
CREATE TABLE drops (
    reason TEXT NOT NULL,
    topic TEXT NOT NULL,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (reason, topic)
) STRICT;
CREATE TABLE incidents (
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;
"""
)


class BufferError(Exception):
    """Base of the buffer's errors."""


class BufferFull(BufferError):
    """The buffer cannot take this event under its topic's ``on_full`` policy."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"buffer full for {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason


class BufferLocked(BufferError):
    """Another agent holds this data directory."""


class NewEvent(NamedTuple):
    """An event to append. A named tuple rather than a frozen dataclass: one is made per event
    on the accept path, and a tuple is made in half the time."""

    topic: str
    payload: bytes
    qos: int
    priority: int
    event_time_ms: int
    ttl: float | None
    on_full: Literal["reject", "drop-oldest"]


class StoredEvent(NamedTuple):
    """An event read back for the drain. A named tuple for the same reason as `NewEvent`: the
    drain makes one per event, on the buffer's thread, holding the GIL the event loop needs."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    priority: int
    event_time_ms: int
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    topic: str
    payload: bytes
    attempts: int
    reason: str
    dead_at_ms: int


@dataclass(frozen=True, slots=True)
class TopicStats:
    topic: str
    events: int
    bytes: int
    oldest_event_time_ms: int


@dataclass(frozen=True, slots=True)
class Incident:
    at_ms: int
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class BufferStats:
    epoch: str
    events: int
    bytes: int
    topics: list[TopicStats]
    drops: dict[tuple[str, str], tuple[int, int]]  # (reason, topic) -> (events, bytes)
    dead_letters: int
    incidents: list[Incident]
    next_seq: int


# An append waiting for the committer: its events, its future and whether it is `append_one`
# (whose future gets the one outcome, not a list). A plain tuple: one is made per event.
_Pending = tuple[Sequence[NewEvent], "asyncio.Future[Any]", bool]


@dataclass
class _Totals:
    """What the buffer thread keeps in memory between transactions (restored on a rollback)."""

    events: int = 0
    bytes: int = 0
    last_seq: int = 0
    """The highest seq ever committed in this database."""
    high_water: int = 0
    """``meta.high_water`` as committed."""

    def restore(self, saved: _Totals) -> None:
        self.events, self.bytes = saved.events, saved.bytes
        self.last_seq, self.high_water = saved.last_seq, saved.high_water


class Buffer:
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
    ) -> None:
        self.directory = directory
        self._db = connection
        self._executor = executor
        self._lock_fd = lock_fd
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._linger = linger
        self._max_group = max_group
        self._clock = clock
        self._pending: deque[_Pending] = deque()
        self._pending_events = 0
        self._oldest = 0.0
        """Loop time at which the oldest pending event was queued."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self._totals = _Totals()
        self.epoch = ""
        self.commits = 0
        """Group commits so far (each one transaction, one fsync with ``durability = "full"``)."""
        self.on_commit: Callable[[int], None] | None = None
        """Called after each group commit with its highest priority (wakes the uplink)."""
        self.accepted = 0
        """Events committed by group commits so far (this run)."""
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
    ) -> Buffer:
        """Lock ``directory``, check or create the database and start the group committer.

        ``max_page_count`` caps the database file in pages (a hard disk budget; tests use it to
        simulate a full disk). ``connect`` opens the database connection (a seam: the power-loss
        tests run the buffer over a VFS that drops unsynced writes). Raises `BufferLocked` if
        another agent holds the directory.
        """
        lock_fd = _lock(directory)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edge-buffer")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(
                executor,
                _open_checked,
                directory,
                durability,
                max_page_count,
                clock or SystemClock(),
                connect or _connect,
            )
        except BaseException:
            executor.shutdown(wait=False)
            os.close(lock_fd)
            raise
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
        )
        await buffer._run(_load_totals, buffer._totals)
        buffer.epoch = (await buffer.stats()).epoch
        buffer._committer = asyncio.get_running_loop().create_task(
            buffer._commit_loop(), name="edge_agent.buffer.commit"
        )
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
        """Commit what is pending, checkpoint, close and unlock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._committer is not None:
            # asyncio.wait: our own cancellation still propagates (STYLE 8).
            await asyncio.wait((self._committer,))
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
        return await asyncio.shield(loop.run_in_executor(self._executor, function, self._db, *args))

    # -- accepting ------------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent]) -> list[int | BufferFull]:
        """Commit ``events``; return, per event, its ``seq`` or the `BufferFull` that refused it."""
        result: list[int | BufferFull] = await self._enqueue(events, one=False)
        return result

    async def append_one(self, event: NewEvent) -> int:
        """Commit one event and return its ``seq``; raise `BufferFull` if refused."""
        outcome: int | BufferFull = await self._enqueue((event,), one=True)
        if isinstance(outcome, BufferFull):
            raise outcome
        return outcome

    def _enqueue(self, events: Sequence[NewEvent], *, one: bool) -> asyncio.Future[Any]:
        # The hot path of every source (one call per event from Agent.publish): no coroutine,
        # one future, one tuple.
        if self._closed:
            raise BufferError("the buffer is closed")
        future = self._loop.create_future()
        if not self._pending:
            self._oldest = self._loop.time()
        self._pending.append((events, future, one))
        self._pending_events += len(events)
        self._wakeup.set()
        # Not shielded: a cancelled caller cancels only this future; the committer skips it
        # (its events may still be committed: harmless, nobody was told they were).
        return future

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
            )
        except Exception as exc:
            log.error("buffer: commit of %d events failed: %r", len(flat), exc)
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(BufferError(f"commit failed: {exc!r}"))
            return
        for (reason, topic), (events, first, last) in dropped.items():
            log.warning(
                "buffer: dropped %d events on %r (seq %d..%d): %s",
                events,
                topic,
                first,
                last,
                reason,
            )
        self.commits += 1
        # Seqs are assigned consecutively and only to committed events: no per-event count.
        committed = self._totals.last_seq - last_seq
        self.accepted += committed
        if self.on_commit_timed is not None:
            self.on_commit_timed(seconds, committed)
        failpoints.hit("buffer.after_commit_before_ack")
        start = 0
        for appended, future, one in group:
            if not future.done():
                future.set_result(
                    outcomes[start] if one else outcomes[start : start + len(appended)]
                )
            start += len(appended)
        if self.on_commit is not None:
            self.on_commit(max(event.priority for event in flat))

    # -- draining (the uplink) ------------------------------------------------------------------

    async def next_events(
        self, limit: int, after: tuple[int, int] | None = None
    ) -> list[StoredEvent]:
        """Up to ``limit`` events in drain order: priority (high first), then seq.

        ``after`` = (priority, seq) of the last event already taken, to page through the backlog.
        """
        return await self._run(_next_events, limit, after)

    async def delete(self, seqs: Sequence[int], *, drop_reason: str | None = None) -> int:
        """Remove events (idempotent); returns how many were still there.

        Delivered events are just deleted; with ``drop_reason`` (an operator's purge) they are
        counted as dropped for that reason, per topic, and logged.
        """
        removed = await self._run(_delete, list(seqs), self._totals, drop_reason)
        if drop_reason is not None:
            log.warning("buffer: %d events dropped: %s", removed, drop_reason)
        return removed

    async def record_attempt(self, seqs: Sequence[int]) -> None:
        await self._run(_record_attempt, list(seqs))

    async def dead_letter(self, seq: int, reason: str) -> bool:
        """Move one event to the dead-letter table; False if it is no longer buffered."""
        now_ms = int(self._clock.time() * 1000)
        return await self._run(_dead_letter, seq, reason, now_ms, self._totals)

    async def requeue_dead(self) -> int:
        """Move every dead letter back into the buffer (with its original seq)."""
        return await self._run(_requeue_dead, self._totals)

    async def sweep_expired(self) -> int:
        """Drop events whose TTL passed; counted under reason ``ttl``."""
        now_ms = int(self._clock.time() * 1000)
        dropped = await self._run(_sweep, now_ms, self._totals)
        for topic, (events, first, last) in dropped.items():
            log.warning("buffer: %d events on %r expired (seq %d..%d)", events, topic, first, last)
        return sum(events for events, _, _ in dropped.values())

    async def stats(self) -> BufferStats:
        """Per-topic backlog, drops, dead letters, incidents: scans the whole ``events`` table on
        the buffer thread (commits wait meanwhile), so not for a hot path."""
        return await self._run(_stats)

    @property
    def backlog(self) -> tuple[int, int]:
        """(events, payload bytes) buffered, from memory: free to read at any time."""
        return self._totals.events, self._totals.bytes

    @property
    def limits(self) -> tuple[int, int]:
        """(``max_events``, ``max_bytes``)."""
        return self._max_events, self._max_bytes


# -- inspection without the lock (edge-agent status while the agent runs) -----------------------


def inspect(directory: Path) -> BufferStats:
    """Read-only statistics of the buffer in ``directory``; works while the agent runs."""
    path = directory / DB_NAME
    if not path.exists():
        raise BufferError(f"no buffer at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return _stats(db)
    finally:
        db.close()


def read_events(
    directory: Path, *, limit: int | None = None, topic_filter: Callable[[str], bool] | None = None
) -> Iterator[StoredEvent]:
    """Buffered events in drain order, read-only (for ``buffer peek`` / ``export``)."""
    path = directory / DB_NAME
    if not path.exists():
        raise BufferError(f"no buffer at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = (
            row for query, args in _drain_queries(None) for row in db.execute(query, (*args, -1))
        )
        taken = 0
        for row in rows:
            event = StoredEvent(*row)
            if topic_filter is not None and not topic_filter(event.topic):
                continue
            yield event
            taken += 1
            if limit is not None and taken >= limit:
                return
    finally:
        db.close()


# -- everything below runs on the buffer's own thread --------------------------------------------


def _lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BufferLocked(
            f"another edge-agent (pid {holder}) is using {directory}; "
            "only one agent may use a data directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)


def _open_checked(
    directory: Path,
    durability: Literal["full", "normal"],
    max_page_count: int | None,
    clock: Clock,
    connect: Callable[[Path], sqlite3.Connection],
) -> sqlite3.Connection:
    path = directory / DB_NAME
    state = directory / STATE_NAME
    now_ms = int(clock.time() * 1000)
    incidents: list[tuple[str, str]] = []
    unclean = state.exists() and state.read_text().strip() == "open"
    # Before _check: its connection, the last to close, may checkpoint and remove the WAL.
    wal_present = (directory / f"{DB_NAME}-wal").exists()
    if path.exists():
        problem = _check(path)
        if problem is not None:
            counted = _count_what_we_can(path)
            moved = _quarantine(directory, now_ms)
            detail = f"{problem}; moved to {moved}; {counted}"
            log.error("buffer: corrupt database quarantined: %s", detail)
            incidents.append(("corrupt", detail))
        elif unclean and not wal_present:
            detail = "the -wal file was missing after an unclean stop: recent commits may be lost"
            log.error("buffer: %s", detail)
            incidents.append(("wal-missing", detail))
    db = connect(path)
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op unless the database is new
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    if max_page_count is not None:
        db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        epoch = secrets.token_hex(8)  # hex: safe to write into the script
        db.executescript(
            f"BEGIN IMMEDIATE;{_SCHEMA}"  # noqa: S608  # only constants, a hex epoch and an int
            f"INSERT INTO meta VALUES ('epoch', '{epoch}'), ('created_at', '{now_ms}');"
            f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
        )
        log.info("buffer: created %s (epoch %s)", path, epoch)
    elif version == 1:
        _migrate_from_1(db, path)
    elif version > SCHEMA_VERSION:
        db.close()
        raise BufferError(
            f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}: "
            "upgrade the agent"
        )
    for kind, detail in incidents:
        db.execute("INSERT INTO incidents VALUES (?, ?, ?)", (now_ms, kind, detail))
    _write_state(state, "open")
    return db


def _migrate_from_1(db: sqlite3.Connection, path: Path) -> None:
    """Schema 1 -> 2 in one transaction: copy ``events`` into a table without AUTOINCREMENT
    and record the highest seq ever used as ``meta.high_water``. A failure (a full disk: the copy
    needs the table's size again) leaves schema 1 untouched and the agent refuses to start."""
    try:
        with _transaction(db):
            high_water = db.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
                " coalesce((SELECT max(seq) FROM events), 0),"
                " coalesce((SELECT max(seq) FROM dead_letters), 0))"
            ).fetchone()[0]
            db.execute("ALTER TABLE events RENAME TO events_1")
            db.execute("DROP INDEX events_drain")
            db.execute("DROP INDEX events_expiry")
            for statement in _EVENTS.split(";"):
                if statement.strip():
                    db.execute(statement)
            copied = db.execute(
                "INSERT INTO events SELECT seq, topic, payload, qos, priority, event_time,"
                " expires_at, attempts FROM events_1"
            ).rowcount
            db.execute("DROP TABLE events_1")
            db.execute("DELETE FROM sqlite_sequence")
            _set_meta(db, "high_water", high_water)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        db.close()
        raise BufferError(
            f"{path} has schema version 1 and could not be migrated to {SCHEMA_VERSION} "
            f"({exc}); nothing was changed: its events are still there"
        ) from None
    log.warning(
        "buffer: migrated %s from schema 1 to %d (%d events kept, last seq %d)",
        path,
        SCHEMA_VERSION,
        copied,
        high_water,
    )


def _set_meta(db: sqlite3.Connection, key: str, value: object) -> None:
    db.execute(
        "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def _check(path: Path) -> str | None:
    try:
        # Read-write (we hold the lock): SQLite can then recover a stale -shm after a crash.
        db = sqlite3.connect(path, timeout=10)
        try:
            result = db.execute("PRAGMA quick_check").fetchall()
            if result != [("ok",)]:
                return "quick_check: " + "; ".join(str(r[0]) for r in result[:5])
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "events" not in tables and db.execute("PRAGMA user_version").fetchone()[0]:
                return "the events table is missing"
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"cannot read the database: {exc}"
    return None


def _count_what_we_can(path: Path) -> str:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            count, size = db.execute(
                "SELECT count(*), total(length(payload)) FROM events"
            ).fetchone()
            return f"about {count} events ({int(size)} payload bytes) were in it"
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"its events could not be counted ({exc})"


def _quarantine(directory: Path, now_ms: int) -> Path:
    target = directory / "quarantine"
    target.mkdir(exist_ok=True)
    stamp = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    base = target / f"buffer-{stamp}.db"
    for suffix in ("", "-wal", "-shm"):
        source = directory / f"{DB_NAME}{suffix}"
        if source.exists():
            os.replace(source, f"{base}{suffix}")
    _fsync_dir(directory)
    _fsync_dir(target)
    return base


def _write_state(path: Path, value: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_cleanly(db: sqlite3.Connection, directory: Path) -> None:
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    _write_state(directory / STATE_NAME, "closed")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, totals: _Totals | None = None) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back if anything (even cancellation) escapes; then
    ``totals`` are restored to what they were at BEGIN."""
    saved = dataclasses.replace(totals) if totals is not None else None
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if totals is not None and saved is not None:
            totals.restore(saved)
        raise


def _load_totals(db: sqlite3.Connection, totals: _Totals) -> None:
    totals.events, totals.bytes = db.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
    ).fetchone()
    totals.high_water, totals.last_seq = _seq_marks(db)


def _seq_marks(db: sqlite3.Connection) -> tuple[int, int]:
    """(``meta.high_water``, the highest seq ever committed)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'high_water'").fetchone()
    high_water = int(row[0]) if row else 0
    newest = db.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
        " coalesce((SELECT max(seq) FROM dead_letters), 0))"
    ).fetchone()[0]
    return high_water, max(high_water, newest)


def _keep_high_water(db: sqlite3.Connection, totals: _Totals) -> None:
    """End every transaction that deletes events or dead letters with this.

    The next seq after a restart is one more than the highest of ``meta.high_water`` and the seqs
    still stored, so when a delete removes the newest seq, ``high_water`` must hold it. Only such
    a delete writes it (the drain catching up with the newest events), never an insert.
    """
    if totals.high_water >= totals.last_seq:
        return
    _, newest = _seq_marks(db)
    if newest < totals.last_seq:
        _set_meta(db, "high_water", totals.last_seq)
        totals.high_water = totals.last_seq


_DISK_FULL = ("database or disk is full", "disk i/o error")
_DISK_FULL_ATTEMPTS = 4


class _DiskFull(Exception):
    """SQLite could not write (disk, RLIMIT_FSIZE or max_page_count); the transaction is gone."""


def _timed(db: sqlite3.Connection, function: Callable[..., T], *args: object) -> tuple[T, float]:
    """``function(db, *args)`` and the seconds it took (on the buffer thread, without queueing)."""
    started = time.perf_counter()
    result = function(db, *args)
    return result, time.perf_counter() - started


def _insert_group(
    db: sqlite3.Connection,
    events: Sequence[NewEvent],
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
) -> tuple[list[int | BufferFull], dict[tuple[str, str], tuple[int, int, int]]]:
    """Commit a whole group in one transaction; returns outcomes and drops (events, first, last).

    When the disk is full SQLite rolls the transaction back, so the group is tried again in
    "disk full" mode: ``reject`` events are refused outright and ``drop-oldest`` events first drop
    old events to make room (more on each attempt).
    """
    for attempt in range(_DISK_FULL_ATTEMPTS):
        try:
            return _insert_group_once(db, events, totals, max_events, max_bytes, now_ms, attempt)
        except _DiskFull:
            log.warning(
                "buffer: the disk is full (attempt %d for %d events)", attempt + 1, len(events)
            )
    return [BufferFull(e.topic, "the disk is full") for e in events], {}


def _insert_group_once(
    db: sqlite3.Connection,
    events: Sequence[NewEvent],
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    disk_full: int,
) -> tuple[list[int | BufferFull], dict[tuple[str, str], tuple[int, int, int]]]:
    outcomes: list[int | BufferFull] = []
    dropped: dict[
        tuple[str, str], list[int]
    ] = {}  # (reason, topic) -> [events, bytes, first, last]
    try:
        with _transaction(db, totals):
            size = sum(len(event.payload) for event in events)
            if (
                not disk_full
                and totals.events + len(events) <= max_events
                and totals.bytes + size <= max_bytes
            ):
                outcomes.extend(_insert_all(db, events, totals, now_ms, size))
            else:
                for event in events:
                    outcomes.append(
                        _insert_one_with_policy(
                            db, event, totals, max_events, max_bytes, now_ms, dropped, disk_full
                        )
                    )
                _count_drops(db, "buffer-full", {topic: v for (_, topic), v in dropped.items()})
                _keep_high_water(db, totals)
            failpoints.hit("buffer.before_commit")
    except sqlite3.OperationalError as exc:
        if str(exc).lower().startswith(_DISK_FULL):
            raise _DiskFull(str(exc)) from None
        raise
    return outcomes, {key: (v[0], v[2], v[3]) for key, v in dropped.items()}


_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_ROWS = (
    "INSERT INTO events (seq, topic, payload, qos, priority, event_time, expires_at) VALUES "
)


def _insert_all(
    db: sqlite3.Connection, events: Sequence[NewEvent], totals: _Totals, now_ms: int, size: int
) -> range:
    """The common case, everything fits: seqs assigned in order, multi-row INSERTs.

    One statement per chunk of rows instead of ``executemany``: SQLite runs a whole chunk in one
    step with the GIL released, where ``executemany`` takes the GIL back for every row, so the
    event loop's thread and this one overlap a little more (about 5% more API accept rate in an
    A/B run). Chunk sizes are powers of two (at most 256 rows, 1,792 parameters), so only a
    handful of statements are ever prepared and they stay cached."""
    first = totals.last_seq + 1
    params: list[object] = []
    for seq, event in zip(itertools.count(first), events):
        params += (
            seq,
            event.topic,
            event.payload,
            event.qos,
            event.priority,
            event.event_time_ms,
            None if event.ttl is None else now_ms + int(event.ttl * 1000),
        )
    start = 0
    remaining = len(events)
    while remaining:
        rows = min(_MAX_CHUNK, 1 << (remaining.bit_length() - 1))
        db.execute(_insert_sql(rows), params[start * 7 : (start + rows) * 7])
        start += rows
        remaining -= rows
    totals.events += len(events)
    totals.bytes += size
    totals.last_seq += len(events)
    return range(first, totals.last_seq + 1)


_MAX_CHUNK = 256


@functools.cache
def _insert_sql(rows: int) -> str:
    return _INSERT_ROWS + ", ".join([_ROW] * rows)


def _insert_one_with_policy(
    db: sqlite3.Connection,
    event: NewEvent,
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    dropped: dict[tuple[str, str], list[int]],
    disk_full: int,
) -> int | BufferFull:
    """One event of a group that does not simply fit: the topic's policy decides (``disk_full``:
    the how-manieth retry after SQLite found the disk full, 0 for none)."""
    if disk_full and event.on_full == "reject":
        return BufferFull(event.topic, "the disk is full")
    if disk_full:
        freed = _drop_oldest(
            db,
            event.priority,
            totals,
            dropped,
            _bytes_freed((len(event.payload) + 4096) << disk_full),
        )
        if not freed:
            return BufferFull(event.topic, "the disk is full and nothing can be dropped")
    return _insert_one(db, event, totals, max_events, max_bytes, now_ms, dropped)


def _insert_one(
    db: sqlite3.Connection,
    event: NewEvent,
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    dropped: dict[tuple[str, str], list[int]],
) -> int | BufferFull:
    size = len(event.payload)
    if size > max_bytes:
        return BufferFull(event.topic, f"the payload alone is over max_bytes ({max_bytes})")

    def fits(_: int, __: int) -> bool:
        return totals.events + 1 <= max_events and totals.bytes + size <= max_bytes

    if not fits(0, 0):
        if event.on_full == "reject":
            return BufferFull(event.topic, _which_limit(totals, size, max_events, max_bytes))
        _drop_oldest(db, event.priority, totals, dropped, fits)
        if not fits(0, 0):
            return BufferFull(
                event.topic,
                _which_limit(totals, size, max_events, max_bytes)
                + f" and no events of priority <= {event.priority} are left to drop",
            )
    (seq,) = _insert_all(db, [event], totals, now_ms, size)
    return seq


def _bytes_freed(room: int) -> Callable[[int, int], bool]:
    def enough(_: int, freed: int) -> bool:
        return freed >= room

    return enough


def _which_limit(totals: _Totals, size: int, max_events: int, max_bytes: int) -> str:
    if totals.events + 1 > max_events:
        return f"max_events ({max_events}) reached"
    return f"max_bytes ({max_bytes}) reached"


def _drop_oldest(
    db: sqlite3.Connection,
    priority: int,
    totals: _Totals,
    dropped: dict[tuple[str, str], list[int]],
    enough: Callable[[int, int], bool],
) -> int:
    """Delete the oldest events of priority <= ``priority`` until ``enough(events, bytes)`` of
    what was deleted so far says so. Returns how many were deleted."""
    deleted = 0
    freed = 0
    while not enough(deleted, freed):
        rows = db.execute(
            "SELECT seq, topic, length(payload) FROM events WHERE priority <= ?"
            " ORDER BY seq LIMIT 64",
            (priority,),
        ).fetchall()
        if not rows:
            break
        for seq, topic, size in rows:
            db.execute("DELETE FROM events WHERE seq = ?", (seq,))
            totals.events -= 1
            totals.bytes -= size
            deleted += 1
            freed += size
            entry = dropped.setdefault(("buffer-full", topic), [0, 0, seq, seq])
            entry[0] += 1
            entry[1] += size
            entry[3] = seq
            if enough(deleted, freed):
                break
    return deleted


# The drain order (priority high first, then seq) in pieces that each read one index range:
# priorities other than 0 from the partial index events_drain, priority 0 in rowid order.
_SELECT_EVENTS = "SELECT seq, topic, payload, qos, priority, event_time, attempts FROM events"
_AT_PRIORITY_AFTER = (  # (priority, seq, limit)
    _SELECT_EVENTS + " WHERE priority <> 0 AND priority = ? AND seq > ? ORDER BY seq LIMIT ?"
)
_BETWEEN_PRIORITIES = (  # (above, below, limit): priority strictly between them
    _SELECT_EVENTS + " WHERE priority <> 0 AND priority < ? AND priority > ?"
    " ORDER BY priority DESC, seq LIMIT ?"
)
_AT_ZERO_AFTER = _SELECT_EVENTS + " WHERE priority = 0 AND seq > ? ORDER BY seq LIMIT ?"


def _drain_queries(after: tuple[int, int] | None) -> list[tuple[str, tuple[float, ...]]]:
    """The queries (each still missing its LIMIT) that read the events after ``after``."""
    queries: list[tuple[str, tuple[float, ...]]] = []
    priority: float
    if after is None:
        priority, seq = math.inf, 0  # above every priority
    else:
        priority, seq = after
        if priority != 0:
            queries.append((_AT_PRIORITY_AFTER, (priority, seq)))
    if priority > 0:
        queries.append((_BETWEEN_PRIORITIES, (priority, 0)))
    if priority >= 0:
        queries.append((_AT_ZERO_AFTER, (seq if priority == 0 else -math.inf,)))
    queries.append((_BETWEEN_PRIORITIES, (min(priority, 0), -math.inf)))
    return queries


def _next_events(
    db: sqlite3.Connection, limit: int, after: tuple[int, int] | None
) -> list[StoredEvent]:
    rows: list[tuple[int, str, bytes, int, int, int, int]] = []
    for query, args in _drain_queries(after):
        if len(rows) >= limit:
            break
        rows += db.execute(query, (*args, limit - len(rows))).fetchall()
    return list(map(StoredEvent._make, rows))


_DELETE_CHUNK = 500  # well under SQLITE_MAX_VARIABLE_NUMBER (999 before SQLite 3.32)


def _delete(
    db: sqlite3.Connection, seqs: list[int], totals: _Totals, drop_reason: str | None
) -> int:
    if not seqs:
        return 0
    with _transaction(db, totals):
        removed = 0
        size = 0
        per_topic: dict[str, list[int]] = {}
        # One statement per chunk, not per seq: the drain deletes every event it delivers, and
        # a Python-level loop per row holds the GIL the event loop needs.
        for first in range(0, len(seqs), _DELETE_CHUNK):
            chunk = seqs[first : first + _DELETE_CHUNK]
            found = db.execute(
                "DELETE FROM events WHERE seq IN"  # noqa: S608  # only placeholders
                f" ({','.join('?' * len(chunk))}) RETURNING topic, length(payload)",
                chunk,
            ).fetchall()
            removed += len(found)
            size += sum(length for _, length in found)
            if drop_reason is not None:
                for topic, length in found:
                    entry = per_topic.setdefault(topic, [0, 0])
                    entry[0] += 1
                    entry[1] += length
        if drop_reason is not None:
            _count_drops(db, drop_reason, per_topic)
        totals.events -= removed
        totals.bytes -= size
        _keep_high_water(db, totals)
    return removed


def _record_attempt(db: sqlite3.Connection, seqs: list[int]) -> None:
    with _transaction(db):
        db.executemany(
            "UPDATE events SET attempts = attempts + 1 WHERE seq = ?", [(s,) for s in seqs]
        )


def _dead_letter(
    db: sqlite3.Connection, seq: int, reason: str, now_ms: int, totals: _Totals
) -> bool:
    with _transaction(db, totals):
        moved = db.execute(
            "INSERT OR IGNORE INTO dead_letters"
            " SELECT seq, topic, payload, qos, priority, event_time, attempts, ?, ?"
            " FROM events WHERE seq = ?",
            (reason, now_ms, seq),
        ).rowcount
        row = db.execute("DELETE FROM events WHERE seq = ? RETURNING length(payload)", (seq,))
        found = row.fetchone()
        if found is not None:
            totals.events -= 1
            totals.bytes -= found[0]
        _keep_high_water(db, totals)
    return bool(moved)


def _requeue_dead(db: sqlite3.Connection, totals: _Totals) -> int:
    with _transaction(db, totals):
        moved = db.execute(
            "INSERT OR IGNORE INTO events"
            " (seq, topic, payload, qos, priority, event_time, expires_at, attempts)"
            " SELECT seq, topic, payload, qos, priority, event_time, NULL, 0 FROM dead_letters"
        ).rowcount
        db.execute("DELETE FROM dead_letters")
        _keep_high_water(db, totals)
    _load_totals(db, totals)
    return moved


def _sweep(db: sqlite3.Connection, now_ms: int, totals: _Totals) -> dict[str, tuple[int, int, int]]:
    with _transaction(db, totals):
        rows = db.execute(
            "DELETE FROM events WHERE expires_at IS NOT NULL AND expires_at <= ?"
            " RETURNING seq, topic, length(payload)",
            (now_ms,),
        ).fetchall()
        per_topic: dict[str, list[int]] = {}
        for seq, topic, size in rows:
            entry = per_topic.setdefault(topic, [0, 0, seq, seq])
            entry[0] += 1
            entry[1] += size
            entry[2] = min(entry[2], seq)
            entry[3] = max(entry[3], seq)
            totals.events -= 1
            totals.bytes -= size
        _count_drops(db, "ttl", per_topic)
        _keep_high_water(db, totals)
    return {topic: (v[0], v[2], v[3]) for topic, v in per_topic.items()}


def _stats(db: sqlite3.Connection) -> BufferStats:
    db.execute("BEGIN")  # one consistent snapshot for every query below
    try:
        epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        topics = [
            TopicStats(*row)
            for row in db.execute(
                "SELECT topic, count(*), sum(length(payload)), min(event_time) FROM events"
                " GROUP BY topic ORDER BY topic"
            )
        ]
        drops = {
            (reason, topic): (events, size)
            for reason, topic, events, size in db.execute("SELECT * FROM drops")
        }
        dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        incidents = [
            Incident(*row)
            for row in db.execute("SELECT at, kind, detail FROM incidents ORDER BY at")
        ]
        _, last_seq = _seq_marks(db)
    finally:
        db.execute("COMMIT")
    return BufferStats(
        epoch=epoch,
        events=sum(t.events for t in topics),
        bytes=sum(t.bytes for t in topics),
        topics=topics,
        drops=drops,
        dead_letters=dead,
        incidents=incidents,
        next_seq=last_seq + 1,
    )


def _count_drops(db: sqlite3.Connection, reason: str, per_topic: dict[str, list[int]]) -> None:
    """Add to the persistent drop counters; each value starts with [events, bytes, ...]."""
    for topic, counts in per_topic.items():
        db.execute(
            "INSERT INTO drops VALUES (?, ?, ?, ?) ON CONFLICT (reason, topic) DO UPDATE"
            " SET events = events + excluded.events, bytes = bytes + excluded.bytes",
            (reason, topic, counts[0], counts[1]),
        )
