"""The SQLite buffer when the disk fills up (RELIABILITY F7), injected with ``max_page_count``, a
small real tmpfs and ``RLIMIT_FSIZE``: the topic's ``on_full`` policy applies, a disk reserve is
kept so that stored events still drain, and the buffer recovers by itself."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.buffer import Buffer, BufferFull, inspect
from tests.harness.buffer import event
from tests.harness.disk import fill, free_bytes, small_disk
from tests.harness.report import figures


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
