"""Simulated power loss for SQLite (RELIABILITY F2): an APSW VFS that drops unsynced writes.

Every write reaches the real file (so a running connection sees it), but the VFS also remembers,
per file, the content as of its last ``xSync``. `CrashVFS.power_off` stops all further writes,
syncs and deletes (the disk is gone) and `CrashVFS.restore` puts every file back to what was
synced: what a disk holds after the power fails, with the page cache lost. Files never synced are
removed; the ``-shm`` index is dropped (SQLite rebuilds it from the WAL).

`ApswConnection` makes an APSW connection look like the part of ``sqlite3.Connection`` the buffer
uses, so the buffer's own code runs over this VFS.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import apsw

__all__ = ["ApswConnection", "CrashVFS"]


class CrashVFS(apsw.VFS):
    def __init__(self, name: str) -> None:
        self.vfs_name = name
        self.lock = threading.Lock()
        self.dead = False
        self.synced: dict[str, bytes] = {}
        self.touched: set[str] = set()
        self.syncs = 0
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> CrashFile:  # APSW's API
        return CrashFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        with self.lock:
            if self.dead:
                return
            self.synced.pop(filename, None)
            self.touched.discard(filename)
            super().xDelete(filename, syncdir)

    def power_off(self) -> None:
        with self.lock:
            self.dead = True

    def restore(self) -> dict[str, int]:
        """Put every file back to its last synced content; returns bytes lost per file."""
        lost: dict[str, int] = {}
        for path in sorted(self.touched):
            current = Path(path).read_bytes() if os.path.exists(path) else b""
            if path.endswith("-shm"):
                if os.path.exists(path):
                    os.unlink(path)
                continue
            durable = self.synced.get(path)
            if durable is None:
                if os.path.exists(path):
                    os.unlink(path)
                lost[path] = len(current)
                continue
            if current != durable:
                lost[path] = abs(len(current) - len(durable)) or len(current)
            Path(path).write_bytes(durable)
        return lost


class CrashFile(apsw.VFSFile):
    def __init__(self, vfs: CrashVFS, name: Any, flags: list[int]) -> None:
        self.vfs = vfs
        self.path = name.filename() if isinstance(name, apsw.URIFilename) else name
        existed = bool(self.path) and os.path.exists(self.path)
        super().__init__("", name, flags)
        if self.path:
            with vfs.lock:
                vfs.touched.add(self.path)
                if existed and self.path not in vfs.synced:
                    # Written before this VFS was in use (and closed cleanly): durable.
                    vfs.synced[self.path] = Path(self.path).read_bytes()

    def xWrite(self, data: bytes, offset: int) -> None:
        with self.vfs.lock:
            if self.vfs.dead:
                return
            super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        with self.vfs.lock:
            if self.vfs.dead:
                return
            super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        with self.vfs.lock:
            if self.vfs.dead:
                return
            super().xSync(flags)
            if self.path:
                self.vfs.synced[self.path] = Path(self.path).read_bytes()
                self.vfs.syncs += 1


class _Cursor:
    def __init__(self, connection: apsw.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
        self._rows = iter(rows)
        self.lastrowid = connection.last_insert_rowid()
        self.rowcount = connection.changes()

    def fetchone(self) -> tuple[Any, ...] | None:
        return next(self._rows, None)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._rows


class ApswConnection:
    """The subset of ``sqlite3.Connection`` that edge_agent.buffer uses, over APSW."""

    def __init__(self, path: Path, vfs: str) -> None:
        self._db = apsw.Connection(str(path), vfs=vfs)
        self._db.set_busy_timeout(10_000)

    @classmethod
    def factory(cls, vfs: CrashVFS) -> Any:
        def connect(path: Path) -> sqlite3.Connection:
            return cast(sqlite3.Connection, cls(path, vfs.vfs_name))

        return connect

    @property
    def in_transaction(self) -> bool:
        return bool(self._db.in_transaction)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        cursor = self._db.cursor()
        rows = cursor.execute(sql, params)
        # Run INSERT/UPDATE/DELETE to completion now, as sqlite3 does; keep rows for SELECT and
        # RETURNING.
        materialised = list(rows) if rows is not None else []
        return _Cursor(self._db, materialised)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> _Cursor:
        self._db.cursor().executemany(sql, params)
        return _Cursor(self._db, [])

    def executescript(self, sql: str) -> _Cursor:
        self._db.execute(sql)
        return _Cursor(self._db, [])

    def close(self) -> None:
        self._db.close()
