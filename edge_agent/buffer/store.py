"""The buffer's inserts, on its own thread: group commits with the ``on_full`` policies, checked
against the disk reserve (`edge_agent.buffer.reserve`). (The drain's and the operator's
statements: `edge_agent.buffer.drain`.)"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import operator
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from edge_agent.buffer.files import (
    _keep_high_water,
    _transaction,
)
from edge_agent.buffer.model import (
    PAGE_SIZE,
    BufferFull,
    NewEvent,
    T,
    _Totals,
)
from edge_agent.buffer.reserve import (
    _ROW_OVERHEAD,
    DiskReserve,
    WalRescue,
    _is_disk_full,
    _Room,
    _row_cost,
    _rows_cost,
)
from mqtt_ingest import failpoints
from mqtt_ingest.sqlite_rows import insert_rows

log = logging.getLogger("edge_agent.buffer")

_DISK_FULL_ATTEMPTS = 4


class _DiskFull(Exception):
    """SQLite could not write (disk, RLIMIT_FSIZE or max_page_count); the transaction is gone."""


def _timed(db: sqlite3.Connection, function: Callable[..., T], *args: object) -> tuple[T, float]:
    """``function(db, *args)`` and the seconds it took (on the buffer thread, without queueing)."""
    started = time.perf_counter()
    result = function(db, *args)
    return result, time.perf_counter() - started


_NEW_TOPIC = operator.itemgetter(0)
_NEW_PAYLOAD = operator.itemgetter(1)


def _insert_group(
    db: sqlite3.Connection,
    events: Sequence[NewEvent],
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    disk: DiskReserve | None = None,
    rescue: WalRescue | None = None,
    held: Set[int] = frozenset(),
) -> tuple[list[int | BufferFull], dict[tuple[str, str], tuple[int, int, int]]]:
    """Commit a whole group in one transaction; returns outcomes and drops (events, first, last).

    Events that would cut into the ``disk`` reserve are handled as on a full buffer: ``reject``
    events are refused and ``drop-oldest`` events drop old events to make room. When the disk is
    full all the same (SQLite found no room: another process took it, or ``RLIMIT_FSIZE`` or
    ``max_page_count``) SQLite rolls the transaction back, so the group is tried again in "disk
    full" mode: ``reject`` events are refused outright and ``drop-oldest`` events first drop old
    events to make room (more on each attempt). Before that, once, ``rescue`` checkpoints the
    WAL: when that lets the WAL be reused, the group is tried again as it was. Events ``held``
    by the drain (sent, their outcome unknown) are never dropped (`_Held`).
    """
    # C-level sums: this runs on every commit, on the thread that needs the GIL.
    size = sum(map(len, map(_NEW_PAYLOAD, events)))
    need = _rows_cost(size, sum(map(len, map(_NEW_TOPIC, events))), len(events))
    attempt = 0
    rescued: int | None = None  # the attempt a checkpoint was run for
    while attempt < _DISK_FULL_ATTEMPTS:
        try:
            room = None if disk is None else disk.room(db, need)
            result = _insert_group_once(
                db, events, size, totals, max_events, max_bytes, now_ms, attempt, room, held
            )
        except _DiskFull:
            log.warning(
                "buffer: the disk is full (attempt %d for %d events)", attempt + 1, len(events)
            )
            if rescued is None and rescue is not None and rescue.after_full(db):
                rescued = attempt  # the same attempt again: the WAL is reused from its start
            else:
                attempt += 1
            continue
        if rescue is not None and rescued == attempt:  # not a later one refusing events
            rescue.helped()
        return result
    return [BufferFull(e.topic, "the disk is full") for e in events], {}


def _insert_group_once(
    db: sqlite3.Connection,
    events: Sequence[NewEvent],
    size: int,
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    attempt: int,
    room: _Room | None,
    held: Set[int],
) -> tuple[list[int | BufferFull], dict[tuple[str, str], tuple[int, int, int]]]:
    outcomes: list[int | BufferFull] = []
    disk_full = _DiskFullDrops.at(attempt) if attempt else None
    passed = _Held(held)  # what this transaction's drops found held
    dropped: dict[
        tuple[str, str], list[int]
    ] = {}  # (reason, topic) -> [events, bytes, first, last]
    try:
        with _transaction(db, totals):
            if (
                disk_full is None
                and room is None
                and totals.fit(len(events), size, max_events, max_bytes)
            ):
                outcomes.extend(_insert_all(db, events, totals, now_ms, size))
            else:
                for event in events:
                    outcomes.append(
                        _insert_one_with_policy(
                            db,
                            event,
                            totals,
                            max_events,
                            max_bytes,
                            now_ms,
                            dropped,
                            disk_full,
                            room,
                            passed,
                        )
                    )
                _count_drops(db, "buffer-full", {topic: v for (_, topic), v in dropped.items()})
                _keep_high_water(db, totals)
            failpoints.hit("buffer.before_commit")
    except sqlite3.OperationalError as exc:
        if _is_disk_full(exc):
            raise _DiskFull(str(exc)) from None
        raise
    return outcomes, {key: (v[0], v[2], v[3]) for key, v in dropped.items()}


# Python's sqlite3 binds an int, float, str or bytearray as it is, but sends any other value
# (bytes, None) through its adapter lookup first, which raises and clears an AttributeError:
# 1.5 of the 2.2 µs per event that binding a row took here (measured with an INSERT failing at
# its first row), on the thread that needs the GIL while the event loop has it. So a payload is
# bound as a bytearray (stored as the same BLOB) and "no TTL" as '' (NULLIF makes it NULL).
_ROW = "(?, ?, ?, ?, ?, ?, NULLIF(?, ''))"
_INSERT_ROWS = (
    "INSERT INTO events (seq, topic, payload, qos, priority, event_time, expires_at) VALUES "
)


def _insert_all(
    db: sqlite3.Connection, events: Sequence[NewEvent], totals: _Totals, now_ms: int, size: int
) -> range:
    """The common case, everything fits: seqs assigned in order, multi-row INSERTs
    (`insert_rows`: about 5% more API accept rate than ``executemany`` in an A/B run)."""
    first = totals.last_seq + 1
    params: list[object] = []
    for seq, event in zip(itertools.count(first), events):
        params += (
            seq,
            event.topic,
            bytearray(event.payload),
            event.qos,
            event.priority,
            event.event_time_ms,
            "" if event.ttl is None else now_ms + int(event.ttl * 1000),
        )
    insert_rows(db, _insert_sql, params, 7, most=_MAX_CHUNK)
    if totals.nothing_at_or_below >= 0:
        lowest = min(event.priority for event in events)
        totals.nothing_at_or_below = min(totals.nothing_at_or_below, lowest - 1)
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
    disk_full: _DiskFullDrops | None,
    room: _Room | None,
    held: _Held,
) -> int | BufferFull:
    """One event of a group that does not simply fit: the topic's policy decides (``disk_full``:
    what the group's ``drop-oldest`` events drop after SQLite found the disk full, None for
    not; ``room``: what is left above the disk reserve, None for plenty). The events a
    ``drop-oldest`` event dropped stay only if it is stored: refused all the same, it drops
    nothing (a savepoint, and the counts kept in memory, are rolled back)."""
    if event.on_full == "reject":
        if disk_full is not None:
            return BufferFull(event.topic, "the disk is full")
        if room is not None and not room.take(_row_cost(event)):
            return BufferFull(event.topic, room.reason())
        return _insert_one(db, event, totals, max_events, max_bytes, now_ms, dropped, held)
    kept = [x for x in (totals, room, disk_full, held) if x is not None]
    saved = [[getattr(x, f.name) for f in dataclasses.fields(x)] for x in kept]
    drops = {key: entry.copy() for key, entry in dropped.items()}
    db.execute("SAVEPOINT event")
    outcome = _make_room(db, event, totals, dropped, disk_full, room, held) or _insert_one(
        db, event, totals, max_events, max_bytes, now_ms, dropped, held
    )
    if isinstance(outcome, BufferFull):
        db.execute("ROLLBACK TO event")
        found = totals.nothing_at_or_below
        learned = held.learned()
        undone = dropped != drops
        for state, values in zip(kept, saved, strict=True):
            for f, value in zip(dataclasses.fields(state), values, strict=True):
                setattr(state, f.name, value)
        if not undone:  # it dropped nothing: what it found missing (or held) is so still
            totals.nothing_at_or_below = max(totals.nothing_at_or_below, found)
            held.after, held.only_held = learned
        dropped.clear()
        dropped.update(drops)
    db.execute("RELEASE event")
    return outcome


def _make_room(
    db: sqlite3.Connection,
    event: NewEvent,
    totals: _Totals,
    dropped: dict[tuple[str, str], list[int]],
    disk_full: _DiskFullDrops | None,
    room: _Room | None,
    held: _Held,
) -> BufferFull | None:
    """For a ``drop-oldest`` event (in its savepoint): drop what the disk reserve or a full
    disk asks for; the refusal if that cannot be done, else None (`_insert_one` drops what the
    buffer's own bounds ask for)."""
    if room is not None and not room.take(cost := _row_cost(event)):
        if not room.wal_fits(cost):
            return BufferFull(event.topic, room.reason())
        making = _MakeRoom(room, cost)
        _drop_oldest(db, event.priority, totals, dropped, making, held)
        if not making.made:
            return BufferFull(event.topic, room.reason() + held.nothing_left(event.priority))
    if disk_full is not None:
        disk_full.want += _row_cost(event) << (disk_full.attempt - 1)
        if disk_full.freed < disk_full.want:
            _drop_oldest(db, event.priority, totals, dropped, disk_full.enough, held)
            if disk_full.freed == 0:
                return BufferFull(
                    event.topic,
                    "the disk is full" + held.nothing_left(event.priority),
                )
    return None


@dataclass
class _DiskFullDrops:
    """What the ``drop-oldest`` events of a group retried after SQLite found the disk full
    drop: the bytes of their own rows plus a few pages once per group for the b-tree, doubled on
    each further attempt (the rows' pages go to the database's free list, where the inserts find
    them). It used to be 4 KiB and more per event: one group of 20 small events dropped
    1,480 old ones."""

    attempt: int  # 1 for the first retry
    want: int  # bytes to drop so far
    freed: int = 0  # bytes of the rows dropped so far, with their overhead
    counted: int = 0  # of what the current `_drop_oldest` call dropped

    @classmethod
    def at(cls, attempt: int) -> _DiskFullDrops:
        return cls(attempt, (4 * PAGE_SIZE) << (attempt - 1))

    def enough(self, events: int, freed: int) -> bool:
        """`_drop_oldest`'s test (its counts are of the current call); (0, 0) before a call."""
        if events == 0 and freed == 0:
            self.counted = 0
        now = freed + events * _ROW_OVERHEAD
        self.freed += now - self.counted
        self.counted = now
        return self.freed >= self.want


def _insert_one(
    db: sqlite3.Connection,
    event: NewEvent,
    totals: _Totals,
    max_events: int,
    max_bytes: int,
    now_ms: int,
    dropped: dict[tuple[str, str], list[int]],
    held: _Held,
) -> int | BufferFull:
    size = len(event.payload)
    if size > max_bytes:
        return BufferFull(event.topic, f"the payload alone is over max_bytes ({max_bytes})")

    def fits(_: int, __: int) -> bool:
        return totals.fit(1, size, max_events, max_bytes)

    if not fits(0, 0):
        if event.on_full == "reject":
            return BufferFull(event.topic, _which_limit(totals, size, max_events, max_bytes))
        if totals.dead_events + 1 > max_events or totals.dead_bytes + size > max_bytes:
            # Drops never take dead letters: dropping every event would not make room (it did,
            # then rolled back: a scan and delete of the whole backlog per event).
            return BufferFull(
                event.topic,
                _which_limit(totals, size, max_events, max_bytes)
                + ", and the dead letters alone leave no room for this event",
            )
        _drop_oldest(db, event.priority, totals, dropped, fits, held)
        if not fits(0, 0):
            return BufferFull(
                event.topic,
                _which_limit(totals, size, max_events, max_bytes)
                + held.nothing_left(event.priority),
            )
    (seq,) = _insert_all(db, [event], totals, now_ms, size)
    # A row of its priority that is not held: below it, "only held rows left" no longer holds
    # (as `_insert_all` lowers `nothing_at_or_below`; a later event of that priority was
    # refused "all in flight" with this one there to drop).
    held.only_held = min(held.only_held, event.priority - 1)
    return seq


class _MakeRoom:
    """For `_drop_oldest`: enough once the rows dropped so far let ``room`` take a row of
    ``cost`` bytes (their pages go to the database's free list, where the insert finds them)."""

    def __init__(self, room: _Room, cost: int) -> None:
        self.room = room
        self.cost = cost
        self.counted = 0
        self.made = False

    def __call__(self, events: int, freed: int) -> bool:
        if self.made:  # asked again after saying yes: the row is counted in already
            return True
        made = freed + events * _ROW_OVERHEAD
        self.room.pages += made - self.counted
        self.counted = made
        self.made = self.room.take(self.cost)
        return self.made


def _bytes_freed(room: int) -> Callable[[int, int], bool]:
    def enough(_: int, freed: int) -> bool:
        return freed >= room

    return enough


def _which_limit(totals: _Totals, size: int, max_events: int, max_bytes: int) -> str:
    dead = (
        f" ({totals.dead_events} dead letters among them: `edge-agent buffer dead` shows them,"
        " `buffer requeue-dead` sends them again)"
        if totals.dead_events
        else ""
    )
    if totals.events + totals.dead_events + 1 > max_events:
        return f"max_events ({max_events}) reached{dead}"
    return f"max_bytes ({max_bytes}) reached{dead}"


@dataclass
class _Held:
    """What the drops of one group commit found of the events the drain holds
    (`Buffer.next_events` with ``hold``: sent, their outcome unknown; a drop counted for one that
    is then delivered would be a phantom, so `_drop_oldest` passes them over). They are the
    oldest events (the drain reads in seq order), and a scan from the start for each new event
    walked past all of them: 10 s for 1000 events into a full buffer with 12,000 held. The held
    set cannot change within a transaction (only the buffer's thread touches it), so each scan
    goes on where the last one for its priority stopped: the held rows are read once a group.
    The fields are replaced, never changed in place, so that a savepoint's state saved and put
    back (`_insert_one_with_policy`) restores them."""

    seqs: Set[int]
    after: Mapping[int, tuple[int, bool]] = field(default_factory=dict)
    """Per priority p: (seq, passed): every row of priority <= p up to seq is held (the rest up
    to there were dropped), and whether any was held."""
    only_held: int = -1
    """Every row left of this priority or a lower one is held (-1: not known)."""
    stopped: bool = False
    """The last `_drop_oldest` found nothing more to drop but held rows."""

    def learned(self) -> tuple[Mapping[int, tuple[int, bool]], int]:
        return self.after, self.only_held

    def nothing_left(self, priority: int) -> str:
        """The end of the reason of an event refused when `_drop_oldest` could not make room."""
        if self.stopped:
            return f" and the events of priority <= {priority} left are all in flight"
        return f" and no events of priority <= {priority} are left to drop"


_NOT_HELD: Set[int] = frozenset()


def _drop_oldest(
    db: sqlite3.Connection,
    priority: int,
    totals: _Totals,
    dropped: dict[tuple[str, str], list[int]],
    enough: Callable[[int, int], bool],
    held: _Held | None = None,
) -> int:
    """Delete the oldest events of priority <= ``priority`` until ``enough(events, bytes)`` of
    what was deleted so far says so, passing over those ``held`` by the drain. Returns how many
    were deleted."""
    deleted = 0
    freed = 0
    if held is not None:
        held.stopped = False
    if priority <= totals.nothing_at_or_below:
        return 0
    if held is not None and priority <= held.only_held:
        held.stopped = True
        return 0
    seqs = _NOT_HELD if held is None else held.seqs
    after, passed = (0, False) if held is None else held.after.get(priority, (0, False))
    limit = 64
    while not enough(deleted, freed):
        rows = db.execute(
            "SELECT seq, topic, length(payload) FROM events WHERE priority <= ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (priority, after, limit),
        ).fetchall()
        if not rows:
            if not passed:
                totals.nothing_at_or_below = max(totals.nothing_at_or_below, priority)
            elif held is not None:
                held.only_held = max(held.only_held, priority)
                held.stopped = True
            break
        before = deleted
        for seq, topic, size in rows:
            if seq <= after:  # in a run of held seqs passed over already
                continue
            after = seq  # everything up to here is held or deleted now
            if seq in seqs:
                passed = True
                while after + 1 in seqs:  # held seqs come in runs: no row to read for them
                    after += 1
                continue
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
        if deleted == before:  # a page of held rows: read on in longer pages
            limit = min(limit * 4, 4096)
    if held is not None and after:
        held.after = {**held.after, priority: (after, passed)}
    return deleted


def _count_drops(db: sqlite3.Connection, reason: str, per_topic: dict[str, list[int]]) -> None:
    """Add to the persistent drop counters; each value starts with [events, bytes, ...]."""
    for topic, counts in per_topic.items():
        db.execute(
            "INSERT INTO drops VALUES (?, ?, ?, ?) ON CONFLICT (reason, topic) DO UPDATE"
            " SET events = events + excluded.events, bytes = bytes + excluded.bytes",
            (reason, topic, counts[0], counts[1]),
        )
