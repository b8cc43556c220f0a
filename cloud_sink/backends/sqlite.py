"""The embedded core queue: one SQLite file in WAL mode, fsynced at every batch.

``events`` has a unique key on the event id, so a device resending after a lost ack is counted as
a duplicate and not stored twice (SPEC §2 P2). ``cloud-sink tail`` reads it with `read_messages`.
All SQL of this backend is here; it runs on one dedicated thread, one transaction per call.

Failpoint ``sink.sqlite.write`` sits inside every write transaction (and in `probe`); armed with
``raise`` it stands for a failing file (disk error, read-only, corrupt) and surfaces as
`BackendError` like any ``sqlite3.Error``.

A write that would leave less than ``disk_reserve`` free on the file's filesystem is refused
(`BackendError`, before it starts), and `probe` fails until the largest write refused fits with
a quarter of the reserve to spare: an outage that lasts until someone makes room, instead of
SQLite failing on the last bytes, the probe's empty transaction passing, and the sink going
down and up every few seconds. Under ``RLIMIT_FSIZE`` (systemd's ``LimitFSIZE=``) the room
below the limit counts too (measured without: at 4 MiB the WAL reached the limit before its
first checkpoint, after 13,000 events of 200 bytes, and every write failed while the probe
passed), with a reserve of at most a quarter of the limit. A write that fails anyway (the
check off, another process filling the disk) is followed by a passive checkpoint, so a WAL
that could not grow is written again from its start by the next write instead of failing
every one for good.

A call with no answer within `CALL_TIMEOUT` (a stalled disk) is an outage too; `probe` fails at
once while it still runs on the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import operator
import queue
import resource
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cloud_sink.backends.base import BackendError, CoreMessage, DeadLetterMessage, PublishOutcome
from mqtt_ingest import failpoints
from mqtt_ingest.disk import free_bytes, megabytes
from mqtt_ingest.lifecycle import drop_outcome
from mqtt_ingest.sqlite_rows import insert_rows

__all__ = ["CALL_TIMEOUT", "DISK_RESERVE", "SqliteCoreQueue", "read_dead_letters", "read_messages"]

log = logging.getLogger(__name__)

DISK_RESERVE = 64 * 1024**2
"""The default ``disk_reserve``: room for the WAL of several of the largest stage calls (20,000
events) and for their checkpoints."""
_ROW_OVERHEAD = 100  # bytes a row takes beyond its payload and topic: ids, numbers, the index
_PAYLOAD = operator.itemgetter(3)
_TOPIC = operator.itemgetter(2)

T = TypeVar("T")

_BUSY_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0
"""Seconds a call may take before it is an outage: two calls (events, then dead letters) end
within the ingest server's 30 s stage timeout, as with the other backends' ``timeout``."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER,
    event_time INTEGER,
    received_at INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    position INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    payload BLOB NOT NULL,
    letter_id TEXT
);
"""
_LETTER_ID = """
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_letter_id ON dead_letters (letter_id);
"""


_MAX_CHUNK = 124  # rows per INSERT: 992 parameters, under the 999 of SQLite before 3.32


@functools.cache
def _insert_sql(rows: int) -> str:
    return (
        "INSERT OR IGNORE INTO events (event_id, device_id, topic, payload, qos, received_at,"  # noqa: S608  # only placeholders
        " seq, event_time) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    )


class SqliteCoreQueue:
    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        disk_reserve: int = 0,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.path = path
        self.call_timeout = call_timeout
        self._db = db
        self._stuck: asyncio.Future[Any] | None = None  # a call given up on, maybe still running
        self._reserve = disk_reserve
        self._refused = 0  # bytes of the largest write refused for the reserve since one passed
        self._executor = _DaemonWorker("sink-sqlite")
        self.duplicates = 0
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._file_limit = None if limit == resource.RLIM_INFINITY else limit
        """``RLIMIT_FSIZE``: no file may grow past it, whatever ``statvfs`` says."""

    @classmethod
    async def open(cls, path: Path, disk_reserve: int = DISK_RESERVE) -> SqliteCoreQueue:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A lock held longer than this by another process is an outage (BackendError), and
        # must be seen as one well before the ingest server's stage timeout (30 s).
        try:
            db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT
            )
        except sqlite3.Error as exc:  # a directory it cannot write, a directory at the path
            raise BackendError(f"cannot open the core queue {path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(dead_letters)")}
            if "letter_id" not in columns:  # a core queue made before dead letters had ids
                db.execute("ALTER TABLE dead_letters ADD COLUMN letter_id TEXT")
            db.executescript(_LETTER_ID)
        except sqlite3.Error as exc:
            db.close()
            raise BackendError(f"cannot open the core queue {path}: {exc}") from exc
        return cls(path, db, disk_reserve)

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._executor, function, *args)
        try:
            async with asyncio.timeout(self.call_timeout):
                return await asyncio.shield(running)
        except TimeoutError:
            # A stalled disk (a hung fsync or volume): an outage, as a backend that does not
            # confirm in time. The ingest server's 30 s stage timeout cut such a call off
            # without one, and the sink stayed "ready" while it could confirm nothing.
            running.add_done_callback(drop_outcome)
            self._stuck = running
            raise BackendError(
                f"sqlite core queue: no answer within {self.call_timeout:g}s (a stalled disk?)"
            ) from None
        except (sqlite3.Error, OSError, failpoints.FailpointError) as exc:
            # OSError: the disk reserve's statvfs (the directory gone, a stale or failing
            # mount) is the core queue failing too: an outage, not a stage error.
            raise BackendError(f"sqlite core queue: {exc}") from exc

    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        return None  # a row holds up to 1 GB: far beyond any packet the sink accepts

    async def recheck_limits(self) -> bool:
        return False  # `refusal` has no limit

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        stored = await self._run(self._insert, list(messages))
        outcome = PublishOutcome(stored=stored, duplicates=len(messages) - stored)
        self.duplicates += outcome.duplicates
        return outcome

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        await self._run(self._insert_dead, list(messages))

    async def probe(self) -> None:
        """Take the write lock and let it go: the file is there, writable and not locked. Fails
        at once while a call that timed out is still running (it would queue behind it)."""
        if self._stuck is not None and not self._stuck.done():
            raise BackendError(
                "sqlite core queue: an earlier call is still running (a stalled disk?)"
            )
        await self._run(self._probe)

    async def aclose(self) -> None:
        try:
            await self._run(self._db.close)
        except BackendError as exc:
            log.warning("closing the sqlite core queue: %s", exc)
            self._executor.shutdown(wait=False)  # its thread is stuck: do not wait for it
            return
        self._executor.shutdown(wait=True)

    def _short(self, need: int, spare: bool, wal: int = 0, pages: int = 0) -> str | None:
        """Why writing ``need`` bytes would cut into ``disk_reserve`` (and a quarter of it more
        if ``spare``), or None: on the filesystem, or below ``RLIMIT_FSIZE``, which each file
        may reach (there the reserve kept in the database file is at most a quarter of the
        limit; the WAL may reach the limit itself). ``wal``: bytes of a checkpointed WAL the
        next write starts over (0: it grows); ``pages``: bytes free inside the database."""
        reserve = self._reserve
        spared = reserve // 4 if spare else 0
        free = free_bytes(self.path.parent)
        if free - max(0, need - wal) - max(0, need - pages) < reserve + spared:
            return (
                f"the disk is nearly full ({megabytes(free)} free on {self.path.parent}, "
                f"disk_reserve {megabytes(reserve)}"
            )
        limit = self._file_limit
        if limit is not None:
            kept = min(reserve, limit // 4)
            database, log_file = _size(self.path), _size(Path(f"{self.path}-wal"))
            growth = max(0, need - pages)  # (none: the file is not written past its end)
            database_over = growth and database + growth > limit - kept - (
                kept // 4 if spare else 0
            )
            wal_over = (max(wal, need) if wal else log_file + need) > limit
            if database_over or wal_over:
                return (
                    f"the database is nearly at the file size limit (RLIMIT_FSIZE "
                    f"{megabytes(limit)}: {self.path.name} {megabytes(database)}, its WAL "
                    f"{megabytes(log_file)}, {megabytes(kept)} kept below it"
                )
        return None

    def _room(self, need: int, *, spare: bool = False) -> None:
        """Raise `BackendError` unless writing ``need`` bytes leaves the reserve (`_short`).
        They are written twice: into the WAL, which grows unless a checkpoint let it be written
        again from its start, then at a checkpoint into the database, where pages free inside
        the file (a consumer deleting) take them. Call it outside a transaction."""
        if not self._reserve or self._short(need, spare) is None:
            return
        db = self._db
        (pages,) = db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        wal = 0
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames == copied:  # all back in the database: the next write starts it over
                wal = _size(Path(f"{self.path}-wal"))
        except sqlite3.OperationalError:
            pass  # no room to checkpoint: nothing reusable
        # (after the checkpoint, which may have grown the file)
        why = self._short(need, spare, wal, pages * page_size)
        if why is None:
            return
        self._refused = max(self._refused, need)
        raise BackendError(f"sqlite core queue: {why}, a write of {megabytes(need)} refused)")

    def _after_failure(self) -> None:
        """After a write that failed (rolled back): a passive checkpoint, so a WAL that could
        not grow (no room on the disk or below ``RLIMIT_FSIZE``) is written again from its
        start by the next write. SQLite checkpoints only after a commit that grew the WAL past
        ``wal_autocheckpoint``: without this one, no write ever passed again."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _probe(self) -> None:
        # After a write refused for the reserve: room for the largest such write (at most the
        # reserve's size, and under RLIMIT_FSIZE at most what is kept below it: a call of many
        # devices' events is not sent again as such, and one the file can never take kept the
        # probe failing for good), and a quarter more: no flapping. Otherwise (the probe of an
        # idle sink) what a write needs.
        if self._refused:
            most = self._reserve
            if self._file_limit is not None:
                most = min(most, self._file_limit // 4)
            self._room(min(self._refused, most), spare=True)
        else:
            self._room(0)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            failpoints.hit("sink.sqlite.write")
        finally:
            db.execute("ROLLBACK")

    def _insert(self, messages: list[CoreMessage]) -> int:
        """Insert ``messages`` in one transaction, in multi-row INSERTs (`insert_rows`, not a
        statement per event); returns how many were new (not duplicates)."""
        db = self._db
        self._room(
            sum(map(len, map(_PAYLOAD, messages)))
            + sum(map(len, map(_TOPIC, messages)))
            + _ROW_OVERHEAD * len(messages)
        )
        # The columns in field order.
        params: list[object] = list(itertools.chain.from_iterable(messages))
        # Payloads bound as bytearrays: Python's sqlite3 sends bytes through its adapter lookup,
        # which raises and clears an AttributeError per value (`edge_agent.buffer.store._ROW`).
        params[3::8] = map(bytearray, map(_PAYLOAD, messages))
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes  # rows ignored as duplicates are not changes
            insert_rows(db, _insert_sql, params, 8, most=_MAX_CHUNK)
            stored = db.total_changes - before
            failpoints.hit("sink.sqlite.write")
            db.execute("COMMIT")
            self._refused = 0
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                self._after_failure()
            raise
        return stored

    def _insert_dead(self, messages: list[DeadLetterMessage]) -> None:
        db = self._db
        self._room(sum(len(m.payload) + len(m.reason) + _ROW_OVERHEAD for m in messages))
        db.execute("BEGIN IMMEDIATE")
        try:
            # A resend of a letter already stored is ignored, as a resent event is.
            db.executemany(
                "INSERT OR IGNORE INTO dead_letters"
                " (device_id, topic, reason, received_at, payload, letter_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (m.device_id, m.topic, m.reason, m.received_at_ms, m.payload, m.letter_id)
                    for m in messages
                ],
            )
            failpoints.hit("sink.sqlite.write")
            db.execute("COMMIT")
            self._refused = 0
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                self._after_failure()
            raise


def _read_only_uri(path: Path) -> str:
    """``path`` as a read-only SQLite URI. Quoted: unquoted, a ``#`` or ``?`` in a directory's
    name ended the file name there (the reader opened, and created, another file: it showed
    nothing), and a ``%`` failed."""
    return path.resolve().as_uri() + "?mode=ro"


def _reader(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise BackendError(f"no core queue at {path}")
    return sqlite3.connect(_read_only_uri(path), uri=True, timeout=30)


def read_messages(path: Path, *, after: int = 0) -> Iterator[tuple[int, CoreMessage]]:
    """(position, message) in delivery order after ``after``; read-only, works while running.
    A file the sink has not set up yet holds none; one that is not a core queue is a
    `BackendError`."""
    db = _reader(path)
    try:
        rows = db.execute(
            "SELECT position, event_id, device_id, topic, payload, qos, received_at, seq,"
            " event_time FROM events WHERE position > ? ORDER BY position",
            (after,),
        )
        for position, *fields in rows:
            yield position, CoreMessage(*fields)
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):  # (the sink creating it: nothing in it yet)
            raise BackendError(f"cannot read the core queue {path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise BackendError(f"cannot read the core queue {path}: {exc}") from exc
    finally:
        db.close()


def read_dead_letters(path: Path) -> list[DeadLetterMessage]:
    db = _reader(path)
    try:
        return [
            DeadLetterMessage(*row)
            for row in db.execute(
                "SELECT device_id, topic, payload, reason, received_at, coalesce(letter_id, '')"
                " FROM dead_letters ORDER BY position"
            )
        ]
    finally:
        db.close()


class _DaemonWorker(concurrent.futures.Executor):
    """One daemon thread running the calls in order. `ThreadPoolExecutor`'s threads are joined
    at interpreter exit: a call stuck on a stalled disk kept the stopped sink from exiting."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._calls.put(None)
        if wait:
            self._thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


_Call = tuple["concurrent.futures.Future[Any]", Callable[[], Any]]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
