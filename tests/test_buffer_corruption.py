"""A damaged SQLite buffer (RELIABILITY F8): a corrupt database is quarantined with its -wal and
-shm and a fresh one started, the loss reported, with no crash loop; a deleted or damaged WAL is
reported and its seqs never given again; index damage is rebuilt by REINDEX; damage found while
running stops the agent; a database that cannot be opened for want of room is left in place and
the start refused in words."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from edge_agent.buffer import PAGE_SIZE, Buffer, agent_pid, inspect
from edge_agent.buffer.files import SEQ_GAP
from mqtt_ingest import FakeClock, failpoints
from tests.harness.agent import start_agent, write_config
from tests.harness.buffer import event
from tests.harness.process import ProcessFactory, console_script
from tests.harness.report import figures


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
    buffer = await Buffer.open(Path(sys.argv[1]), durability=(sys.argv[2:] or ['full'])[0])
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


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_a_torn_last_commit_is_not_reported_as_a_loss_with_full_durability(
    tmp_path: Path, durability: Literal["full", "normal"]
) -> None:
    """A power loss during the last commit's write or fsync leaves its frames torn, and SQLite's
    recovery drops that commit. With ``full`` its events had not been acknowledged (a commit is
    acknowledged once synced, and the next one starts after that): it was reported as
    acknowledged events lost (``wal-damaged``, an error), a false alarm at every such power cut.
    Now ``wal-torn``. With ``normal`` the commit had been acknowledged: still a loss."""
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _WAL_CRASH, str(tmp_path), durability], check=True
    )
    wal = tmp_path / "buffer.db-wal"
    data = bytearray(wal.read_bytes())
    frames = (len(data) - 32) // (PAGE_SIZE + 24)
    data[32 + (frames - 1) * (PAGE_SIZE + 24) + 24 + 500] ^= 0x01  # the last frame's page
    wal.write_bytes(data)
    async with await Buffer.open(tmp_path, durability=durability) as buffer:
        stats = await buffer.stats()
        seq = await buffer.append_one(event(b"new"))
    figures("torn last commit", durability=durability, frames=frames, detail=stats.incidents)
    assert stats.events == 19  # the last commit's one event is gone
    [incident] = stats.incidents
    if durability == "full":
        assert incident.kind == "wal-torn"
        assert "had not been acknowledged" in incident.detail
    else:
        assert incident.kind == "wal-damaged"
        assert "dropped the 1 commit after them" in incident.detail
        assert "acknowledged before they are synced" in incident.detail
    assert f"(frame {frames})" in incident.detail  # a commit of one frame
    assert seq == 19 + SEQ_GAP + 1  # the dropped commit's seq is not given again


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
