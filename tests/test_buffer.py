"""The SQLite buffer on its own: group commit, seq/epoch, limits and policies, TTL, drain API,
lock, corruption and a full disk (RELIABILITY F7, F8, F20)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from edge_agent.buffer import (
    LOCK_NAME,
    PAGE_SIZE,
    SCHEMA_VERSION,
    Buffer,
    BufferError,
    BufferFull,
    BufferLocked,
    NewEvent,
    agent_pid,
    inspect,
    read_events,
)
from edge_agent.buffer.files import SEQ_GAP, WAL_SIZE_LIMIT, _connect
from mqtt_ingest import FakeClock, failpoints
from tests.harness.agent import start_agent, write_config
from tests.harness.disk import fill, free_bytes, small_disk
from tests.harness.process import ProcessFactory, console_script, rss_kib
from tests.harness.report import figures


def event(
    payload: bytes = b"x",
    *,
    topic: str = "t",
    priority: int = 0,
    on_full: Literal["reject", "drop-oldest"] = "reject",
    ttl: float | None = None,
    qos: int = 1,
) -> NewEvent:
    return NewEvent(topic, payload, qos, priority, 1_700_000_000_000, ttl, on_full)


async def test_concurrent_appends_share_commits_and_get_increasing_seqs(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, commit_linger=0.01) as buffer:
        seqs = await asyncio.gather(*(buffer.append_one(event(b"%d" % i)) for i in range(500)))
        assert sorted(seqs) == list(range(1, 501))
        assert buffer.commits < 50, f"{buffer.commits} commits for 500 concurrent appends"
    # Committed means on disk: another connection sees all of them.
    assert inspect(tmp_path).events == 500


async def test_deletes_of_every_size_count_right_and_prepare_few_statements(
    tmp_path: Path,
) -> None:
    """The drain deletes whatever was acknowledged, in batches of any size. Each IN list is
    padded to a power of two, so only a few statements are ever prepared: with one per length,
    the sqlite3 module's cache of 128 statements (~120 KB each with 500 values) grew the process
    by ~15 MB."""
    async with await Buffer.open(tmp_path) as buffer:
        await asyncio.gather(*(buffer.append_one(event(b"%d" % i)) for i in range(1200)))
        seq = 1
        for size in range(1, 49):  # 1,176 events, every chunk length once
            assert await buffer.delete([*range(seq, seq + size), seq]) == size  # a repeat too
            seq += size
        assert inspect(tmp_path).events == 1200 - seq + 1
        before = rss_kib()
        for size in range(300, 556):  # none of these seqs exist: only the statements matter
            assert await buffer.delete(list(range(10_000, 10_000 + size))) == 0
        grown = rss_kib() - before
    figures("256 delete sizes", rss_grown_kib=grown)
    assert grown < 6 * 1024


async def test_empty_many_and_single_appends_in_one_group(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, commit_linger=0.01) as buffer:
        outcomes = await asyncio.gather(
            buffer.append([]),
            buffer.append_one(event(b"one")),
            buffer.append([event(b"two"), event(b"three")]),
            buffer.append([]),
            buffer.append_one(event(b"four")),
        )
        assert list(outcomes) == [[], 1, [2, 3], [], 4]
        assert buffer.commits == 1
        # One event in a group of two appends.
        pair = await asyncio.gather(buffer.append([]), buffer.append_one(event(b"five")))
        assert list(pair) == [[], 5]
        payloads = [e.payload for e in await buffer.next_events(10)]
        assert payloads == [b"one", b"two", b"three", b"four", b"five"]
        # A group of nothing but empty appends, with the uplink's commit callback set: its
        # max() over no events killed the committer, and no later append was ever committed.
        woken: list[int] = []
        buffer.on_commit = woken.append
        assert await buffer.append([]) == []
        async with asyncio.timeout(5):
            assert await buffer.append_one(event(b"six")) == 6
        assert woken == [0]


async def test_seq_never_reused_and_epoch_kept_across_restarts(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        first = [await buffer.append_one(event()) for _ in range(3)]
        epoch = buffer.epoch
        await buffer.delete(first)
    async with await Buffer.open(tmp_path) as buffer:
        assert buffer.epoch == epoch
        assert await buffer.append_one(event()) == 4
    fresh = tmp_path / "other"
    async with await Buffer.open(fresh) as buffer:
        assert buffer.epoch != epoch
        assert len(buffer.epoch) == 16


async def test_seq_stays_above_deleted_newest_events_across_restarts(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        seqs = await buffer.append([event() for _ in range(5)])
        assert seqs == [1, 2, 3, 4, 5]
        await buffer.delete([4, 5])  # the newest two: only seq 3 is left
        assert (await buffer.stats()).next_seq == 6
    assert inspect(tmp_path).next_seq == 6
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.append_one(event()) == 6
        await buffer.delete([1, 2, 3, 6])  # now nothing is left
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.append_one(event()) == 7
        # A dead letter is still a used seq; moved back and delivered, it stays used.
        assert await buffer.dead_letter(7, "poison")
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.requeue_dead() == 1
        await buffer.delete([7])
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.append_one(event()) == 8


async def test_seq_stays_above_expired_and_dropped_newest_events(tmp_path: Path) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    async with await Buffer.open(tmp_path, clock=clock, max_events=2) as buffer:
        await buffer.append([event(), event(ttl=5)])
        clock.advance(6)
        assert await buffer.sweep_expired() == 1  # seq 2, the newest
        # drop-oldest makes room by dropping seq 1 and 3: the buffer holds only seq 4 then.
        await buffer.append([event(on_full="drop-oldest"), event(on_full="drop-oldest")])
        assert [e.seq for e in await buffer.next_events(10)] == [3, 4]
        await buffer.delete([3, 4])
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.append_one(event()) == 5


async def test_drain_order_pages_through_mixed_priorities(tmp_path: Path) -> None:
    priorities = [0, 9, 0, 1, -1, 0, 9, 5, 0, 1, 0, -1, 5, 0] * 7
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"%d" % n, priority=p) for n, p in enumerate(priorities)])
        expected = sorted(range(1, len(priorities) + 1), key=lambda s: (-priorities[s - 1], s))
        for page in (1, 3, 10, 1000):
            taken: list[int] = []
            after: tuple[int, int] | None = None
            while batch := await buffer.next_events(page, after):
                taken += [e.seq for e in batch]
                after = (batch[-1].priority, batch[-1].seq)
            assert taken == expected, f"page size {page}"
    assert [e.seq for e in read_events(tmp_path)] == expected


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


async def test_reprioritize_gives_buffered_events_their_topics_priority(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(topic="bulk"), event(topic="alarm"), event(topic="bulk")])
        rules = {"alarm": 9, "bulk": 0}
        assert await buffer.reprioritize(rules.__getitem__) == 1
        assert [e.seq for e in await buffer.next_events(10)] == [2, 1, 3]
        assert await buffer.reprioritize(rules.__getitem__) == 0  # nothing to change


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


async def test_ttl_sweep_drops_expired_events_and_counts(tmp_path: Path) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    async with await Buffer.open(tmp_path, clock=clock) as buffer:
        await buffer.append([event(topic="short", ttl=10), event(topic="short", ttl=10)])
        await buffer.append([event(topic="long", ttl=1000), event(topic="forever")])
        assert await buffer.sweep_expired() == 0
        clock.advance(11)
        assert await buffer.sweep_expired() == 2
        stats = await buffer.stats()
        assert [t.topic for t in stats.topics] == ["forever", "long"]
        assert stats.drops == {("ttl", "short"): (2, 2)}


async def test_the_ttl_sweep_passes_over_events_the_drain_holds(tmp_path: Path) -> None:
    """Events the uplink read are sent, or on their way: they may be delivered. The sweep
    deleted them under its feet and counted them as expired although their PUBACKs came
    (delivered 5, swept 5, drops {('ttl', 't'): (5, 50)} and "5 events on 't' expired": phantom
    drops, SPEC P4). Held, they are left alone; once the connection is over (released) what
    was not delivered expires like the rest."""
    clock = FakeClock(start=1_700_000_000.0)
    async with await Buffer.open(tmp_path, clock=clock) as buffer:
        await buffer.append([event(b"x" * 10, ttl=60.0) for _ in range(8)])
        page = await buffer.next_events(5, hold=True)  # in flight
        await buffer.next_events(10)  # a read without hold (`buffer export`) holds nothing
        clock.advance(61)
        assert await buffer.sweep_expired() == 3  # the 3 never sent
        assert await buffer.delete([e.seq for e in page[:4]]) == 4  # the PUBACKs: delivered
        assert (await buffer.stats()).drops == {("ttl", "t"): (3, 30)}
        # The connection is lost with the 5th in flight: back in the backlog, it expires.
        assert await buffer.sweep_expired() == 0
        await buffer.release_held()
        assert await buffer.sweep_expired() == 1
        stats = await buffer.stats()
    assert (stats.events, stats.drops) == (0, {("ttl", "t"): (4, 40)})


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


async def test_hold_takes_one_event_and_release_keeps_what_it_is_told(tmp_path: Path) -> None:
    """`hold`: an event set aside, sent again from its copy in memory, is held like a read
    one (the sweep deleted it under its retry's feet); one no longer buffered is not. Released
    with ``keep`` (acknowledged, its delete failed) an event stays held until deleted."""
    clock = FakeClock(start=1_700_000_000.0)
    async with await Buffer.open(tmp_path, clock=clock) as buffer:
        seqs = [s for s in await buffer.append([event(b"x", ttl=60.0)] * 4) if isinstance(s, int)]
        assert await buffer.hold(seqs[0])
        assert not await buffer.hold(10_000)  # not buffered: not held either
        await buffer.next_events(2, after=(0, seqs[0]), hold=True)  # seqs[1], seqs[2]
        clock.advance(61)
        assert await buffer.sweep_expired() == 1  # seqs[3] only
        await buffer.release_held(keep=[seqs[1]])
        assert await buffer.sweep_expired() == 2  # seqs[0], seqs[2]
        assert await buffer.delete([seqs[1]]) == 1  # delivered after all: deleted, never swept
        stats = await buffer.stats()
    assert (stats.events, stats.drops) == (0, {("ttl", "t"): (3, 3)})


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


async def test_drain_order_priority_then_seq_with_paging(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"low1"), event(b"high1", priority=5), event(b"low2")])
        await buffer.append([event(b"high2", priority=5), event(b"mid", priority=3)])
        first = await buffer.next_events(2)
        rest = await buffer.next_events(10, after=(first[-1].priority, first[-1].seq))
        order = [e.payload for e in first + rest]
        assert order == [b"high1", b"high2", b"mid", b"low1", b"low2"]
        assert [e.payload for e in read_events(tmp_path, limit=3)] == order[:3]


async def test_attempts_dead_letters_and_requeue(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        seq = await buffer.append_one(event(b"poison"))
        await buffer.record_attempt([seq])
        await buffer.record_attempt([seq])
        assert (await buffer.next_events(1))[0].attempts == 2
        assert await buffer.dead_letter(seq, "connection closed 2 times")
        stats = await buffer.stats()
        assert (stats.events, stats.dead_letters) == (0, 1)
        assert await buffer.requeue_dead() == 1
        back = await buffer.next_events(1)
        assert (back[0].seq, back[0].payload, back[0].attempts) == (seq, b"poison", 0)
        assert (await buffer.stats()).dead_letters == 0


async def test_a_drain_page_stops_at_its_byte_budget_and_skips_what_it_is_told(
    tmp_path: Path,
) -> None:
    """The drain reads a page of up to 1000 events: bounded by bytes too, or a backlog of large
    events held 2 x 1000 x max_payload in the agent (+592 MB measured with 200 KiB events)."""
    async with await Buffer.open(tmp_path) as buffer:
        for i in range(20):
            await buffer.append_one(event(bytes([i]) * 100_000, topic="big/t"))
        await buffer.append_one(event(b"urgent", topic="alarms/t", priority=5))
        page = await buffer.next_events(1000, max_bytes=350_000)
        # The priority-5 event first, then events until the budget is reached (at least one).
        assert [e.payload[:1] for e in page] == [b"u", b"\x00", b"\x01", b"\x02", b"\x03"]
        assert len(await buffer.next_events(1000, max_bytes=1)) == 1
        skipped = await buffer.next_events(3, skip=frozenset({page[1].seq, page[2].seq}))
        assert [e.seq for e in skipped] == [page[0].seq, page[3].seq, page[4].seq]
        above = await buffer.next_events(1000, above=0)
        assert [e.payload for e in above] == [b"urgent"]


async def test_one_buffer_per_directory(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path):
        with pytest.raises(BufferLocked, match=f"pid {os.getpid()}"):
            await Buffer.open(tmp_path)
    async with await Buffer.open(tmp_path):
        pass  # released on close


async def test_a_status_probe_of_the_lock_does_not_fail_a_starting_agent(tmp_path: Path) -> None:
    """`agent_pid` (status, publish, doctor) holds the lock shared for an instant; an agent
    starting then waits for it instead of exiting "another edge-agent"."""
    probe = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH)
    asyncio.get_running_loop().call_later(0.2, os.close, probe)  # the probe lets go
    async with await Buffer.open(tmp_path) as buffer:
        assert agent_pid(tmp_path) == os.getpid()
        await buffer.append_one(event(b"started"))


async def test_a_cancelled_append_is_still_committed_or_not_at_all(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, commit_linger=0.05) as buffer:
        task = asyncio.ensure_future(buffer.append_one(event(b"cancelled")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await buffer.append_one(event(b"next"))
        payloads = [e.payload for e in await buffer.next_events(10)]
    # Cancelled during the linger, before its commit began: left out (8482438), not stored
    # under a seq its producer never got (a duplicate on the resend).
    assert payloads == [b"next"]


# -- F7: the disk fills up -----------------------------------------------------------------


async def test_full_disk_applies_the_topic_policy_and_recovers(tmp_path: Path) -> None:
    big = b"z" * 3000
    async with await Buffer.open(tmp_path, max_page_count=40) as buffer:
        outcomes = [(await buffer.append([event(big)]))[0] for _ in range(100)]
        stored = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if isinstance(o, BufferFull)]
        assert stored, "nothing fit before the disk was full"
        assert refused, "the disk never filled up"
        assert refused[0].reason == "the disk is full"
        # drop-oldest makes room by dropping the oldest events, counted.
        seq = await buffer.append_one(event(big, topic="bulk", on_full="drop-oldest"))
        stats = await buffer.stats()
        assert seq > stored[-1]
        assert stats.drops[("buffer-full", "t")][0] >= 1
        # Draining frees space: reject topics are accepted again.
        await buffer.delete([e.seq for e in await buffer.next_events(5)])
        await buffer.append_one(event(big))
    assert inspect(tmp_path).events >= 1


async def test_a_full_disk_drops_about_what_the_new_events_need(tmp_path: Path) -> None:
    """SQLite finds the disk full: a group of 20 small drop-oldest events drops about as many
    bytes as it needs (a few pages more), not the whole backlog. It used to drop 4 KiB and more
    per event: 1,480 of 1,480 old events for 20 new ones, then 19 of the 20 themselves."""
    async with await Buffer.open(tmp_path, max_page_count=200, disk_reserve=0) as buffer:
        stored = 0
        while True:
            outcomes = await buffer.append([event(b"x" * 100) for _ in range(20)])
            stored += sum(isinstance(o, int) for o in outcomes)
            if any(isinstance(o, BufferFull) for o in outcomes):
                break
        outcomes = await buffer.append(
            [event(b"y" * 100, topic="bulk", on_full="drop-oldest") for _ in range(20)]
        )
        stats = await buffer.stats()
    dropped = stats.drops.get(("buffer-full", "t"), (0, 0))[0]
    figures("full disk", stored_before=stored, dropped=dropped, left=stats.events)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert ("buffer-full", "bulk") not in stats.drops  # none of the group's own events
    assert 0 < dropped <= 100, f"{dropped} of {stored} old events dropped for 20 new ones"
    assert stats.events == stored - dropped + 20


async def test_a_real_full_disk_keeps_a_reserve_so_the_buffer_still_drains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """F7 on a real filesystem (a small tmpfs). Filled to the last byte, the buffer could no
    longer delete what it had delivered: every delete failed with "database or disk is full"
    and it never drained. Now new events stop at the disk reserve, and the drain, the
    checkpoints and a clean close still have room. Groups bigger than the WAL (1,000 x 2 KB)
    check that the reserve's accounting neither drops the whole backlog for them nor refuses
    them for ever once the buffer has drained."""
    reserve = 2 * 1024**2
    big = b"z" * 2000
    with small_disk(tmp_path / "disk", 10 * 1024**2) as disk:
        async with await Buffer.open(disk, disk_reserve=reserve) as buffer:
            refused: list[BufferFull] = []
            while not refused:
                outcomes = await buffer.append([event(big) for _ in range(50)])
                refused = [o for o in outcomes if isinstance(o, BufferFull)]
            stored = (await buffer.stats()).events
            full = free_bytes(disk)
            assert refused[0].reason.startswith("the disk is nearly full"), refused[0].reason
            # drop-oldest topics still take events, in place of about as many old ones.
            group = [event(big, topic="bulk", on_full="drop-oldest") for _ in range(1000)]
            taken = sum(isinstance(o, int) for o in await buffer.append(group))
            dropped = (await buffer.stats()).drops[("buffer-full", "t")][0]
            assert taken > 0
            assert 0 < dropped < 1.5 * taken + 10, (taken, dropped)
            # The drain deletes everything.
            drained = 0
            while events := await buffer.next_events(500):
                await buffer.delete([e.seq for e in events])
                drained += len(events)
            # Room again (the database's free pages), with nobody's help, even for a big group.
            again = await buffer.append([event(big) for _ in range(1000)])
            assert all(isinstance(o, int) for o in again), again[-1]
            # Another process takes the disk down to half the reserve: new events are refused,
            # what is stored still drains.
            filler = fill(disk, reserve // 2)
            refused = [
                o
                for o in await buffer.append([event(big) for _ in range(3000)])
                if isinstance(o, BufferFull)
            ]
            assert refused, "the filler left room for 6 MB of events"
            while events := await buffer.next_events(500):
                await buffer.delete([e.seq for e in events])
            # ... and to the last byte: refusals stay typed (BufferFull, the policy applies).
            filler.unlink()
            await buffer.append([event(big) for _ in range(500)])
            filler = fill(disk, 0)
            for on_full in ("reject", "drop-oldest"):
                outcomes = await buffer.append([event(big, on_full=on_full) for _ in range(500)])
                assert all(isinstance(o, int | BufferFull) for o in outcomes)
            filler.unlink()
            while events := await buffer.next_events(500):
                await buffer.delete([e.seq for e in events])
            assert isinstance(await buffer.append_one(event(big)), int)
        # Logged when it starts and when it ends, not per refused event.
        lines = [r.getMessage() for r in caplog.records if "disk" in r.getMessage()]
        starts = [line for line in lines if line.startswith("buffer: refusing events")]
        ends = [line for line in lines if line.startswith("buffer: room on the disk again")]
        assert len(starts) == len(ends) >= 2, lines
        figures(
            "real full disk",
            stored_when_full=stored,
            free_when_full=full,
            reserve=reserve,
            drop_oldest_taken=taken,
            dropped=dropped,
            drained=drained,
        )
        assert full >= reserve // 2  # less what the last checkpoints took
        assert drained == stored - dropped + taken
        assert inspect(disk).events == 1


ROOT = str(Path(__file__).resolve().parent.parent)


async def _child_outcome(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a child Python (its own resource limits) and return the JSON it prints."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


_FSIZE_CHILD = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from edge_agent.buffer import Buffer, BufferFull, NewEvent
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))
def ev(p): return NewEvent('t', p, 1, 0, 0, None, 'reject')
async def main():
    async with await Buffer.open(Path(sys.argv[1]), disk_reserve=int(sys.argv[2])) as b:
        stored, refused = 0, []
        while not refused:
            out = await b.append([ev(b'x' * 100) for _ in range(10)])
            stored += sum(isinstance(o, int) for o in out)
            refused = [o.reason for o in out if isinstance(o, BufferFull)]
        drained, errors = 0, []
        while page := await b.next_events(50):
            try:
                drained += await b.delete([e.seq for e in page])
            except Exception as exc:
                errors.append(repr(exc))
                if len(errors) == 20:
                    break
        after = await b.append([ev(b'y' * 100) for _ in range(10)])
        print(json.dumps({"stored": stored, "refused": refused[0], "drained": drained,
                          "errors": errors[:3], "after": [isinstance(o, int) for o in after]}))
asyncio.run(main())
"""


async def test_rlimit_fsize_refuses_new_events_but_still_drains_and_recovers(
    tmp_path: Path,
) -> None:
    """F7 with its own injection, RLIMIT_FSIZE (300 KiB). `statvfs` cannot see the limit, so the
    disk reserve let the database grow past what its file can hold: the checkpoint could never
    complete, and SQLite restarts the WAL only after a complete one. With 1 KiB pages the WAL
    even reached the limit before its first auto-checkpoint (~1000 frames): no commit succeeded
    any more, so no checkpoint ran again and every delete of the drain failed ("disk I/O
    error") for ever (stored 700, drained 0). Now the reserve counts the limit, and a failed
    commit is followed by a checkpoint before the next attempt."""
    outcome = await _child_outcome(_FSIZE_CHILD, str(tmp_path), str(100 * 1024))
    figures("RLIMIT_FSIZE 300 KiB", **{k: outcome[k] for k in ("stored", "drained")})
    assert outcome["stored"] > 500, outcome
    assert outcome["refused"].startswith(
        "the database file is nearly at the file size limit (RLIMIT_FSIZE 0.3 MB: "
    ), outcome
    assert outcome["errors"] == [], outcome
    assert outcome["drained"] == outcome["stored"]
    assert all(outcome["after"]), outcome  # taken again once drained, with nobody's help


_FSIZE_RESERVE_CHILD = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from edge_agent.buffer import Buffer, BufferFull, NewEvent
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024**2, 8 * 1024**2))  # LimitFSIZE=8M
def ev(p): return NewEvent('t', p, 1, 0, 0, None, 'reject')
async def main():
    async with await Buffer.open(Path(sys.argv[1])) as b:  # the default disk_reserve, 16 MiB
        stored, refused = 0, []
        while not refused:
            out = await b.append([ev(b'x' * 1000) for _ in range(50)])
            stored += sum(isinstance(o, int) for o in out)
            refused = [o.reason for o in out if isinstance(o, BufferFull)]
        drained = 0
        while page := await b.next_events(500):
            drained += await b.delete([e.seq for e in page])
        after = await b.append([ev(b'y' * 1000) for _ in range(50)])
        print(json.dumps({"stored": stored, "refused": refused[0], "drained": drained,
                          "after": [isinstance(o, int) for o in after]}))
asyncio.run(main())
"""


async def test_a_file_size_limit_under_the_disk_reserve_keeps_a_share_of_it(
    tmp_path: Path,
) -> None:
    """With RLIMIT_FSIZE (systemd's LimitFSIZE=8M) below disk_reserve (16 MiB by default) the
    reserve was kept below the limit whole: every event was refused, from the first one on an
    empty database with plenty of disk, as "the disk is nearly full (8.4 MB free, disk_reserve
    16.8 MB is kept for draining)". Below the limit the reserve is now a quarter of it, and the
    reason names the limit."""
    outcome = await _child_outcome(_FSIZE_RESERVE_CHILD, str(tmp_path))
    figures("RLIMIT_FSIZE 8 MiB, disk_reserve 16 MiB", stored=outcome["stored"])
    assert outcome["stored"] * 1000 > 4 * 1024**2, outcome  # 6 MiB above a reserve of 2 MiB
    assert outcome["refused"].startswith(
        "the database file is nearly at the file size limit (RLIMIT_FSIZE 8.4 MB: "
    ), outcome
    assert outcome["refused"].endswith(", 2.1 MB of it is kept for draining)"), outcome
    assert outcome["drained"] == outcome["stored"]
    assert all(outcome["after"]), outcome


async def test_a_checkpoint_after_a_full_disk_is_not_run_for_every_commit(tmp_path: Path) -> None:
    """The checkpoint that follows a failed commit (`WalRescue`) runs once, not before every
    retry of every group, while the disk stays full (here: max_page_count)."""
    async with await Buffer.open(tmp_path, max_page_count=40, disk_reserve=0) as buffer:
        outcomes: list[int | BufferFull] = []
        for _ in range(30):
            outcomes += await buffer.append([event(b"z" * 3000)])
        assert any(isinstance(o, BufferFull) for o in outcomes)
        assert buffer._rescue.checkpoints == 1


# -- F8: corruption ------------------------------------------------------------------------


async def _filled(directory: Path, count: int = 50) -> str:
    async with await Buffer.open(directory) as buffer:
        await buffer.append([event(b"p" * 500) for _ in range(count)])
        return buffer.epoch


def _overwrite_header(db: Path) -> None:
    with db.open("r+b") as handle:
        handle.write(b"this is not sqlite")


def _truncate(db: Path) -> None:
    size = db.stat().st_size
    with db.open("r+b") as handle:
        handle.truncate(size // 2 + 100)


def _flip_btree_page(db: Path) -> None:
    page_size = int.from_bytes(db.read_bytes()[16:18], "big")
    with db.open("r+b") as handle:
        # The b-tree page header of page 2..: a garbage page type.
        for page in range(1, 4):
            handle.seek(page * page_size)
            handle.write(b"\x07\xff\xff\xff")


def _empty(db: Path) -> None:
    """Opened as it is, a 0-byte file is a fresh database: its events gone without a word."""
    db.write_bytes(b"")


def _version(version: int) -> Callable[[Path], None]:
    def damage(db: Path) -> None:
        """The header's user_version (bytes 60-63): 0 made the open create the schema again
        over the tables and fail, 1 a migration fail, both on every start (a crash loop)."""
        with db.open("r+b") as handle:
            handle.seek(60)
            handle.write(version.to_bytes(4, "big"))

    return damage


@pytest.mark.parametrize(
    "damage",
    [_overwrite_header, _truncate, _flip_btree_page, _empty, _version(0), _version(1)],
    ids=["header", "truncate", "page", "empty", "version-0", "version-1"],
)
async def test_corrupt_database_is_quarantined_and_a_fresh_one_started(
    tmp_path: Path, damage: object
) -> None:
    old_epoch = await _filled(tmp_path)
    assert callable(damage)
    damage(tmp_path / "buffer.db")
    async with await Buffer.open(tmp_path) as buffer:
        assert buffer.epoch != old_epoch
        stats = await buffer.stats()
        assert stats.events == 0
        assert [i.kind for i in stats.incidents] == ["corrupt"]
        await buffer.append_one(event(b"life goes on"))
    moved = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    assert moved
    assert moved[0].startswith("buffer-")
    # No crash loop: it opens again cleanly, the incident still visible.
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        assert stats.events == 1
        assert len(stats.incidents) == 1


async def test_two_quarantines_with_the_same_clock_reading_keep_both(tmp_path: Path) -> None:
    """A clock that starts from the same value at each boot (no RTC) gave the second quarantine
    the first one's name, and os.replace deleted the first corrupt database without a word."""
    clock = FakeClock(start=1_700_000_000.0)
    for round_ in (1, 2):
        async with await Buffer.open(tmp_path, clock=clock) as buffer:
            await buffer.append([event(b"%d" % round_)])
        _overwrite_header(tmp_path / "buffer.db")
    async with await Buffer.open(tmp_path, clock=clock) as buffer:
        stats = await buffer.stats()
        assert [i.kind for i in stats.incidents] == ["corrupt"]  # the fresh database's own
    moved = sorted(p.name for p in (tmp_path / "quarantine").iterdir() if p.suffix == ".db")
    assert moved == ["buffer-20231114T221320000000Z-2.db", "buffer-20231114T221320000000Z.db"]


async def test_a_corrupt_database_is_quarantined_with_its_live_wal_and_shm(tmp_path: Path) -> None:
    """After a crash the recent commits are in the -wal (and its index in the -shm): they go to
    quarantine with the database, never stay beside the fresh one (SQLite would replay a stale
    WAL into it), and the loss report counts what the old database held."""
    crash = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from edge_agent.buffer import Buffer, NewEvent\n"
        "async def main():\n"
        "    buffer = await Buffer.open(Path(sys.argv[1]))\n"
        "    await buffer.append([NewEvent('t', b'x' * 100, 1, 0, 0, None, 'reject')] * 40)\n"
        "    os._exit(0)  # as kill -9: no close, no checkpoint\n"
        "asyncio.run(main())\n"
    )
    await _filled(tmp_path, 3000)  # checkpointed into buffer.db at the clean close
    child = [sys.executable, "-c", crash, str(tmp_path)]
    await asyncio.to_thread(subprocess.run, child, check=True)
    assert (tmp_path / "buffer.db-wal").stat().st_size > 0
    with (tmp_path / "buffer.db").open("r+b") as file:
        file.seek(100 * PAGE_SIZE)
        file.write(bytes(50 * PAGE_SIZE))  # pages of old events, not in the WAL
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        assert stats.events == 0
        [incident] = stats.incidents
        await buffer.append_one(event(b"life goes on"))
    figures("corrupt with a live WAL", incident=incident.detail)
    assert incident.kind == "corrupt"
    assert "their seqs ran from 1 to 3040 (at most 3040 events)" in incident.detail
    moved = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    stem = moved[0]
    assert moved == [stem, f"{stem}-shm", f"{stem}-wal"], moved
    assert stem in incident.detail
    async with await Buffer.open(tmp_path) as buffer:  # no crash loop, no second quarantine
        stats = await buffer.stats()
        assert (stats.events, len(stats.incidents)) == (1, 1)
    assert len(list((tmp_path / "quarantine").iterdir())) == 3


async def test_a_database_that_cannot_be_opened_is_not_taken_for_corrupt(tmp_path: Path) -> None:
    """A full disk at start (here RLIMIT_FSIZE: no room for the 32 KiB -shm file) gave SQLite a
    "disk I/O error", which the open took for corruption: the healthy buffer was moved aside and
    its events left delivery. Now the agent refuses to start and the buffer stays where it is."""
    await _filled(tmp_path, 5)
    assert not (tmp_path / "buffer.db-shm").exists()
    result = await _open_under_file_limit(tmp_path, 4096)
    assert "not known to be corrupt and was left in place" in result.stdout, result.stderr
    assert "SQLITE_IOERR" in result.stdout
    assert not (tmp_path / "quarantine").exists()
    async with await Buffer.open(tmp_path) as buffer:  # room again: everything is there
        stats = await buffer.stats()
        assert (stats.events, stats.incidents) == (5, [])


async def test_wal_deleted_after_a_crash_is_reported(tmp_path: Path) -> None:
    await _filled(tmp_path, 5)
    # A process commits into the WAL and dies without closing (as a kill -9 would) ...
    crash = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1])\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('PRAGMA wal_autocheckpoint=0')\n"
        'db.execute("INSERT INTO events (topic, payload, qos, priority, event_time)'
        " VALUES ('t', x'00', 1, 0, 0)\")\n"
        "db.commit()\n"
        "os._exit(0)\n"
    )
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", crash, str(tmp_path / "buffer.db")], check=True
    )
    (tmp_path / "buffer.state").write_text("open\n")
    assert (tmp_path / "buffer.db-wal").stat().st_size > 0
    # ... and then the WAL is lost.
    os.unlink(tmp_path / "buffer.db-wal")
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        assert [i.kind for i in stats.incidents] == ["wal-missing"]
        assert stats.events == 5  # what was checkpointed is kept and still drains
        # Seq 6 was given out by the lost commit (and may be at the sink under this epoch):
        # a new event given it again would be dropped there as a duplicate.
        assert await buffer.append_one(event(b"new")) == 5 + SEQ_GAP + 1
    async with await Buffer.open(tmp_path) as buffer:  # a clean stop: no further jump
        assert await buffer.append_one(event(b"newer")) == 5 + SEQ_GAP + 2


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_seqs_jump_after_an_unclean_stop_that_may_have_rolled_back(
    tmp_path: Path, durability: Literal["full", "normal"]
) -> None:
    """With ``normal`` durability a power loss rolls back the last commits, and with ``full`` a
    damaged WAL frame does (`test_a_damaged_wal_frame_after_a_crash_...`); nothing tells either
    from a kill -9 afterwards: every unclean stop makes the seqs jump (`SEQ_GAP`)."""
    child = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from edge_agent.buffer import Buffer, NewEvent\n"
        "async def main():\n"
        "    buffer = await Buffer.open(Path(sys.argv[1]), durability=sys.argv[2])\n"
        "    for _ in range(3):\n"
        "        await buffer.append_one(NewEvent('t', b'x', 1, 0, 0, None, 'reject'))\n"
        "    os._exit(0)\n"  # no close: an unclean stop
        "asyncio.run(main())\n"
    )
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", child, str(tmp_path), durability], check=True
    )
    async with await Buffer.open(tmp_path, durability=durability) as buffer:
        stats = await buffer.stats()
        assert (stats.events, stats.incidents) == (3, [])
        assert await buffer.append_one(event(b"new")) == 3 + SEQ_GAP + 1
    async with await Buffer.open(tmp_path, durability=durability) as buffer:  # clean: no jump
        assert await buffer.append_one(event(b"newer")) == 3 + SEQ_GAP + 2


_WAL_CRASH = """
import asyncio, os, sys
from pathlib import Path
from edge_agent.buffer import Buffer, NewEvent
async def main():
    buffer = await Buffer.open(Path(sys.argv[1]))
    for i in range(20):
        await buffer.append([NewEvent('t', b'e%d' % i, 1, 0, 0, None, 'reject')])
    os._exit(0)  # as kill -9: 20 acknowledged commits, all in the WAL
asyncio.run(main())
"""


async def test_a_damaged_wal_frame_after_a_crash_is_reported_and_its_seqs_not_given_again(
    tmp_path: Path,
) -> None:
    """20 events acknowledged (durability full), the agent dies, one byte of a late WAL frame
    is flipped. SQLite's recovery stops at the frame whose checksum fails and drops it and every
    later one: acknowledged events gone without an incident, and (with ``full`` durability the
    seqs did not jump) the next event got one of their seqs again, an id the sink may hold
    already, so that it dropped the new event as a duplicate: a second silent loss."""
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _WAL_CRASH, str(tmp_path)], check=True
    )
    wal = tmp_path / "buffer.db-wal"
    data = bytearray(wal.read_bytes())
    frames = (len(data) - 32) // (PAGE_SIZE + 24)
    damaged = frames - 10  # a frame of one of the last commits (the schema's are long before)
    data[32 + damaged * (PAGE_SIZE + 24) + 24 + 500] ^= 0x01  # a byte of its page image
    wal.write_bytes(data)
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        seq = await buffer.append_one(event(b"new"))
    figures("damaged WAL frame", frames=frames, kept=stats.events, detail=stats.incidents)
    assert 0 < stats.events < 20
    [incident] = stats.incidents
    assert incident.kind == "wal-damaged"
    assert f"kept its first {damaged} frames" in incident.detail
    # Above every seq the lost commits may have given out (up to 20).
    assert seq == stats.events + SEQ_GAP + 1


async def test_a_topic_that_is_not_utf8_is_quarantined_not_a_crash_loop(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    """One flipped bit (bit 7 of an ASCII byte of a topic) passes quick_check and
    integrity_check, and the open's first reads raised "Could not decode to UTF-8": the agent
    exited 1 at every start (under systemd: a crash loop that never drains). It is quarantined
    like any corrupt database now, with what could be counted."""
    config = write_config(tmp_path, topics='[[topics]]\nfilter = "#"\n')
    data = tmp_path / "data"
    async with await Buffer.open(data) as buffer:
        await buffer.append([event(b"p%d" % i, topic="plant/line1/temp") for i in range(50)])
    _flip(data / "buffer.db", b"plant/line1/temp", 6, mask=0x80)
    assert _integrity_check(data / "buffer.db") == [("ok",)]
    agent = await asyncio.to_thread(start_agent, process_factory, config)  # it is ready
    assert await agent.asigterm() == 0
    await agent.arestart()  # and starts again, with no second quarantine
    assert await agent.asigterm() == 0
    [incident] = inspect(data).incidents
    assert incident.kind == "corrupt"
    assert "Could not decode to UTF-8 column 'topic'" in incident.detail
    assert "about 50 events (140 payload bytes) were in it" in incident.detail
    assert len([p for p in (data / "quarantine").iterdir() if p.suffix == ".db"]) == 1


async def test_index_damage_that_reindex_cannot_repair_is_quarantined(tmp_path: Path) -> None:
    """Found by review: one flipped bit made two rows of ``drops`` equal in their primary key
    (quick_check passes, integrity_check reports the index): REINDEX then failed on the UNIQUE
    constraint, and every start refused, "not known to be corrupt" (a crash loop)."""
    async with await Buffer.open(tmp_path):
        pass
    _damage_a_drops_row(tmp_path / "buffer.db", 0x02)  # '3' -> '1': two rows now equal
    assert _quick_check(tmp_path / "buffer.db") == [("ok",)]
    for _ in range(2):  # as systemd would start it again
        async with await Buffer.open(tmp_path) as buffer:
            stats = await buffer.stats()
    [incident] = stats.incidents
    assert incident.kind == "corrupt"
    assert "REINDEX failed: UNIQUE constraint failed: drops.reason, drops.topic" in incident.detail
    assert len([p for p in (tmp_path / "quarantine").iterdir() if p.suffix == ".db"]) == 1


@pytest.mark.parametrize("callback", ["on_commit", "on_commit_timed"])
async def test_a_committer_stopped_by_an_error_refuses_events_instead_of_hanging(
    tmp_path: Path, callback: str
) -> None:
    """Found by review: an error out of the commit loop (here a commit callback, a bug) ended
    its task, and every later append waited for ever: no ack, no error, nothing logged. Now
    the waiting and later appends are refused at once, and the failure is reported once. An
    error before the group's producers are answered (``on_commit_timed``, the second review)
    left that group waiting: committed, its producers get their seqs all the same."""
    failures: list[BaseException] = []
    async with await Buffer.open(tmp_path) as buffer:
        buffer.on_failure = failures.append

        def broken(*args: object) -> None:
            raise RuntimeError("a bug in the commit callback")

        setattr(buffer, callback, broken)
        async with asyncio.timeout(10):  # a hang fails the test, not the suite
            first = await buffer.append_one(event(b"committed"))  # committed, then the error
            with pytest.raises(BufferError, match="committer stopped"):
                await buffer.append_one(event(b"after"))
        assert [repr(f) for f in failures] == [repr(RuntimeError("a bug in the commit callback"))]
        assert buffer.failure is failures[0]
    assert [e.payload for e in read_events(tmp_path)] == [b"committed"]
    assert first == 1


async def test_a_cancelled_close_still_lets_go_of_the_lock(tmp_path: Path) -> None:
    """Found by review: a close cancelled while the committer finished marked the buffer closed,
    and the next aclose() returned at once: the lock and the thread stayed (the next open in the
    process: BufferLocked naming its own pid). The close goes on, and a second call waits."""
    buffer = await Buffer.open(tmp_path, commit_linger=0.5)
    pending = buffer.append_one(event(b"pending"))
    closing = asyncio.create_task(buffer.aclose())
    await asyncio.sleep(0.05)  # in the linger: the close waits for the committer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await buffer.aclose()
    assert await pending == 1
    async with await Buffer.open(tmp_path) as again:  # not locked
        assert [e.payload for e in await again.next_events(10)] == [b"pending"]


async def test_index_damage_found_when_reindex_has_no_room_is_left_in_place(
    tmp_path: Path,
) -> None:
    """Found by review: every error of the REINDEX counted as damage, so index-only damage
    found at a start with a full disk (here RLIMIT_FSIZE: REINDEX cannot write its WAL) moved a
    healthy, repairable database and its events aside. It is left in place now, the start
    refused ("not known to be corrupt"), and repaired at the next start with room."""
    async with await Buffer.open(tmp_path) as buffer:
        for _ in range(20):
            await buffer.append([event(b"p" * 10, topic=f"t/{i}", priority=1) for i in range(1000)])
    _damage_a_drops_row(tmp_path / "buffer.db", 0x04)  # '3' -> '7': still unique
    assert _quick_check(tmp_path / "buffer.db") == [("ok",)]
    result = await _open_under_file_limit(tmp_path, 40_000)
    assert "it is not known to be corrupt and was left in place" in result.stdout, result
    assert not (tmp_path / "quarantine").exists()
    async with await Buffer.open(tmp_path) as buffer:  # room again: repaired, nothing lost
        stats = await buffer.stats()
    assert [i.kind for i in stats.incidents] == ["reindexed"]
    assert stats.events == 20_000


async def test_a_first_read_failing_for_want_of_room_refuses_the_start_in_words(
    tmp_path: Path,
) -> None:
    """Found by review: the open's statistics (a GROUP BY over 20,000 topics, its temporary file
    over RLIMIT_FSIZE) failed with an I/O error that ended their transaction, and the COMMIT
    after it raised "cannot commit - no transaction is active": a traceback (exit 1) instead
    of the refusal, in words, that the open's other checks give."""
    async with await Buffer.open(tmp_path) as buffer:
        for _ in range(20):
            await buffer.append([event(b"p" * 10, topic=f"t/{i}", priority=1) for i in range(1000)])
    result = await _open_under_file_limit(tmp_path, 100_000)
    assert "it is not known to be corrupt and was left in place" in result.stdout, result
    assert "SQLITE_IOERR" in result.stdout
    assert not (tmp_path / "quarantine").exists()
    async with await Buffer.open(tmp_path) as buffer:  # room again: all there
        assert (await buffer.stats()).events == 20_000


async def test_damage_found_while_running_stops_the_agent_and_its_restart_quarantines(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    """A database damaged while the agent runs (no check at the open could see it) failed every
    commit, each with a log line, for as long as the agent ran: systemd never restarted it, so
    nothing quarantined it. The agent exits 1 now, and its restart quarantines the database."""
    config = write_config(tmp_path)
    data = tmp_path / "data"
    agent = await asyncio.to_thread(start_agent, process_factory, config)
    for i in range(3):
        assert (await _cli_publish(config, f"sensors/s{i}")).returncode == 0
    db_path = data / "buffer.db"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the database file
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'")
    page_size = int.from_bytes(db_path.read_bytes()[16:18], "big")
    with db_path.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\x07\xff\xff\xff")  # the events table's root: a garbage page type
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        # Another connection's write: the agent's connection drops its cached pages.
        db.execute("UPDATE meta SET value = value")
    refused = await _cli_publish(config, "sensors/after")
    assert refused.returncode != 0
    assert await agent.await_exit(timeout=20) == 1
    assert "the database is damaged" in agent.output()
    await agent.arestart()
    assert await agent.asigterm() == 0
    [incident] = inspect(data).incidents
    figures("damage while running", incident=incident.detail[:120])
    assert incident.kind == "corrupt"
    assert len([p for p in (data / "quarantine").iterdir() if p.suffix == ".db"]) == 1


def _damage_a_drops_row(path: Path, mask: int) -> None:
    """Two rows in ``drops`` (topics sensors/1 and sensors/3), then one bit of the second's
    topic flipped with ``mask`` in the table's page only: its index no longer matches it."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        with db:
            rows = [("full", "sensors/1", 3, 30), ("full", "sensors/3", 1, 10)]
            db.executemany("INSERT INTO drops VALUES (?, ?, ?, ?)", rows)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'drops'")
    data = bytearray(path.read_bytes())
    start = (root - 1) * PAGE_SIZE
    at = data.index(b"sensors/3", start, start + PAGE_SIZE)
    data[at + len("sensors/")] ^= mask
    path.write_bytes(data)


async def _open_under_file_limit(directory: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`Buffer.open` (and close) in a child process whose files cannot grow past ``limit``
    bytes (RLIMIT_FSIZE); it prints "opened" or the `BufferError` that refused the start."""
    child = (
        "import asyncio, resource, signal, sys\n"
        "from pathlib import Path\n"
        "from edge_agent.buffer import Buffer, BufferError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "async def main():\n"
        "    try:\n"
        "        async with await Buffer.open(Path(sys.argv[1]), disk_reserve=0):\n"
        "            print('opened')\n"
        "    except BufferError as exc:\n"
        "        print('refused:', exc)\n"
        "asyncio.run(main())\n"
    )
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", child, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )


async def _cli_publish(config: Path, topic: str) -> subprocess.CompletedProcess[str]:
    command = [console_script("edge-agent"), "--config", str(config), "publish", topic, "x"]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("flip", [(0, 0x40), (3, 0x20)], ids=["not hex", "uppercase"])
async def test_an_epoch_that_is_not_what_the_buffer_writes_is_quarantined(
    tmp_path: Path, flip: tuple[int, int]
) -> None:
    """Found by review: one flipped bit of meta.epoch passes every SQLite check. A digit that
    is not hex stopped every batch envelope (encode refused the epoch) at every connection,
    for good; an uppercase one made the ids the agent returns differ from the sink's (it reads
    the epoch back from the envelope's bytes, in lowercase)."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"x") for _ in range(3)])
        epoch = buffer.epoch
    index, mask = flip
    letter = next(i for i, c in enumerate(epoch) if c.isalpha() == (mask == 0x20) and i >= index)
    damaged = epoch[:letter] + chr(ord(epoch[letter]) ^ mask) + epoch[letter + 1 :]
    _flip(tmp_path / "buffer.db", b"epoch" + epoch.encode(), 5 + letter, mask=mask)
    assert _integrity_check(tmp_path / "buffer.db") == [("ok",)]
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        assert buffer.epoch != damaged
    [incident] = stats.incidents
    assert (stats.events, incident.kind) == (0, "corrupt")
    assert f"meta.epoch is not 16 lowercase hex digits: {damaged!r}" in incident.detail
    assert "about 3 events" in incident.detail


@pytest.mark.parametrize("clean", [True, False], ids=["clean-stop", "unclean-stop"])
async def test_a_high_water_that_is_not_a_number_is_quarantined(
    tmp_path: Path, clean: bool
) -> None:
    """meta.high_water '12345' -> 'q2345' (one bit): no check of SQLite sees it, and int()
    raised ValueError at every open (after an unclean stop, in the seq jump). In a directory
    whose name holds '#': the count of what was lost opened ``file:<path>`` unquoted (no count)."""
    tmp_path = tmp_path / "buffer #1"
    async with await Buffer.open(tmp_path) as buffer:
        seqs = await buffer.append([event(b"x") for _ in range(12345)])
        await buffer.delete([s for s in seqs[-5:] if isinstance(s, int)])  # high_water written
    if not clean:
        (tmp_path / "buffer.state").write_text("open\n")
    _flip(tmp_path / "buffer.db", b"high_water12345", 10, mask=0x40)
    assert _integrity_check(tmp_path / "buffer.db") == [("ok",)]
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        *others, incident = stats.incidents
        # The unclean stop is only the state file's word here: no WAL, which is reported too.
        assert [i.kind for i in others] == ([] if clean else ["wal-missing"])
        assert (stats.events, incident.kind) == (0, "corrupt")
        assert "meta.high_water is not a number: 'q2345'" in incident.detail
        assert "about 12340 events" in incident.detail


async def test_a_failed_open_lets_go_of_the_lock_the_connection_and_the_thread(
    tmp_path: Path,
) -> None:
    """An open failing after the file checks (in its first reads) kept the lock, the connection
    and the buffer thread: the next open in the same process was BufferLocked, naming its own
    pid, and an agent retrying in-process could never start again."""
    await _filled(tmp_path, 5)
    threads = {t.ident for t in threading.enumerate()}
    failpoints.arm("buffer.stats", "raise@1")  # the open's first reads: not damage
    try:
        with pytest.raises(failpoints.FailpointError):
            await Buffer.open(tmp_path)
    finally:
        failpoints.disarm_all()
    assert {t.ident for t in threading.enumerate()} == threads
    assert agent_pid(tmp_path) is None
    async with await Buffer.open(tmp_path) as buffer:
        assert buffer.backlog[0] == 5
        assert (await buffer.stats()).incidents == []


async def test_a_damaged_drain_index_is_rebuilt_at_start_without_loss(tmp_path: Path) -> None:
    """One byte of ``events_drain`` (the seq of entry (5, 20) made 60) passes quick_check,
    which does not compare indexes with their tables: every drain read then failed with
    "database disk image is malformed", at every start (nothing drained, for ever), or with
    other bytes sent one event twice and another never. integrity_check sees it, and REINDEX
    rebuilds the index from the table: nothing is lost, and it is reported."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"a%d" % i, priority=5) for i in range(1, 51)])
    _flip(tmp_path / "buffer.db", bytes([7, 4, 1, 1, 1, 5, 20, 20]), 7, new=60)
    assert _quick_check(tmp_path / "buffer.db") == [("ok",)]
    assert _integrity_check(tmp_path / "buffer.db") != [("ok",)]
    async with await Buffer.open(tmp_path) as buffer:
        sent: list[int] = []
        while page := await buffer.next_events(100):
            sent += [e.seq for e in page]
            await buffer.delete([e.seq for e in page])
        [incident] = (await buffer.stats()).incidents
    assert sent == list(range(1, 51))
    assert incident.kind == "reindexed"
    assert "events_drain" in incident.detail
    assert not (tmp_path / "quarantine").exists()
    assert _integrity_check(tmp_path / "buffer.db") == [("ok",)]


def _flip(path: Path, needle: bytes, offset: int, new: int | None = None, mask: int = 0) -> None:
    """Change one byte of ``path``, ``offset`` bytes into the first ``needle``."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, needle
    data[at + offset] = new if new is not None else data[at + offset] ^ mask
    path.write_bytes(data)


def _quick_check(path: Path) -> list[tuple[str]]:
    return _pragma(path, "quick_check")


def _integrity_check(path: Path) -> list[tuple[str]]:
    return _pragma(path, "integrity_check")


def _pragma(path: Path, pragma: str) -> list[tuple[str]]:
    db = sqlite3.connect(path)
    try:
        result: list[tuple[str]] = db.execute(f"PRAGMA {pragma}").fetchall()
        return result
    finally:
        db.close()


async def test_close_during_the_commit_linger_commits_and_returns(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path, commit_linger=0.2)
    append = asyncio.ensure_future(buffer.append_one(event(b"lingering")))
    await asyncio.sleep(0.05)  # the committer is in its linger now
    await asyncio.wait_for(buffer.aclose(), 5)
    assert await append == 1
    assert [e.payload for e in read_events(tmp_path)] == [b"lingering"]


# -- schema migrations -----------------------------------------------------------------------

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    event_time INTEGER NOT NULL,
    expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_drain ON events (priority DESC, seq);
CREATE INDEX events_expiry ON events (expires_at) WHERE expires_at IS NOT NULL;
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
INSERT INTO meta VALUES ('epoch', '00112233aabbccdd'), ('created_at', '1700000000000');
PRAGMA user_version = 1;
"""


def _schema_1_buffer(directory: Path, events: int) -> None:
    """A buffer as schema 1 left it: ``events`` undelivered events, the newest one already
    deleted (so only sqlite_sequence knows its seq), one dead letter."""
    directory.mkdir(exist_ok=True)
    db = sqlite3.connect(directory / "buffer.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA_1)
    db.executemany(
        "INSERT INTO events (topic, payload, qos, priority, event_time, expires_at, attempts)"
        " VALUES (?, ?, 1, ?, 1700000000000, ?, ?)",
        [(f"t/{n % 3}", b"old %d" % n, n % 2, None if n % 4 else 1, n % 5) for n in range(events)],
    )
    db.execute(
        "INSERT INTO dead_letters SELECT seq, topic, payload, qos, priority, event_time,"
        " attempts, 'poison', 1700000000000 FROM events WHERE seq = 1"
    )
    db.execute("DELETE FROM events WHERE seq IN (1, ?)", (events,))
    db.close()


async def test_schema_1_buffer_is_migrated_with_its_events_and_seqs(tmp_path: Path) -> None:
    _schema_1_buffer(tmp_path, 50)
    before = [(e.seq, e.topic, e.payload, e.priority, e.attempts) for e in read_events(tmp_path)]
    assert len(before) == 48
    async with await Buffer.open(tmp_path) as buffer:
        assert buffer.epoch == "00112233aabbccdd"
        after = [(e.seq, e.topic, e.payload, e.priority, e.attempts) for e in read_events(tmp_path)]
        assert after == before
        stats = await buffer.stats()
        assert (stats.events, stats.dead_letters, stats.next_seq) == (48, 1, 51)
        assert await buffer.append_one(event()) == 51  # 50 was used, then deleted
        assert await buffer.requeue_dead() == 1
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        assert "AUTOINCREMENT" not in sql
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


async def test_schema_1_buffer_that_cannot_be_migrated_is_refused_untouched(
    tmp_path: Path,
) -> None:
    _schema_1_buffer(tmp_path, 300)
    before = list(read_events(tmp_path))
    db = sqlite3.connect(tmp_path / "buffer.db")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    # The copy needs room for the events table again: with a disk this full it fails.
    with pytest.raises(BufferError, match="schema version 1 and could not be migrated"):
        await Buffer.open(tmp_path, max_page_count=pages + 1)
    assert list(read_events(tmp_path)) == before
    async with await Buffer.open(tmp_path) as buffer:  # with room, it migrates
        assert (await buffer.stats()).events == len(before)


@pytest.mark.parametrize("table", ["without", "with"])
async def test_schema_2_buffer_is_migrated_to_3(tmp_path: Path, table: str) -> None:
    """Schema 3 adds the ``suspects`` table. A schema 3 file whose header says 2 (``with`` the
    table: a flipped byte) migrates to itself instead of failing on every start."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"%d" % n) for n in range(20)])
    db = sqlite3.connect(tmp_path / "buffer.db", isolation_level=None)
    if table == "without":
        db.execute("DROP TABLE suspects")
    db.execute("PRAGMA user_version = 2")
    db.close()
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.record_losses(3, 1)
        third = [e for e in read_events(tmp_path) if e.seq == 3]
        assert await buffer.suspects(10) == (third, {3: 1})
        stats = await buffer.stats()
        assert (stats.events, stats.incidents) == (20, [])
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    finally:
        db.close()


async def test_poison_counts_are_kept_while_their_event_is_buffered(tmp_path: Path) -> None:
    """SPEC §5: the losses counted against an event as poison survive restarts (the uplink
    dead-letters it after ``max_attempts``); they go with the event, and a requeued dead letter
    is counted afresh."""
    async with await Buffer.open(tmp_path) as buffer:
        assert await buffer.append([event(b"%d" % n) for n in range(5)]) == [1, 2, 3, 4, 5]
        for seq, count in [(1, 1), (1, 2), (2, 1), (3, 1), (4, 1), (5, 1)]:
            await buffer.record_losses(seq, count)
        await buffer.delete([2])  # delivered
        assert await buffer.dead_letter(3, "poison")
        await buffer.record_losses(9, 1)  # an event no longer there (a purge, say)
    async with await Buffer.open(tmp_path) as buffer:
        events, losses = await buffer.suspects(2)
        assert losses == {1: 2, 4: 1, 5: 1}
        assert [(e.seq, e.payload) for e in events] == [(1, b"0"), (4, b"3")]
        assert await buffer.requeue_dead() == 1
        assert (await buffer.suspects(5))[1] == {1: 2, 4: 1, 5: 1}


async def test_a_paused_export_does_not_hold_the_wal_open(tmp_path: Path) -> None:
    """`buffer export | less`: the reader pauses mid-way while the agent keeps writing. A
    statement held open all that time kept every checkpoint from resetting the WAL, which
    grew by all that was written (18 MB for 10 MB in a review) and never shrank."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(bytes(200)) for _ in range(2000)])
        export = read_events(tmp_path)
        first = next(export)  # the reader stops here for a while
        for _ in range(12):  # 6 MB more, 500 KB per commit
            await buffer.append([event(bytes(1000)) for _ in range(500)])
        wal = (tmp_path / "buffer.db-wal").stat().st_size
        rest = sum(1 for _ in export)
    figures("paused export", wal_bytes=wal, written_bytes=6_000_000)
    assert first.seq == 1
    assert rest == 2000 + 6000 - 1
    assert wal < 3 * 1024**2  # about one checkpoint's worth (1 MiB), not all that was written


async def test_the_wal_shrinks_back_after_a_long_reader(tmp_path: Path) -> None:
    """Any reader holding a snapshot for long (an old tool, a backup) lets the WAL grow; once it
    is gone, the WAL is cut back to `WAL_SIZE_LIMIT` instead of keeping its largest size."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event()])
        reader = sqlite3.connect(tmp_path / "buffer.db")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot
        for _ in range(12):
            await buffer.append([event(bytes(1000)) for _ in range(500)])
        grown = (tmp_path / "buffer.db-wal").stat().st_size
        reader.rollback()
        reader.close()
        for _ in range(6):
            await buffer.append([event(bytes(1000)) for _ in range(500)])
        shrunk = (tmp_path / "buffer.db-wal").stat().st_size
    figures("long reader", wal_grown=grown, wal_after=shrunk, limit=WAL_SIZE_LIMIT)
    assert grown > 6_000_000
    assert shrunk <= WAL_SIZE_LIMIT


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


async def test_requeue_dead_keeps_the_limits_and_sets_the_topic_ttl_again(tmp_path: Path) -> None:
    """`buffer requeue-dead` put 10 events into a buffer of max_events 5, and the requeued events
    never expired whatever their topic's ttl. (Dead letters count against the limits with the
    events, so only limits lowered since they were made can refuse a requeue.)"""
    clock = FakeClock(start=1_000_000.0)
    async with await Buffer.open(tmp_path, max_events=5, clock=clock) as buffer:
        assert await buffer.append([event(topic="a"), event(topic="b")]) == [1, 2]
        assert await buffer.dead_letter(1, "poison")
        assert await buffer.dead_letter(2, "poison")
        await buffer.append([event(), event()])
    async with await Buffer.open(tmp_path, max_events=3, clock=clock) as buffer:
        with pytest.raises(BufferError, match=r"the 2 dead letters .* do not fit beside the 2"):
            await buffer.requeue_dead()
        assert (await buffer.stats()).dead_letters == 2  # nothing moved
        await buffer.delete([3])
        ttls = {"a": 60.0, "b": None}
        assert await buffer.requeue_dead(ttls.get) == 2
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        expiries = dict(db.execute("SELECT topic, expires_at FROM events WHERE seq <= 2"))
    finally:
        db.close()
    assert expiries == {"a": 1_000_000_000 + 60_000, "b": None}


async def test_both_insert_paths_store_the_same_column_types(tmp_path: Path) -> None:
    """The group insert binds payloads as bytearrays and "no TTL" as '' (sqlite3's adapter
    lookup for bytes and None was most of its binding cost): the rows must be what the one-event
    path (a full buffer's policy) stores, a BLOB and NULL or an INTEGER expiry."""
    clock = FakeClock(start=1_000_000.0)
    async with await Buffer.open(tmp_path, max_events=4, clock=clock) as buffer:
        # Higher than what the full buffer's events drop (c and d).
        fast = [event(b"\x00a", topic="a", priority=1), event(b"", topic="b", priority=1, ttl=60.0)]
        assert await buffer.append(fast) == [1, 2]
        assert await buffer.append([event(topic="c"), event(topic="d")]) == [3, 4]
        policy = [
            event(b"\x00e", topic="e", on_full="drop-oldest"),
            event(topic="f", on_full="drop-oldest", ttl=60.0),
        ]
        assert await buffer.append(policy) == [5, 6]
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        rows = db.execute(
            "SELECT topic, payload, typeof(payload), expires_at, typeof(expires_at) FROM events"
            " WHERE topic IN ('a', 'b', 'e', 'f') ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    expiry = 1_000_000_000 + 60_000
    assert rows == [
        ("a", b"\x00a", "blob", None, "null"),
        ("b", b"", "blob", expiry, "integer"),
        ("e", b"\x00e", "blob", None, "null"),
        ("f", b"x", "blob", expiry, "integer"),
    ]


async def test_files_of_the_previous_run_go_as_soon_as_the_lock_is_taken(tmp_path: Path) -> None:
    """A ``listener.json`` left by a crashed run can name this process's pid (PID 1 in a
    container): `edge-agent publish` trusted it while the new agent checked its buffer (seconds
    for a large one), got its PUBACK from whatever listened on that old port, and exited 0 with
    nothing stored. It goes before the checks now."""
    stale = tmp_path / "listener.json"
    stale.write_text(f'{{"pid": {os.getpid()}, "host": "127.0.0.1", "port": 1883, "tls": false}}')
    seen: list[bool] = []

    def connect(path: Path) -> sqlite3.Connection:
        seen.append(stale.exists())  # the first step of opening the database
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)

    async with await Buffer.open(tmp_path, connect=connect, run_files=("listener.json",)):
        assert seen == [False]


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("name", ["with #hash", "with ?query", "with %25", "50%"])
async def test_read_only_inspection_whatever_the_directory_is_called(
    tmp_path: Path, name: str
) -> None:
    """``edge-agent status`` and ``buffer peek`` opened a ``file:`` URI made of the path
    unquoted: a '#' or '?' in a directory's name ended the file name there (another, empty
    database was created and read), a '%' failed."""
    directory = tmp_path / name
    async with await Buffer.open(directory) as buffer:
        await buffer.append_one(event(b"x"))
    assert inspect(directory).events == 1
    assert [e.payload for e in read_events(directory)] == [b"x"]
    assert entries(tmp_path) == [name]  # nothing else opened


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


async def test_appends_cancelled_before_their_commit_are_not_stored(tmp_path: Path) -> None:
    """Found by review: behind a stalled commit, the local listener's stage timeout cancelled
    the appends queued meanwhile; they stayed queued and were committed once the disk came
    back, while their producers, told nothing was stored, sent them again: each event stored
    twice under two seqs (nothing downstream can dedupe that), each round held in memory. The
    committer leaves cancelled appends out; `withdraw` takes them back at once (the listener's
    stage does, through `Acceptor.accept_many`)."""
    failpoints.arm("buffer.before_commit", "sleep:1@1")  # the first commit stalls for 1 s
    try:
        async with await Buffer.open(tmp_path) as buffer:
            first = buffer.append_one(event(b"first"))
            await asyncio.sleep(0.3)  # its commit began, and stalls
            withdrawn = buffer.append([event(b"withdrawn"), event(b"withdrawn too")])
            left_out = buffer.append_one(event(b"left out"))
            withdrawn.cancel()
            buffer.withdraw(withdrawn)
            left_out.cancel()
            assert await first == 1
            assert await buffer.append_one(event(b"after")) == 2
    finally:
        failpoints.disarm_all()
    assert [e.payload for e in read_events(tmp_path)] == [b"first", b"after"]


async def test_appends_withdrawn_during_the_linger_leave_no_empty_commit(tmp_path: Path) -> None:
    """Found by review of 8482438: `withdraw` can empty the pending appends while the committer
    lingers; it then committed an empty group (a transaction on the buffer's thread, a commit
    counted, a commit of 0 events in the metrics)."""
    async with await Buffer.open(tmp_path, commit_linger=0.3) as buffer:
        observed: list[int] = []
        buffer.on_commit_timed = lambda seconds, events: observed.append(events)
        appended = buffer.append([event(b"a")])
        await asyncio.sleep(0.1)  # the committer lingers for it
        appended.cancel()
        buffer.withdraw(appended)
        await asyncio.sleep(0.4)
        assert (buffer.commits, observed) == (0, [])
        assert await buffer.append_one(event(b"b")) == 1
    assert [e.payload for e in read_events(tmp_path)] == [b"b"]
