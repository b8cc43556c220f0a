"""The buffer's room on disk, on its own thread: the disk reserve kept for draining (free space,
and the database file's room under ``RLIMIT_FSIZE``), what a row costs against it, and the WAL
checkpoint that lets a full WAL be reused after a failed write."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.buffer.files import DISK_FULL
from edge_agent.buffer.model import DB_NAME, NewEvent, T
from mqtt_ingest.disk import free_bytes, megabytes

log = logging.getLogger("edge_agent.buffer")


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


_ROW_OVERHEAD = 64
"""Bytes a row takes on disk beyond its payload and topic (record header, b-tree cell and index
entry), rounded up: the estimate a group is checked against the disk reserve with."""


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
