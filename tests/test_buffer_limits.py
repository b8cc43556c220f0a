"""The SQLite buffer's limits and policies on its own: max_events and max_bytes (dead letters
counted with the events), the ``on_full`` policies (``reject``; ``drop-oldest`` sparing higher
priorities and the events the drain holds, and dropping nothing when it cannot make room), and
drops logged once per burst (SPEC P4)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent.buffer import Buffer, BufferFull
from edge_agent.buffer.files import _connect
from mqtt_ingest import FakeClock
from tests.harness.buffer import event


async def test_reject_when_full_by_count_and_by_bytes(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, max_events=3, max_bytes=100) as buffer:
        outcomes = await buffer.append([event(), event(), event(), event()])
        assert outcomes[:3] == [1, 2, 3]
        assert isinstance(outcomes[3], BufferFull)
        assert "max_events (3)" in outcomes[3].reason
        await buffer.delete([1, 2, 3])
        await buffer.append_one(event(b"a" * 90))
        with pytest.raises(BufferFull, match="max_bytes"):
            await buffer.append_one(event(b"b" * 20))
        with pytest.raises(BufferFull, match="payload alone"):
            await buffer.append_one(event(b"c" * 101, on_full="drop-oldest"))
        assert (await buffer.stats()).events == 1


async def test_drop_oldest_spares_higher_priorities_and_counts(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, max_events=4) as buffer:
        await buffer.append([event(topic="alarm", priority=9), event(topic="alarm", priority=9)])
        await buffer.append([event(topic="bulk", priority=1), event(topic="bulk", priority=1)])
        outcome = await buffer.append(
            [event(b"new", topic="bulk", priority=1, on_full="drop-oldest")]
        )
        assert outcome == [5]
        stats = await buffer.stats()
        assert stats.drops == {("buffer-full", "bulk"): (1, 1)}
        remaining = [e.seq for e in await buffer.next_events(10)]
        assert remaining == [1, 2, 4, 5]
        # A low priority event cannot push out higher priorities.
        await buffer.delete([4, 5])
        await buffer.append([event(topic="bulk", priority=1), event(topic="bulk", priority=1)])
        await buffer.append([event(topic="bulk", priority=1, on_full="drop-oldest")])
        assert [e.topic for e in await buffer.next_events(10)].count("alarm") == 2
        full = await buffer.append([event(topic="bulk", priority=0, on_full="drop-oldest")])
        assert isinstance(full[0], BufferFull)
        assert "no events of priority <= 0" in full[0].reason


async def test_drop_oldest_remembers_what_it_found_missing_until_it_is_not(
    tmp_path: Path,
) -> None:
    """A low-priority drop-oldest event at a buffer full of higher priorities scanned the whole
    table to find nothing to drop, once per event (37% off the drain at 10 such events a
    second with a million buffered). What it found missing is remembered, until an event of
    that priority is stored again or priorities change."""
    async with await Buffer.open(tmp_path, max_events=3) as buffer:
        await buffer.append([event(topic="alarm", priority=5) for _ in range(3)])
        for _ in range(2):  # the second one looks no further
            [full] = await buffer.append([event(topic="bulk", on_full="drop-oldest")])
            assert isinstance(full, BufferFull)
        await buffer.delete([1])  # delivered: room for one
        assert await buffer.append([event(b"old", topic="bulk")]) == [4]
        # Priority 0 is there again: dropped for the next one, not refused.
        assert await buffer.append([event(b"new", topic="bulk", on_full="drop-oldest")]) == [5]
        assert [e.payload for e in await buffer.next_events(10)][-1:] == [b"new"]
        await buffer.delete([5])
        assert await buffer.append([event(topic="alarm", priority=5)]) == [6]
        [full] = await buffer.append([event(topic="bulk", on_full="drop-oldest")])
        assert isinstance(full, BufferFull)  # priority 5 only again
        # The alarms' rule now says priority 0: they may be dropped for bulk events.
        await buffer.reprioritize(lambda topic: 0)
        assert await buffer.append([event(topic="bulk", on_full="drop-oldest")]) == [7]
        assert [e.seq for e in await buffer.next_events(10)] == [3, 6, 7]


async def test_a_drop_oldest_event_refused_all_the_same_drops_nothing(tmp_path: Path) -> None:
    """The droppable events (priority <= its own) cannot make room for it: it is refused and
    they stay. It used to drop them first and then be refused (SPEC: "if nothing can be
    dropped the event is refused", not "after dropping what could be")."""
    async with await Buffer.open(tmp_path, max_bytes=1000) as buffer:
        await buffer.append_one(event(b"h" * 600, topic="alarm", priority=5))
        await buffer.append_one(event(b"o" * 300, topic="bulk", priority=0))
        outcome = await buffer.append([event(b"n" * 500, topic="bulk", on_full="drop-oldest")])
        assert isinstance(outcome[0], BufferFull)
        assert "no events of priority <= 0" in outcome[0].reason
        stats = await buffer.stats()
        assert stats.drops == {}
        assert [e.seq for e in await buffer.next_events(10)] == [1, 2]
        # One that dropping the bulk event makes room for: stored, the drop counted.
        outcome = await buffer.append([event(b"s" * 150, topic="bulk", on_full="drop-oldest")])
        assert outcome == [3]
        stats = await buffer.stats()
        assert stats.drops == {("buffer-full", "bulk"): (1, 300)}
        assert [e.seq for e in await buffer.next_events(10)] == [1, 3]
        assert stats.bytes == 750


async def test_a_burst_of_drops_is_logged_once_not_per_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full buffer dropping the oldest at a low rate drops one event per commit: that was a
    log line per event (200 lines for 200 drops). Now: one line when the burst starts, one a
    minute while it lasts, one with the whole range when it ends (SPEC P4)."""
    clock = FakeClock()
    caplog.set_level(logging.WARNING, logger="edge_agent.buffer")
    async with await Buffer.open(tmp_path, max_events=3, commit_linger=0, clock=clock) as buffer:
        for _ in range(3 + 100):
            await buffer.append_one(event(on_full="drop-oldest"))
        for _ in range(13):  # the burst goes on: a drop every 5 s for 65 s
            clock.advance(5)
            await buffer.append_one(event(on_full="drop-oldest"))
        for _ in range(5):
            await buffer.append_one(event(on_full="drop-oldest"))
        clock.advance(11)
        await buffer.sweep_expired()  # notices the burst has ended
        assert (await buffer.stats()).drops[("buffer-full", "t")][0] == 118
    lines = [r.getMessage() for r in caplog.records if "drop" in r.getMessage()]
    assert lines == [
        "buffer: dropping events on 't': buffer-full (1, seq 1..1)",
        "buffer: still dropping events on 't': buffer-full"
        " (111 more, seq 2..112; 112 in this burst)",
        "buffer: dropped 118 events on 't': buffer-full (seq 1..118, the whole burst)",
    ]


async def test_drop_oldest_passes_over_events_the_drain_holds(tmp_path: Path) -> None:
    """drop-oldest dropped the oldest events, those in flight first, and counted them as
    dropped although they were delivered (phantom drops, SPEC P4). Now it drops the oldest it
    does not hold; when it holds every one, the event is refused, saying so, and accepted again
    once they are released."""
    async with await Buffer.open(tmp_path, max_events=4) as buffer:
        await buffer.append([event(b"%d" % i) for i in range(4)])
        sent = await buffer.next_events(2, hold=True)
        assert await buffer.append([event(topic="bulk", on_full="drop-oldest")]) == [5]
        assert [e.seq for e in await buffer.next_events(10)] == [1, 2, 4, 5]  # 3 dropped
        assert await buffer.delete([e.seq for e in sent]) == 2
        assert (await buffer.stats()).drops == {("buffer-full", "t"): (1, 1)}
        await buffer.append([event(topic="bulk") for _ in range(2)])
        await buffer.next_events(10, hold=True)  # all four in flight
        [full] = await buffer.append([event(topic="bulk", on_full="drop-oldest")])
        assert isinstance(full, BufferFull)
        assert full.reason == (
            "max_events (4) reached and the events of priority <= 0 left are all in flight"
        )
        assert (await buffer.stats()).drops == {("buffer-full", "t"): (1, 1)}
        await buffer.release_held()  # the connection was lost: droppable again
        assert await buffer.append([event(topic="bulk", on_full="drop-oldest")]) == [8]
        assert (await buffer.stats()).drops[("buffer-full", "t")] == (2, 2)


async def test_drop_oldest_refused_after_dropping_leaves_the_rest_droppable(
    tmp_path: Path,
) -> None:
    """An event of a group that dropped old events and was refused all the same (only held
    ones left) gets its drops undone; what the scan learned past them is forgotten with them,
    so the next event of the group still finds them to drop."""
    async with await Buffer.open(tmp_path, max_events=10, max_bytes=100) as buffer:
        await buffer.append([event(b"o" * 20) for _ in range(4)] + [event(b"s" * 5)] * 2)
        await buffer.next_events(2, hold=True)  # seqs 1 and 2 in flight
        big, small = await buffer.append(
            [event(b"B" * 70, on_full="drop-oldest"), event(b"b" * 15, on_full="drop-oldest")]
        )
        assert isinstance(big, BufferFull)
        assert big.reason.endswith("the events of priority <= 0 left are all in flight")
        assert small == 7
        assert [e.seq for e in await buffer.next_events(10)] == [1, 2, 4, 5, 6, 7]
        assert (await buffer.stats()).drops == {("buffer-full", "t"): (1, 20)}


def _count_drop_scans(db: sqlite3.Connection, scans: list[str]) -> None:
    def trace(sql: str) -> None:
        if sql.startswith("SELECT seq, topic, length(payload) FROM events WHERE priority <="):
            scans.append(sql)

    db.set_trace_callback(trace)


async def test_drop_oldest_reads_the_held_events_once_a_group_not_once_an_event(
    tmp_path: Path,
) -> None:
    """The held events are the oldest (the uplink reads in seq order). drop-oldest restarted its
    scan at seq 0 for each new event and stepped past every held row, 64 a statement: 10 s for
    one group of 1000 into a full buffer with 12,000 held (0.06 s with none). Now a group's scans
    go on where the last one stopped and step over runs of held seqs without reading them: here
    one statement an event, as with nothing held, where it took 21 (counted with SQLite's trace
    callback: work, not seconds). When everything droppable is held, the first event of the
    group finds out and the others are refused without a scan (it took 33 statements each)."""
    async with await Buffer.open(tmp_path, max_events=2000) as buffer:
        await buffer.append([event() for _ in range(2000)])
        after = None
        for _ in range(2):  # the uplink's reads: 1280 held
            page = await buffer.next_events(640, after, hold=True)
            after = (page[-1].priority, page[-1].seq)
        await buffer.delete(list(range(100, 1200, 100)))  # acknowledged: gaps in the held seqs
        scans: list[str] = []
        await buffer._run(_count_drop_scans, scans)
        group = [event(topic="bulk", on_full="drop-oldest") for _ in range(200)]
        assert await buffer.append(group) == list(range(2001, 2201))
        assert len(scans) <= 200 + 2, len(scans)
        assert (await buffer.stats()).drops == {("buffer-full", "t"): (189, 189)}
        while page := await buffer.next_events(1000, after, hold=True):  # now all in flight
            after = (page[-1].priority, page[-1].seq)
        scans.clear()
        outcomes = await buffer.append(group)
        assert all(isinstance(o, BufferFull) and "in flight" in o.reason for o in outcomes)
        assert len(scans) <= 10, len(scans)
        assert (await buffer.stats()).drops == {("buffer-full", "t"): (189, 189)}


async def test_an_event_inserted_in_a_group_is_droppable_by_the_next_ones(tmp_path: Path) -> None:
    """Found by review: a group's drops learned "only held events left at priority <= 0" and
    kept it after an event of priority 0 was inserted later in the same group: the next
    drop-oldest event was refused "all in flight" with that event there to drop."""
    async with await Buffer.open(tmp_path, max_events=100, max_bytes=1100) as buffer:
        await buffer.append([event(b"h" * 100, priority=0), event(b"x" * 1000, priority=8)])
        # The drain read the priority-0 event while it was the highest (the priority-8 one came
        # later): it is held.
        [held] = await buffer.next_events(1, hold=True, skip=frozenset({2}))
        assert held.seq == 1
        a, d, b, c = await buffer.append(
            [
                event(b"a" * 50, priority=0, on_full="drop-oldest"),  # only held left: refused
                event(b"d" * 10, priority=9, on_full="drop-oldest"),  # drops seq 2 (1000 B)
                event(b"b" * 50, priority=0, on_full="drop-oldest"),  # fits, not held
                event(b"c" * 960, priority=0, on_full="drop-oldest"),  # drops b
            ]
        )
        assert isinstance(a, BufferFull)
        assert "all in flight" in a.reason
        assert (d, b, c) == (3, 4, 5)  # seqs go to committed events only
        kept = [(e.seq, e.priority) for e in await buffer.next_events(10)]
    assert kept == [(3, 9), (1, 0), (5, 0)]


@pytest.mark.parametrize("limit", ["max_events", "max_bytes"])
async def test_dead_letters_count_against_the_buffer_limits(tmp_path: Path, limit: str) -> None:
    """The dead-letter table had no bound: dead letters piled up beside a buffer at its limits
    until the disk reserve refused everything. They count with the events now, before and after
    a restart, and the refusal says so; a requeue makes no room, a delivered event does."""
    limits = {"max_events": 4} if limit == "max_events" else {"max_bytes": 4000}
    async with await Buffer.open(tmp_path, **limits) as buffer:  # type: ignore[arg-type]
        assert await buffer.append([event(bytes(1000)) for _ in range(4)]) == [1, 2, 3, 4]
        assert await buffer.dead_letter(1, "poison")
        assert await buffer.dead_letter(2, "poison")
        assert buffer.backlog == (2, 2000)  # the backlog is what drains
        with pytest.raises(BufferFull, match=rf"{limit} \(4.*2 dead letters among them"):
            await buffer.append_one(event(bytes(1000)))
    async with await Buffer.open(tmp_path, **limits) as buffer:  # type: ignore[arg-type]
        with pytest.raises(BufferFull, match="2 dead letters among them"):
            await buffer.append_one(event(bytes(1000)))
        assert await buffer.requeue_dead() == 2
        with pytest.raises(BufferFull, match=f"{limit} "):
            await buffer.append_one(event(bytes(1000)))
        await buffer.delete([1])
        assert await buffer.append_one(event(bytes(1000))) == 5
        stats = await buffer.stats()
    assert (stats.events, stats.dead_letters, stats.dead_letter_bytes) == (4, 0, 0)


async def test_a_drop_oldest_event_the_dead_letters_leave_no_room_for_drops_nothing(
    tmp_path: Path,
) -> None:
    """Dead letters count against the limits and `drop-oldest` never drops them: an event
    larger than what they leave (or any event once they fill max_events) cannot be stored
    whatever is dropped. Each such event deleted every buffered event of its priority or lower
    in its savepoint, found no room, and rolled it all back: a scan and delete of the whole
    backlog per event on the buffer's thread (0.2 s per event over 100,000 events), and a
    refusal saying no events were left to drop."""
    deletes: list[str] = []

    def connect(path: Path) -> sqlite3.Connection:
        db = _connect(path)
        db.set_trace_callback(
            lambda sql: deletes.append(sql) if sql.startswith("DELETE FROM events") else None
        )
        return db

    async with await Buffer.open(tmp_path, max_bytes=10_000, connect=connect) as buffer:
        for seq in await buffer.append([event(bytes(2000)) for _ in range(4)]):
            assert isinstance(seq, int)
            assert await buffer.dead_letter(seq, "poison")
        await buffer.append([event(b"y") for _ in range(100)])
        deletes.clear()
        [refused] = await buffer.append([event(bytes(2500), on_full="drop-oldest")])
    assert isinstance(refused, BufferFull), refused
    assert "dead letters alone leave no room" in refused.reason, refused
    assert "left to drop" not in refused.reason, refused
    assert deletes == []  # nothing dropped and rolled back
