"""The SQLite buffer on its own, its core: group commit (appends cancelled or withdrawn before
their commit left out), seq and epoch across restarts, the directory lock (RELIABILITY F20),
close, the WAL's size and read-only inspection. The rest of the buffer's tests: the drain in
test_buffer_drain.py, limits and policies in test_buffer_limits.py, a full disk (F7) in
test_buffer_disk_full.py, corruption (F8) in test_buffer_corruption.py, schema migrations in
test_buffer_migrations.py."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from pathlib import Path

import pytest

from edge_agent.buffer import (
    LOCK_NAME,
    Buffer,
    BufferError,
    BufferLocked,
    agent_pid,
    inspect,
    read_events,
)
from edge_agent.buffer.files import WAL_SIZE_LIMIT
from mqtt_ingest import FakeClock, failpoints
from tests.harness.buffer import event
from tests.harness.report import figures


async def test_concurrent_appends_share_commits_and_get_increasing_seqs(tmp_path: Path) -> None:
    async with await Buffer.open(tmp_path, commit_linger=0.01) as buffer:
        seqs = await asyncio.gather(*(buffer.append_one(event(b"%d" % i)) for i in range(500)))
        assert sorted(seqs) == list(range(1, 501))
        assert buffer.commits < 50, f"{buffer.commits} commits for 500 concurrent appends"
    # Committed means on disk: another connection sees all of them.
    assert inspect(tmp_path).events == 500


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


async def test_close_during_the_commit_linger_commits_and_returns(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path, commit_linger=0.2)
    append = asyncio.ensure_future(buffer.append_one(event(b"lingering")))
    await asyncio.sleep(0.05)  # the committer is in its linger now
    await asyncio.wait_for(buffer.aclose(), 5)
    assert await append == 1
    assert [e.payload for e in read_events(tmp_path)] == [b"lingering"]


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
