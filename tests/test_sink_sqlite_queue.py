"""The embedded core queue: confirmed means on disk, an event id is stored once."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sink import health
from cloud_sink.backends import (
    CoreMessage,
    DeadLetterMessage,
    SqliteCoreQueue,
    read_dead_letters,
    read_messages,
)
from cloud_sink.backends.base import BackendError
from cloud_sink.health import BackendGuard, BackendState
from mqtt_ingest import Counters, failpoints
from mqtt_ingest.backoff import Backoff
from tests.harness.disk import fill, free_bytes, small_disk
from tests.harness.sink import core_message


async def test_publish_stores_in_order_and_counts_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    first = await queue.publish([core_message(1), core_message(2), core_message(3)])
    again = await queue.publish([core_message(2), core_message(3), core_message(4)])
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    assert queue.duplicates == 2
    # Visible to another reader while the queue is open: confirmed means committed.
    assert [m.seq for _, m in read_messages(path)] == [1, 2, 3, 4]
    await queue.aclose()
    stored = list(read_messages(path))
    assert stored[0][1] == core_message(1)
    assert [m.seq for _, m in read_messages(path, after=stored[1][0])] == [3, 4]


async def test_raw_publishes_without_seq_and_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    raw = CoreMessage("sink-abc", "dev-2", "devices/dev-2/x", b"raw", 0, 1)
    await queue.publish([raw])
    bad = DeadLetterMessage(
        "dev-2", "devices/dev-2/a.b", b"\x00", "topic level 'a.b'", 5, "dev-2/e/1"
    )
    await queue.dead_letter([bad])
    await queue.aclose()
    assert [m for _, m in read_messages(path)] == [raw]
    assert read_dead_letters(path) == [bad]


async def test_a_core_queue_from_before_letter_ids_gets_them(tmp_path: Path) -> None:
    """A core queue made before dead letters had ids: its letters stay, new ones get ids, and a
    resent letter is stored once."""
    path = tmp_path / "core.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE dead_letters (position INTEGER PRIMARY KEY, device_id TEXT NOT NULL,"
        " topic TEXT NOT NULL, reason TEXT NOT NULL, received_at INTEGER NOT NULL,"
        " payload BLOB NOT NULL);"
        "INSERT INTO dead_letters (device_id, topic, reason, received_at, payload)"
        " VALUES ('dev-1', 't', 'old', 1, x'00');"
    )
    old.close()
    queue = await SqliteCoreQueue.open(path)
    letter = DeadLetterMessage("dev-2", "devices/dev-2/a.b", b"\x01", "new", 2, "dev-2/e/7")
    await queue.dead_letter([letter])
    await queue.dead_letter([letter, letter])
    await queue.aclose()
    assert read_dead_letters(path) == [
        DeadLetterMessage("dev-1", "t", b"\x00", "old", 1, ""),
        letter,
    ]


async def test_concurrent_batches_from_many_devices(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    await asyncio.gather(
        *(queue.publish([core_message(s, f"dev-{d}") for s in range(1, 51)]) for d in range(10))
    )
    await queue.aclose()
    assert len(list(read_messages(path))) == 500


def _messages(first: int, count: int, size: int) -> list[CoreMessage]:
    return [core_message(n)._replace(payload=bytes(size)) for n in range(first, first + count)]


async def test_the_disk_reserve_refuses_writes_and_the_probe_alike(tmp_path: Path) -> None:
    """On a real small filesystem: a stage call that would cut into the reserve is refused, and
    the probe keeps failing until such a call fits (with a quarter of the reserve to spare); it
    used to pass at once, and the sink went up and down with every resend of a large call. The
    room the file already has (a WAL written again from its start after a checkpoint, pages a
    consumer freed) takes a write without the disk, so that one is not refused."""
    reserve = 2 * 1024**2
    with small_disk(tmp_path / "disk", 24 * 1024**2) as disk:
        path = disk / "core.db"
        queue = await SqliteCoreQueue.open(path, disk_reserve=reserve)
        try:
            await queue.publish(_messages(1, 1000, 100))
            filler = fill(disk, reserve * 13 // 10)
            big = _messages(100_000, 20_000, 100)
            for _ in range(3):
                with pytest.raises(BackendError, match="the disk is nearly full"):
                    await queue.publish(big)
                with pytest.raises(BackendError, match="the disk is nearly full"):
                    await queue.probe()
                assert free_bytes(disk) > reserve  # never filled to the last byte
            filler.unlink()
            await queue.probe()
            assert (await queue.publish(big)).stored == 20_000
            # A consumer deletes what it read: the next call of that size needs no new disk.
            with sqlite3.connect(path) as consumer:
                consumer.execute("DELETE FROM events")
            filler = fill(disk, reserve * 13 // 10)
            before = free_bytes(disk)
            again = _messages(200_000, 20_000, 100)
            assert (await queue.publish(again)).stored == 20_000
            assert free_bytes(disk) >= before - 64 * 1024, "it grew into the reserve"
            filler.unlink()
            # A call bigger than the disk can ever take is refused, and does not keep the probe
            # failing for ever: it asks room for at most the reserve's size.
            with pytest.raises(BackendError, match="the disk is nearly full"):
                await queue.publish(_messages(300_000, 20_000, 1000))
            await queue.probe()
        finally:
            await queue.aclose()


_UNDER_FILE_LIMIT = """
import asyncio, resource, signal, subprocess, sys
from pathlib import Path
from cloud_sink.backends.base import BackendError
from tests.test_sink_sqlite_queue import _messages
from cloud_sink.backends import SqliteCoreQueue

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, limit, reserve, batch = Path(sys.argv[1]), *map(int, sys.argv[2:])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

async def main():
    queue = await SqliteCoreQueue.open(path, disk_reserve=reserve)
    stored = failures = 0
    while failures < 3:
        try:
            stored += (await queue.publish(_messages(stored, batch, 200))).stored
            if failures:
                print("passed again after", failures, "failure(s)")
                failures = 0
        except BackendError as exc:
            failures += 1
            print("refused at", stored, ":", exc)
            try:
                await queue.probe()
                print("probe passed")
            except BackendError as probe:
                print("probe refused:", probe)
    # A consumer (another process, with no file size limit) deletes what it read.
    consumer = (
        "import resource, sqlite3, sys; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2); "
        "db = sqlite3.connect(sys.argv[1]); db.execute('DELETE FROM events'); db.commit()"
    )
    subprocess.run([sys.executable, "-c", consumer, str(path)], check=True)
    await queue.probe()
    print("after the consumer:", (await queue.publish(_messages(10**6, batch, 200))).stored)
    await queue.aclose()

asyncio.run(main())
"""


async def _fill_under_file_limit(path: Path, limit: int, reserve: int, batch: int) -> list[str]:
    """Publish calls of ``batch`` events into a core queue in a child process whose files
    cannot grow past ``limit`` bytes (RLIMIT_FSIZE) until three in a row are refused (each
    followed by a probe), then let a consumer empty it and publish once more; its lines."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _UNDER_FILE_LIMIT, str(path), str(limit), str(reserve), str(batch)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


async def test_under_a_file_size_limit_writes_are_refused_before_the_wal_is_stuck(
    tmp_path: Path,
) -> None:
    """Found in review: under ``RLIMIT_FSIZE`` (systemd's ``LimitFSIZE=``) the reserve counted
    the disk only. At 4 MiB the WAL reached the limit before its first checkpoint (13,000
    events): every write failed ("disk I/O error") while the probe passed, so the sink went
    down and up for good with an empty database. Now a write that would cut into the room
    below the limit is refused and the probe fails with it, until a consumer makes room."""
    lines = await _fill_under_file_limit(tmp_path / "core.db", 4 * 1024**2, 64 * 1024**2, 1000)
    refusals = [line for line in lines if line.startswith("refused at")]
    assert len(refusals) == 3
    assert all("nearly at the file size limit (RLIMIT_FSIZE 4.2 MB" in r for r in refusals), lines
    assert sum(line.startswith("probe refused: ") for line in lines) == 3, lines
    assert int(refusals[0].split()[2]) >= 8000  # most of the limit is used first
    assert lines[-1] == "after the consumer: 1000"


async def test_a_wal_that_could_not_grow_is_written_again_by_the_next_write(
    tmp_path: Path,
) -> None:
    """With the reserve off: a write failing because the WAL reached ``RLIMIT_FSIZE`` before
    its first checkpoint is followed by a checkpoint, and the next write passes (it failed for
    good: SQLite checkpoints only after a commit)."""
    lines = await _fill_under_file_limit(tmp_path / "core.db", 3 * 10**6, 0, 500)
    assert "passed again after 1 failure(s)" in lines
    assert lines[-1] == "after the consumer: 500"


async def test_the_probe_of_an_idle_sink_asks_only_the_room_a_write_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the idle probe (readiness of an idle sink) asked the recovery probe's
    quarter of the reserve on top: a disk between 1 and 1.25 reserves free, where writes still
    fit, was declared an outage and every device refused."""
    monkeypatch.setattr(health, "IDLE_PROBE", 0.1)
    reserve = 2 * 1024**2
    with small_disk(tmp_path / "disk", 24 * 1024**2) as disk:
        queue = await SqliteCoreQueue.open(disk / "core.db", disk_reserve=reserve)
        guard = BackendGuard(queue, Backoff(0.05, 0.1), Counters())
        try:
            async with asyncio.TaskGroup() as tasks:
                runner = tasks.create_task(guard.run())
                await guard.publish(_messages(1, 10, 100))
                fill(disk, reserve * 11 // 10)  # leaves 1.1 reserves free
                await asyncio.sleep(0.5)  # idle probes
                assert guard.state is BackendState.UP
                assert (await guard.publish(_messages(11, 10, 100))).stored == 10
                runner.cancel()
        finally:
            await queue.aclose()


async def test_a_filesystem_error_of_the_disk_check_is_an_outage(tmp_path: Path) -> None:
    """The disk reserve's statvfs failing (here: the directory removed; a stale or failing
    mount alike) raised a plain OSError: each batch failed as a stage error with no outage
    declared (CONNECTs accepted, /readyz 200), and a probe's killed the reconnect task."""
    directory = tmp_path / "core"
    directory.mkdir()
    queue = await SqliteCoreQueue.open(directory / "core.db")
    guard = BackendGuard(queue, Backoff(0.05, 0.1), Counters())
    async with asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(guard.run())
        await guard.publish([core_message(1)])
        shutil.rmtree(directory)
        with pytest.raises(BackendError, match="No such file"):
            await guard.publish([core_message(2)])
        assert guard.state is BackendState.DOWN
        with pytest.raises(BackendError):
            await queue.probe()
        await asyncio.sleep(0.3)  # a few failed probes
        assert not runner.done()
        runner.cancel()
    await queue.aclose()


async def test_a_stalled_write_is_an_outage_and_the_probe_does_not_queue_behind_it(
    tmp_path: Path,
) -> None:
    """A write that hangs (a stalled disk; the failpoint sleeps in its transaction) raised
    nothing: the ingest server's stage timeout cut it off without an outage, the idle probe
    queued behind it and hung too, and the sink said ready while it could confirm nothing."""
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    queue.call_timeout = 0.5
    try:
        failpoints.arm("sink.sqlite.write", "sleep:2@1")
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"no answer within 0.5s \(a stalled disk\?\)"):
            await queue.publish([core_message(1)])
        assert time.monotonic() - started < 1.5
        with pytest.raises(BackendError, match="an earlier call is still running"):
            await queue.probe()
        async with asyncio.timeout(5):
            while True:  # the disk answers again
                try:
                    await queue.probe()
                    break
                except BackendError:
                    await asyncio.sleep(0.1)
        outcome = await queue.publish([core_message(1), core_message(2)])
    finally:
        failpoints.disarm_all()
        await queue.aclose()
    # The stalled write did commit in the end: its resend is a duplicate, not a second copy.
    assert (outcome.stored, outcome.duplicates) == (1, 1)
    assert [m.seq for _, m in read_messages(path)] == [1, 2]


async def test_the_probe_waits_for_a_call_that_is_merely_running(tmp_path: Path) -> None:
    """Only a call given up on fails the probe at once: one that is just running (a dead letter
    being written when the idle probe came) made a healthy sink declare an outage."""
    queue = await SqliteCoreQueue.open(tmp_path / "core.db")
    try:
        failpoints.arm("sink.sqlite.write", "sleep:0.3@1")
        writing = asyncio.create_task(queue.publish([core_message(1)]))
        await asyncio.sleep(0.05)  # the write holds the thread
        await queue.probe()
        assert (await writing).stored == 1
    finally:
        failpoints.disarm_all()
        await queue.aclose()


def test_a_stopped_sink_exits_with_a_write_still_stuck(tmp_path: Path) -> None:
    """The thread of a call stuck on a stalled disk was joined at interpreter exit: the sink
    stopped, and the process hung until the disk answered (for ever on a hung volume)."""
    script = f"""
import asyncio
from pathlib import Path
from cloud_sink.backends import SqliteCoreQueue
from cloud_sink.backends.base import BackendError
from mqtt_ingest import failpoints
from tests.harness.sink import core_message

async def main():
    queue = await SqliteCoreQueue.open(Path({str(tmp_path / "core.db")!r}))
    queue.call_timeout = 0.2
    failpoints.arm("sink.sqlite.write", "sleep:60")
    try:
        await queue.publish([core_message(1)])
    except BackendError as exc:
        print("outage:", exc)
    await queue.aclose()

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, check=False,
        cwd=Path(__file__).parent.parent,  # the repository: `tests` is importable
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "outage: sqlite core queue: no answer within 0.2s" in done.stdout


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("directory", ["plain", "with #hash", "with ?query", "with %25", "50%"])
async def test_tail_reads_the_core_queue_whatever_its_directory_is_called(
    tmp_path: Path, directory: str
) -> None:
    """`read_messages` (``cloud-sink tail``) and `read_dead_letters` opened a ``file:`` URI made
    of the path unquoted: a '#' or '?' in a directory's name ended the file name there (they
    showed nothing, and created a stray empty database beside it), a '%' failed."""
    path = tmp_path / directory / "core.db"
    letter = DeadLetterMessage("dev-1", "devices/dev-1/t", b"x", "why", 1, "dev-1/e/9")
    queue = await SqliteCoreQueue.open(path, disk_reserve=0)
    try:
        await queue.publish([core_message(1)])
        await queue.dead_letter([letter])
    finally:
        await queue.aclose()
    assert [m for _, m in read_messages(path)] == [core_message(1)]
    assert read_dead_letters(path) == [letter]
    assert entries(tmp_path) == [directory]  # nothing else opened


_ONE_LARGE_CALL = """
import asyncio, resource, signal, sys
from pathlib import Path
from cloud_sink.backends.base import BackendError
from tests.test_sink_sqlite_queue import _messages
from cloud_sink.backends import SqliteCoreQueue

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024**2, resource.RLIM_INFINITY))

async def main():
    queue = await SqliteCoreQueue.open(Path(sys.argv[1]))  # the default reserve, 64 MiB
    try:
        await queue.publish(_messages(0, 17, 200 * 1024))  # one stage call of 3.5 MB
    except BackendError as exc:
        print("refused:", exc)
    try:
        await queue.probe()
        print("probe passed")
    except BackendError as exc:
        print("probe refused:", exc)
    await queue.aclose()

asyncio.run(main())
"""


async def test_a_call_larger_than_the_file_limit_can_take_does_not_keep_the_probe_failing(
    tmp_path: Path,
) -> None:
    """Found in review: under ``RLIMIT_FSIZE`` the probe asked room for the largest refused write
    capped at the reserve (64 MiB), not at what the file may take: one stage call of 3.5 MB
    under a 4 MiB limit was refused, and then the probe of an empty database failed for good
    (the guard sends no write while the core queue is down): an outage only a restart ended."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _ONE_LARGE_CALL, str(tmp_path / "core.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: sqlite core queue: the database is nearly at"), lines
    assert lines[1] == "probe passed", lines
