"""The buffer's data: its schema, the events going in and out, its statistics and errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

SCHEMA_VERSION = 3
PAGE_SIZE = 1024
"""For new databases. Every commit rewrites whole pages (at least the last leaf of ``events``),
so at a few events per commit small pages write far fewer bytes per event (docs/buffer.md)."""
DISK_RESERVE = 16 * 1024**2
"""The default disk reserve (`reserve.DiskReserve`): room for the WAL to grow to its size limit
four times over, for the drain's deletes and the checkpoints that follow them."""
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
# Schema 3: the connection losses that count against an event as poison (edge_agent/suspects.py),
# kept so that restarts do not start them over. Rows only for such events: the drain's reads,
# inserts and deletes never touch it (rows of events gone since are removed at the next start).
_SUSPECTS = """
CREATE TABLE IF NOT EXISTS suspects (
    seq INTEGER PRIMARY KEY,
    losses INTEGER NOT NULL
) STRICT;
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
    + _SUSPECTS
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
    dead_letter_bytes: int = 0  # their payloads: counted against max_bytes with the events'


# An append waiting for the committer: its events, its future and whether it is `append_one`
# (whose future gets the one outcome, not a list). A plain tuple: one is made per event.
_Pending = tuple[Sequence[NewEvent], "asyncio.Future[Any]", bool]


@dataclass
class _Totals:
    """What the buffer thread keeps in memory between transactions (restored on a rollback)."""

    events: int = 0
    bytes: int = 0
    dead_events: int = 0
    dead_bytes: int = 0
    """The dead letters, counted against ``max_events``/``max_bytes`` with the events: a table
    without a bound grew beside the buffer's limits (until the disk reserve refused everything)."""
    last_seq: int = 0
    """The highest seq ever committed in this database."""
    high_water: int = 0
    """``meta.high_water`` as committed."""
    nothing_at_or_below: int = -1
    """No event of this priority or a lower one is stored (-1: not known). ``drop-oldest``
    looks no further then: finding nothing took a scan of the whole table, for each event of a
    low priority arriving at a buffer full of higher ones."""

    def restore(self, saved: _Totals) -> None:
        self.events, self.bytes = saved.events, saved.bytes
        self.dead_events, self.dead_bytes = saved.dead_events, saved.dead_bytes
        self.last_seq, self.high_water = saved.last_seq, saved.high_water
        self.nothing_at_or_below = saved.nothing_at_or_below

    def fit(self, events: int, size: int, max_events: int, max_bytes: int) -> bool:
        """Whether ``events`` more events of ``size`` bytes in all stay within the limits,
        dead letters counted."""
        return (
            self.events + self.dead_events + events <= max_events
            and self.bytes + self.dead_bytes + size <= max_bytes
        )
