"""The buffer's inserts, on its own thread: group commits with the ``on_full`` policies and the
disk reserve. (The drain's and the operator's statements: `edge_agent.buffer.drain`.)"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import operator
import os
import resource
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.buffer.files import (
    DISK_FULL,
    _keep_high_water,
    _transaction,
)
from edge_agent.buffer.model import (
    DB_NAME,
    PAGE_SIZE,
    BufferFull,
    NewEvent,
    T,
    _Totals,
)
from mqtt_ingest import failpoints
from mqtt_ingest.disk import free_bytes, megabytes
from mqtt_ingest.sqlite_rows import insert_rows

log = logging.getLogger("edge_agent.buffer")

_DISK_FULL_ATTEMPTS = 4


class _DiskFull(Exception):
    """SQLite could not write (disk, RLIMIT_FSIZE or max_page_count); the transaction is gone."""


def _is_disk_full(exc: sqlite3.OperationalError) -> bool:
    return str(exc).lower().startswith(DISK_FULL)


class WalRescue:
    """Checkpoints the WAL after SQLite found no room to write, before the next attempt.

    SQLite checkpoints (and so lets the next transaction reuse the WAL from its start) only
    after a commit that grew the WAL past ``wal_autocheckpoint`` pages. A WAL that could not
    grow before that point (``RLIMIT_FSIZE`` under 1 MiB, another process filling the disk)
    failed every later commit, the drain's deletes too, so no checkpoint ever ran and the buffer
    neither drained nor took events again: one passive checkpoint after the failure cures that
    whenever the database file has room for the WAL's pages. On a disk that is really full the
    checkpoint fails too or does not help: then it runs at most once per `interval` seconds (a
    checkpoint that let the next attempt succeed does not count)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.checkpoints = 0
        """Checkpoints run after a failure so far."""
        self._quiet_until = -math.inf

    def after_full(self, db: sqlite3.Connection) -> bool:
        """Checkpoint after a failed transaction (rolled back) unless one ran less than
        `interval` ago without helping; whether one ran and completed (the next attempt writes
        the WAL from its start)."""
        now = time.monotonic()
        if now < self._quiet_until:
            return False
        self._quiet_until = now + self.interval
        self.checkpoints += 1
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            log.warning("buffer: no room to checkpoint the WAL either: %s", exc)
            return False
        return not busy and frames == copied

    def helped(self) -> None:
        """The attempt after a checkpoint succeeded: the next failure may checkpoint at once."""
        self._quiet_until = -math.inf

    def attempt(self, db: sqlite3.Connection, function: Callable[..., T], *args: object) -> T:
        """``function(db, *args)`` (one transaction), once more after a checkpoint if SQLite
        found no room to write the first time (the drain's deletes, the TTL sweep)."""
        try:
            return function(db, *args)
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc) or not self.after_full(db):
                raise
            log.info("buffer: %s: checkpointed the WAL, trying again", exc)
        result = function(db, *args)
        self.helped()
        return result


def _timed(db: sqlite3.Connection, function: Callable[..., T], *args: object) -> tuple[T, float]:
    """``function(db, *args)`` and the seconds it took (on the buffer thread, without queueing)."""
    started = time.perf_counter()
    result = function(db, *args)
    return result, time.perf_counter() - started


_ROW_OVERHEAD = 64
"""Bytes a row takes on disk beyond its payload and topic (record header, b-tree cell and index
entry), rounded up: the estimate a group is checked against the disk reserve with."""


_NEW_TOPIC = operator.itemgetter(0)
_NEW_PAYLOAD = operator.itemgetter(1)


def _rows_cost(payload_bytes: int, topic_bytes: int, rows: int) -> int:
    """Bytes ``rows`` rows take in the WAL or the database file, with 1/8 for the frame headers
    and the slack of partly filled pages."""
    return (payload_bytes + topic_bytes + _ROW_OVERHEAD * rows) * 9 // 8


def _row_cost(event: NewEvent) -> int:
    return _rows_cost(len(event.payload), len(event.topic), 1)


NEARLY_FULL = "the disk is nearly full"
"""How the reason of an event refused for the disk reserve starts."""
NEAR_FILE_LIMIT = "the database file is nearly at the file size limit"
"""How it starts when ``RLIMIT_FSIZE`` is what leaves no room (`DiskReserve`)."""
RESERVE_REFUSALS = (NEARLY_FULL, NEAR_FILE_LIMIT)


class DiskReserve:
    """Free space the buffer keeps on its filesystem for everything but new events: the deletes
    of the drain, the TTL sweep and the checkpoints that move the WAL into the database all write
    too. On a disk filled to the last byte none of them can, and the buffer stops draining
    (measured on a full tmpfs: every delete failed with "database or disk is full").

    New rows may grow the database file only above the reserve; the WAL, which a checkpoint
    lets the next transaction reuse from its start (and which is cut back to `WAL_SIZE_LIMIT`),
    may also take up to half of the reserve for a while (half of what is free, when another
    process took part of the reserve).

    Under ``RLIMIT_FSIZE`` the database file's room below the limit is counted too, with a
    reserve of at most a quarter of the limit (`FILE_LIMIT_SHARE`): with the whole reserve
    (16 MiB by default) a limit of 8 MiB (systemd's ``LimitFSIZE=8M``) refused every event on an
    empty database, with plenty of disk, saying that the disk was nearly full."""

    FILE_LIMIT_SHARE = 4
    """The reserve below ``RLIMIT_FSIZE`` is at most the limit divided by this. What it keeps
    is room for the checkpoints to write the WAL's pages into the database file; the drain's
    deletes mostly rewrite pages the file has, and the WAL is a file of its own (up to
    `WAL_SIZE_LIMIT` between checkpoints)."""

    def __init__(self, directory: Path, reserve: int) -> None:
        self.directory = directory
        self.reserve = reserve
        self._wal = directory / f"{DB_NAME}-wal"
        self._unmeasurable = False
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._file_limit = None if limit == resource.RLIM_INFINITY else limit
        """``RLIMIT_FSIZE``: no file may grow past it, whatever ``statvfs`` says."""

    def _free(self, db: sqlite3.Connection, page_size: int | None = None) -> _Free:
        """Bytes free on the filesystem and the reserve kept of them, or, when that leaves less
        room, those below ``RLIMIT_FSIZE`` for the database as the WAL holds it (its pages must
        fit in the file at the checkpoint, or it never completes and the WAL, once it reaches
        the limit, takes no commit again: not even a delete) and the reserve kept of them."""
        free = _Free(free_bytes(self.directory), self.reserve)
        if self._file_limit is not None:
            if page_size is None:
                (page_size,) = db.execute("PRAGMA page_size").fetchone()
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            reserve = min(self.reserve, self._file_limit // self.FILE_LIMIT_SHARE)
            below = _Free(self._file_limit - pages * page_size, reserve, self._file_limit)
            if below.bytes - below.reserve < free.bytes - free.reserve:
                return below
        return free

    def room(self, db: sqlite3.Connection, need: int) -> _Room | None:
        """None when ``need`` bytes of new rows fit (the common case: one ``statvfs``, and near
        the reserve one look at the free list); else what new rows may still take, after a
        passive checkpoint. Call it outside a transaction."""
        try:
            free = self._free(db)
        except OSError as exc:  # no check rather than no commits
            if not self._unmeasurable:
                log.warning("buffer: cannot measure the free disk space, not checked: %s", exc)
                self._unmeasurable = True
            return None
        if free.bytes - 2 * need >= free.reserve:
            return None
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (pages,) = db.execute("PRAGMA freelist_count").fetchone()
        room = _Room.above(free, pages * page_size)
        if dataclasses.replace(room).take(need):
            return None  # fits even if the WAL grows by all of it: no checkpoint needed
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:  # it had no room to grow the database either
            if not str(exc).lower().startswith(DISK_FULL):
                raise
            return room
        try:
            wal = os.stat(self._wal).st_size
        except FileNotFoundError:
            wal = 0
        if frames > 0 and frames != copied:  # a reader kept part of it: only the tail is reusable
            wal = max(0, wal - 32 - frames * (page_size + 24))
        room.wal = wal
        room.measured(self._free(db, page_size))  # after the checkpoint, which may grow the file
        return room


@dataclass(frozen=True)
class _Free:
    """Bytes free for the buffer's files and the reserve kept of them (`DiskReserve._free`)."""

    bytes: int
    reserve: int
    file_limit: int | None = None
    """``RLIMIT_FSIZE`` when it is what leaves the least room, else None (the filesystem)."""


@dataclass
class _Room:
    """What new rows may take without cutting into the reserve. A row is written twice: into the
    WAL (reusing the WAL file's space, else growing it) and, at a checkpoint, into the database
    file (reusing pages on its free list, else growing it)."""

    disk: int
    """Bytes free above the reserve (negative: the reserve is in use already), on the
    filesystem or below ``RLIMIT_FSIZE`` (`_Free`)."""
    slack: int
    """Bytes of the reserve the WAL may still take (it is reused and cut back later)."""
    wal: int
    """Bytes of the WAL file that new frames reuse."""
    pages: int
    """Bytes of the database's free list."""
    free: _Free

    @classmethod
    def above(cls, free: _Free, pages: int) -> _Room:
        room = cls(0, 0, 0, pages, free)
        room.measured(free)
        return room

    def measured(self, free: _Free) -> None:
        """Room from what is free; the WAL may take half of the reserve, or of what is free if
        another process took more."""
        self.free = free
        self.disk = free.bytes - free.reserve
        self.slack = min(free.reserve, free.bytes) // 2

    def wal_fits(self, cost: int) -> bool:
        """Whether the WAL could take a row of ``cost`` bytes (dropping rows cannot help it)."""
        return max(0, cost - self.wal) <= max(self.disk, 0) + self.slack

    def take(self, cost: int) -> bool:
        """Count a row of ``cost`` bytes in if it fits."""
        wal_growth = max(0, cost - self.wal)
        file_growth = max(0, cost - self.pages)
        above = max(self.disk, 0)
        if file_growth > above or wal_growth > above - file_growth + self.slack:
            return False
        from_above = min(wal_growth, above - file_growth)
        self.disk -= file_growth + from_above
        self.slack -= wal_growth - from_above
        self.wal = max(0, self.wal - cost)
        self.pages = max(0, self.pages - cost)
        return True

    def reason(self) -> str:
        free = self.free
        if free.file_limit is not None:
            return (
                f"{NEAR_FILE_LIMIT} (RLIMIT_FSIZE {megabytes(free.file_limit)}: "
                f"{megabytes(max(free.bytes, 0))} left, {megabytes(free.reserve)} of it is kept "
                "for draining)"
            )
        return (
            f"{NEARLY_FULL} ({megabytes(free.bytes)} free, disk_reserve "
            f"{megabytes(free.reserve)} is kept for draining)"
        )


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
                and totals.events + len(events) <= max_events
                and totals.bytes + size <= max_bytes
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


_ROW = "(?, ?, ?, ?, ?, ?, ?)"
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
            event.payload,
            event.qos,
            event.priority,
            event.event_time_ms,
            None if event.ttl is None else now_ms + int(event.ttl * 1000),
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
        return totals.events + 1 <= max_events and totals.bytes + size <= max_bytes

    if not fits(0, 0):
        if event.on_full == "reject":
            return BufferFull(event.topic, _which_limit(totals, size, max_events, max_bytes))
        _drop_oldest(db, event.priority, totals, dropped, fits, held)
        if not fits(0, 0):
            return BufferFull(
                event.topic,
                _which_limit(totals, size, max_events, max_bytes)
                + held.nothing_left(event.priority),
            )
    (seq,) = _insert_all(db, [event], totals, now_ms, size)
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
    if totals.events + 1 > max_events:
        return f"max_events ({max_events}) reached"
    return f"max_bytes ({max_bytes}) reached"


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
