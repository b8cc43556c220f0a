"""The drain's and the operator's statements, on the buffer's thread: reads in drain order,
deletes, attempts and poison counts, dead letters and their requeue, reprioritizing, the TTL
sweep and the statistics; and `_Draining`, the `Buffer` methods that run them. (Inserts and the
``on_full`` policies: `edge_agent.buffer.store`.)"""

from __future__ import annotations

import json
import logging
import math
import operator
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, pairwise

from edge_agent.buffer.droplog import DropLog
from edge_agent.buffer.files import (
    _keep_high_water,
    _load_epoch,
    _load_totals,
    _seq_marks,
    _transaction,
)
from edge_agent.buffer.model import (
    BufferError,
    BufferStats,
    DeadLetter,
    Incident,
    StoredEvent,
    T,
    TopicStats,
    _Totals,
)
from edge_agent.buffer.reserve import WalRescue
from edge_agent.buffer.store import _count_drops
from mqtt_ingest import failpoints
from mqtt_ingest.clock import Clock

log = logging.getLogger("edge_agent.buffer")

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


_READ_CHUNK = 64  # rows fetched at a time by `_next_events` (a page overshoots its budget by less)
_PAYLOAD = operator.itemgetter(2)


def _next_events(
    db: sqlite3.Connection,
    limit: int,
    after: tuple[int, int] | None,
    skip: frozenset[int],
    max_bytes: int | None,
    above: int | None,
) -> list[StoredEvent]:
    failpoints.hit("buffer.read")
    taken: list[StoredEvent] = []
    size = 0
    budget = math.inf if max_bytes is None else max_bytes
    make = StoredEvent._make
    for query, args in _drain_queries(after):
        if len(taken) >= limit or size >= budget:
            break
        # In chunks, not fetchall: a page of large events stops at the byte budget instead of
        # holding 1000 x max_payload in memory. Each chunk is filtered and measured with
        # C-level iteration (the thread holds the GIL the event loop needs meanwhile).
        cursor = db.execute(query, (*args, limit - len(taken) + len(skip)))
        try:
            while len(taken) < limit and size < budget:
                rows = cursor.fetchmany(_READ_CHUNK)
                if not rows:
                    break
                last = above is not None and rows[-1][4] <= above
                if last:  # drain order: every row after the first such one is lower too
                    rows = [row for row in rows if row[4] > above]
                if skip:
                    rows = [row for row in rows if row[0] not in skip]
                del rows[limit - len(taken) :]
                grown = size + sum(map(len, map(_PAYLOAD, rows)))
                if grown >= budget:  # the page ends with the row that reaches the budget
                    for index, row in enumerate(rows):
                        size += len(row[2])
                        if size >= budget:
                            del rows[index + 1 :]
                            break
                else:
                    size = grown
                taken += map(make, rows)
                if last:
                    return taken
        finally:
            cursor.close()  # ends the statement (and its read snapshot) at once
    return taken


def _take(
    db: sqlite3.Connection,
    held: set[int],
    limit: int,
    after: tuple[int, int] | None,
    skip: frozenset[int],
    max_bytes: int | None,
    above: int | None,
) -> list[StoredEvent]:
    """`_next_events`, the events read added to ``held`` (on the buffer's thread, where the
    sweep and the drops read it: an event read is held before anything can expire it)."""
    events = _next_events(db, limit, after, skip, max_bytes, above)
    held.update(event.seq for event in events)
    return events


def _hold(db: sqlite3.Connection, held: set[int], seq: int) -> bool:
    """Whether event ``seq`` is still buffered; if it is, it is added to ``held`` in the same
    step (on the buffer's thread: no sweep can come in between)."""
    if db.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone() is None:
        return False
    held.add(seq)
    return True


def _release(db: sqlite3.Connection, held: set[int], keep: frozenset[int]) -> None:
    held.intersection_update(keep)


_DELETE_CHUNK = 512  # a power of two, under SQLITE_MAX_VARIABLE_NUMBER (999 before SQLite 3.32)
_MIN_RUN = 32  # consecutive seqs deleted as one range rather than in an IN list


def _padded(chunk: list[int]) -> list[int]:
    """``chunk`` repeated at its end up to a power of two (an IN list is a set: no effect), so
    that the deletes prepare at most 10 statements of each kind. The sqlite3 module caches 128
    prepared statements per connection, and one with a 500-value IN list holds ~120 KB: with a
    statement per chunk length the cache grew the agent by up to ~15 MB."""
    size = 1 << (len(chunk) - 1).bit_length()
    return chunk + chunk[-1:] * (size - len(chunk))


def _runs(seqs: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """``seqs`` (sorted) as ranges of at least `_MIN_RUN` consecutive seqs, first to last, and
    the seqs outside them. A repeated seq ends a run (and starts the next with itself): deleted
    by the first statement, it is not there for the second to count.

    A drain delivers in seq order, so what it deletes is mostly one run or a few: SQLite deletes
    a range in one walk along the table's leaves, instead of one search per seq of an IN list
    (~20% less time per delete). The runs' starts are found in C (the buffer's thread holds the
    GIL the event loop needs while it runs Python).
    """
    starts = [
        0,
        *compress(range(1, len(seqs)), map((1).__ne__, map(operator.sub, seqs[1:], seqs))),
        len(seqs),
    ]
    ranges: list[tuple[int, int]] = []
    scattered: list[int] = []
    for start, end in pairwise(starts):
        if end - start >= _MIN_RUN:
            ranges.append((seqs[start], seqs[end - 1]))
        else:
            scattered += seqs[start:end]
    return ranges, scattered


def _delete(
    db: sqlite3.Connection,
    seqs: list[int],
    totals: _Totals,
    drop_reason: str | None,
    rescue: WalRescue,
    held: set[int],
) -> int:
    if not seqs:
        return 0
    failpoints.hit("buffer.delete")  # a delete that fails (a full disk that no checkpoint helps)
    removed = rescue.attempt(db, _delete_once, seqs, totals, drop_reason)
    held.difference_update(seqs)
    return removed


_COUNT_RANGE = (
    "SELECT topic, count(*), sum(length(payload)) FROM events WHERE seq BETWEEN ? AND ?"
    " GROUP BY topic"
)


def _delete_once(
    db: sqlite3.Connection, seqs: list[int], totals: _Totals, drop_reason: str | None
) -> int:
    ranges, scattered = _runs(sorted(seqs))  # no set: 5,600 seqs make a 256 KiB table
    # Statements per range or chunk, not per seq, and none that returns a row per event: the
    # drain deletes every event it delivers, and each row stepped out of SQLite takes the GIL
    # back from the event loop (the sqlite3 module releases it around every step).
    statements: list[tuple[str, str, Sequence[int]]] = [
        (_COUNT_RANGE, "DELETE FROM events WHERE seq BETWEEN ? AND ?", bounds) for bounds in ranges
    ]
    for first in range(0, len(scattered), _DELETE_CHUNK):
        chunk = _padded(scattered[first : first + _DELETE_CHUNK])
        marks = ",".join("?" * len(chunk))
        statements.append(
            (
                "SELECT topic, count(*), sum(length(payload)) FROM events"  # noqa: S608
                f" WHERE seq IN ({marks}) GROUP BY topic",  # only placeholders
                f"DELETE FROM events WHERE seq IN ({marks})",  # noqa: S608
                chunk,
            )
        )
    with _transaction(db, totals):
        removed = 0
        size = 0
        per_topic: dict[str, list[int]] = {}
        for count, delete, args in statements:
            for topic, events, length in db.execute(count, args):
                removed += events
                size += length
                entry = per_topic.setdefault(topic, [0, 0])
                entry[0] += events
                entry[1] += length
            db.execute(delete, args)
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


def _record_losses(db: sqlite3.Connection, seq: int, losses: int) -> None:
    with _transaction(db):
        db.execute(
            "INSERT INTO suspects VALUES (?, ?)"
            " ON CONFLICT (seq) DO UPDATE SET losses = excluded.losses",
            (seq, losses),
        )


def _suspects(db: sqlite3.Connection, limit: int) -> tuple[list[StoredEvent], dict[int, int]]:
    with _transaction(db):
        # Rows of events delivered, dropped or purged since (seqs are never given out again).
        db.execute("DELETE FROM suspects WHERE seq NOT IN (SELECT seq FROM events)")
        losses = dict(db.execute("SELECT seq, losses FROM suspects"))
        rows = db.execute(
            _SELECT_EVENTS  # noqa: S608  # constants only
            + " WHERE seq IN (SELECT seq FROM suspects ORDER BY seq LIMIT ?) ORDER BY seq",
            (limit,),
        )
        return list(map(StoredEvent._make, rows)), losses


def _dead_letter(
    db: sqlite3.Connection, seq: int, reason: str, now_ms: int, totals: _Totals, held: set[int]
) -> bool:
    held.discard(seq)
    with _transaction(db, totals):
        db.execute("DELETE FROM suspects WHERE seq = ?", (seq,))  # requeued: counted afresh
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
            if moved:
                totals.dead_events += 1
                totals.dead_bytes += found[0]
        _keep_high_water(db, totals)
    return bool(moved)


def _epoch(db: sqlite3.Connection) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    return None if row is None else str(row[0])


def _dead_letters(db: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    rows = db.execute(
        "SELECT seq, topic, payload, attempts, reason, dead_at FROM dead_letters"
        " ORDER BY seq LIMIT ?",
        (limit,),
    )
    return [DeadLetter(*row) for row in rows]


def _requeue_dead(
    db: sqlite3.Connection,
    totals: _Totals,
    limits: tuple[int, int],
    ttl: Callable[[str], float | None],
    now_ms: int,
) -> int:
    with _transaction(db, totals):
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM dead_letters"
        ).fetchone()
        max_events, max_bytes = limits
        # Counted against the limits already (with the events): this refuses only where the
        # limits were lowered since they were made.
        if totals.events + count > max_events or totals.bytes + size > max_bytes:
            raise BufferError(
                f"the {count} dead letters ({size} bytes) do not fit beside the {totals.events}"
                f" events ({totals.bytes} bytes) buffered: max_events {max_events}, max_bytes"
                f" {max_bytes}; let the backlog drain (or purge) first"
            )
        moved = db.execute(
            "INSERT OR IGNORE INTO events"
            " (seq, topic, payload, qos, priority, event_time, expires_at, attempts)"
            " SELECT seq, topic, payload, qos, priority, event_time, NULL, 0 FROM dead_letters"
        ).rowcount
        topics = [row[0] for row in db.execute("SELECT DISTINCT topic FROM dead_letters")]
        for topic in topics:
            if (seconds := ttl(topic)) is not None:
                db.execute(
                    "UPDATE events SET expires_at = ?"
                    " WHERE topic = ? AND seq IN (SELECT seq FROM dead_letters)",
                    (now_ms + int(seconds * 1000), topic),
                )
        db.execute("DELETE FROM dead_letters")
        _keep_high_water(db, totals)
    _load_totals(db, totals)
    return moved


def _reprioritize(
    db: sqlite3.Connection, priority_of: Callable[[str], int], totals: _Totals
) -> int:
    """Give every buffered event its topic's priority of now: how many changed. One scan for the
    (topic, priority) pairs, one update."""
    pairs = db.execute("SELECT DISTINCT topic, priority FROM events").fetchall()
    wanted = {topic: priority_of(topic) for topic, _ in pairs}
    changed = {topic: wanted[topic] for topic, priority in pairs if wanted[topic] != priority}
    if not changed:
        return 0
    with _transaction(db):
        db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_priority"
            " (topic TEXT PRIMARY KEY, priority INTEGER NOT NULL)"
        )
        db.execute("DELETE FROM temp.new_priority")
        db.executemany("INSERT INTO temp.new_priority VALUES (?, ?)", changed.items())
        wanted_sql = "(SELECT n.priority FROM temp.new_priority AS n WHERE n.topic = events.topic)"
        count: int = db.execute(
            f"UPDATE events SET priority = {wanted_sql}"  # noqa: S608  # constants only
            f" WHERE topic IN (SELECT topic FROM temp.new_priority) AND priority <> {wanted_sql}"
        ).rowcount
        db.execute("DELETE FROM temp.new_priority")
    totals.nothing_at_or_below = -1  # events may have come down to any priority
    return count


def _sweep(
    db: sqlite3.Connection, now_ms: int, totals: _Totals, rescue: WalRescue, held: set[int]
) -> dict[str, tuple[int, int, int]]:
    """Delete the events whose TTL passed, but not those ``held`` by the drain (sent, or on
    their way: they may be delivered, and counted as expired they would be phantom drops)."""
    return rescue.attempt(db, _sweep_once, now_ms, totals, held)


def _sweep_once(
    db: sqlite3.Connection, now_ms: int, totals: _Totals, held: set[int]
) -> dict[str, tuple[int, int, int]]:
    with _transaction(db, totals):
        if held:
            rows = db.execute(
                "DELETE FROM events WHERE expires_at IS NOT NULL AND expires_at <= ?"
                " AND seq NOT IN (SELECT value FROM json_each(?))"
                " RETURNING seq, topic, length(payload)",
                (now_ms, json.dumps(sorted(held))),
            ).fetchall()
        else:
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
    failpoints.hit("buffer.stats")  # a slow scan (a large backlog on an SD card)
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
        dead, dead_bytes = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM dead_letters"
        ).fetchone()
        incidents = [
            Incident(*row)
            for row in db.execute("SELECT at, kind, detail FROM incidents ORDER BY at")
        ]
        _, last_seq = _seq_marks(db)
    finally:
        # An I/O error (a temporary file of the GROUP BY over RLIMIT_FSIZE) ends the
        # transaction by itself: a COMMIT then raised "no transaction is active" instead.
        if db.in_transaction:
            db.execute("COMMIT")
    return BufferStats(
        epoch=epoch,
        events=sum(t.events for t in topics),
        bytes=sum(t.bytes for t in topics),
        topics=topics,
        drops=drops,
        dead_letters=dead,
        dead_letter_bytes=dead_bytes,
        incidents=incidents,
        next_seq=last_seq + 1,
    )


def _first_reads(db: sqlite3.Connection) -> tuple[_Totals, str]:
    """The open's first reads, on the buffer thread: the totals kept in memory and the epoch.
    `_stats` reads every topic (and `_open_checked` quarantines a database whose topics, or
    ``meta`` values, these reads find damaged, instead of failing every start)."""
    totals = _Totals()
    _load_totals(db, totals)
    _load_epoch(db)  # a missing epoch row: `_Damaged`, not a TypeError in `_stats`
    return totals, _stats(db).epoch


class _Draining:
    """`Buffer`'s calls for the drain and the operator: each runs its statements above as one
    call on the buffer's thread (`Buffer._run`), with the state the buffer keeps in memory."""

    _held: set[int]
    _totals: _Totals
    _rescue: WalRescue
    _drop_log: DropLog
    _clock: Clock
    _max_events: int
    _max_bytes: int

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        raise NotImplementedError  # `Buffer._run`

    async def next_events(
        self,
        limit: int,
        after: tuple[int, int] | None = None,
        *,
        skip: frozenset[int] = frozenset(),
        max_bytes: int | None = None,
        above: int | None = None,
        hold: bool = False,
    ) -> list[StoredEvent]:
        """Up to ``limit`` events in drain order: priority (high first), then seq.

        ``after`` = (priority, seq) of the last event already taken, to page through the backlog.
        Events whose seq is in ``skip`` are passed over; the page ends once its payloads reach
        ``max_bytes`` (at least one event is returned), and at the first event of a priority at
        or below ``above``.

        With ``hold`` (the uplink's reads) the events are held until they are deleted or
        `release_held` is called: sent, their outcome unknown, they may be delivered, so the TTL
        sweep and ``drop-oldest`` pass them over (SPEC P4: a drop counted for an event that is
        delivered all the same is a phantom drop).
        """
        if hold:
            return await self._run(_take, self._held, limit, after, skip, max_bytes, above)
        return await self._run(_next_events, limit, after, skip, max_bytes, above)

    async def release_held(self, keep: Iterable[int] = ()) -> None:
        """The drain's connection is over: what it held and did not delete (in flight when the
        connection was lost, never sent) is back in the buffer, where TTLs and drops apply;
        except ``keep``: events acknowledged whose rows could not be deleted (delivered, they
        must never count as expired), held until a later `delete` removes them."""
        await self._run(_release, self._held, frozenset(keep))

    async def delete(self, seqs: Sequence[int], *, drop_reason: str | None = None) -> int:
        """Remove events (idempotent); returns how many were still there.

        Delivered events are just deleted; with ``drop_reason`` (an operator's purge) they are
        counted as dropped for that reason, per topic, and logged.
        """
        removed = await self._run(
            _delete, list(seqs), self._totals, drop_reason, self._rescue, self._held
        )
        if drop_reason is not None:
            log.warning("buffer: %d events dropped: %s", removed, drop_reason)
        return removed

    async def hold(self, seq: int) -> bool:
        """Whether event ``seq`` is still buffered (not delivered, dropped, expired, purged or
        dead-lettered); if it is, it is held as `next_events` with ``hold`` holds what it reads,
        checked and held in one step: the uplink sends an event set aside from its copy in
        memory, and the sweep must not expire it between the check and the PUBACK."""
        return await self._run(_hold, self._held, seq)

    async def record_attempt(self, seqs: Sequence[int]) -> None:
        await self._run(_record_attempt, list(seqs))

    async def record_losses(self, seq: int, losses: int) -> None:
        """Keep how many connection losses count against event ``seq`` as poison (SPEC §5), so
        that restarting the agent does not start them over (`suspect_losses`)."""
        await self._run(_record_losses, seq, losses)

    async def suspects(self, limit: int) -> tuple[list[StoredEvent], dict[int, int]]:
        """The counts `record_losses` kept, by seq, for the events still buffered, and the first
        ``limit`` of those events (by seq)."""
        return await self._run(_suspects, limit)

    async def dead_letter(self, seq: int, reason: str) -> bool:
        """Move one event to the dead-letter table; False if it is no longer buffered."""
        now_ms = int(self._clock.time() * 1000)
        return await self._run(_dead_letter, seq, reason, now_ms, self._totals, self._held)

    async def requeue_dead(self, ttl: Callable[[str], float | None] = lambda topic: None) -> int:
        """Move every dead letter back into the buffer (with its original seq), to expire after
        ``ttl(topic)`` seconds from now (None: never; the CLI passes the topic rules' TTL).

        Raises `BufferError` if they would not fit in the buffer's limits (nothing moves then).
        """
        now_ms = int(self._clock.time() * 1000)
        limits = (self._max_events, self._max_bytes)
        return await self._run(_requeue_dead, self._totals, limits, ttl, now_ms)

    async def reprioritize(self, priority_of: Callable[[str], int]) -> int:
        """Give every buffered event ``priority_of(its topic)``, once the topic rules changed:
        the drain is priority first, and events of one topic buffered at two priorities were
        sent out of seq order (the newer first). Returns how many events changed. One scan of
        the buffer, on its thread: commits wait meanwhile."""
        return await self._run(_reprioritize, priority_of, self._totals)

    async def sweep_expired(self) -> int:
        """Drop events whose TTL passed, but not those the drain holds (`next_events`); counted
        under reason ``ttl``."""
        now_ms = int(self._clock.time() * 1000)
        self._drop_log.flush()  # bursts of buffer-full drops that have ended
        dropped = await self._run(_sweep, now_ms, self._totals, self._rescue, self._held)
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
    def dead_letters(self) -> tuple[int, int]:
        """(events, payload bytes) in the dead-letter table, from memory: they count against
        `limits` with the `backlog`."""
        return self._totals.dead_events, self._totals.dead_bytes

    @property
    def limits(self) -> tuple[int, int]:
        """(``max_events``, ``max_bytes``)."""
        return self._max_events, self._max_bytes
