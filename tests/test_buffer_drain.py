"""The SQLite buffer's drain API on its own: reads in drain order (priority, then seq) page by
page, within a byte budget and skipping what the uplink holds aside; deletes of any size; events
held while in flight and released; reprioritizing; the TTL sweep; attempts, poison counts, dead
letters and their requeue."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge_agent.buffer import Buffer, BufferError, inspect, read_events
from mqtt_ingest import FakeClock
from tests.harness.buffer import event
from tests.harness.process import rss_kib
from tests.harness.report import figures


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
            # Every other seq: no run (a run is one range statement), every seq in an IN list.
            assert await buffer.delete(list(range(10_000, 10_000 + 2 * size, 2))) == 0
        grown = rss_kib() - before
    figures("256 delete sizes", rss_grown_kib=grown)
    assert grown < 6 * 1024


async def test_deletes_of_runs_and_scattered_seqs_remove_exactly_those(tmp_path: Path) -> None:
    """Runs of consecutive seqs are deleted as ranges, the rest through IN lists: either way
    exactly the seqs given go, and the totals and a purge's per-topic drop counts are right."""
    topics = ["a", "bb", "ccc"]
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"p" * (n % 7 + 1), topic=topics[n % 3]) for n in range(3000)])
        gone = [
            *range(1, 701),  # one long run, cut by the repeats of 5 and 350 below
            *range(702, 760, 2),  # scattered
            *range(800, 831),  # 31: one short of a run
            *range(900, 964),  # 64
            *range(1000, 3001, 3),  # scattered, to the end
            *range(2500, 2540),  # a run over scattered ones: their repeats cut it to pieces
            5,  # a repeat: 1-5 in an IN list, after the range 5-350 deleted 5
            350,  # a repeat: the ranges 5-350 and 350-700, 350 counted once
        ]
        expected = set(gone)
        sizes = {topic: [0, 0] for topic in topics}
        for seq in expected:  # event n has seq n + 1
            sizes[topics[(seq - 1) % 3]][0] += 1
            sizes[topics[(seq - 1) % 3]][1] += (seq - 1) % 7 + 1
        assert await buffer.delete(gone, drop_reason="purged") == len(expected)
        stats = await buffer.stats()
        assert buffer.backlog == (stats.events, stats.bytes)
    left = [e.seq for e in read_events(tmp_path)]
    assert left == [seq for seq in range(1, 3001) if seq not in expected]
    after = inspect(tmp_path)
    assert (after.events, after.bytes) == (stats.events, stats.bytes)
    assert after.events == 3000 - len(expected)
    assert {topic: list(after.drops[("purged", topic)]) for topic in topics} == sizes


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


async def test_reprioritize_gives_buffered_events_their_topics_priority(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(topic="bulk"), event(topic="alarm"), event(topic="bulk")])
        rules = {"alarm": 9, "bulk": 0}
        assert await buffer.reprioritize(rules.__getitem__) == 1
        assert [e.seq for e in await buffer.next_events(10)] == [2, 1, 3]
        assert await buffer.reprioritize(rules.__getitem__) == 0  # nothing to change


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
