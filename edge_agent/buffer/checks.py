"""What the buffer's open checks of its database file find (on the buffer's own thread):
``PRAGMA integrity_check`` and ``REINDEX`` of index-only damage, the schema against its tables,
the commits a damaged WAL lost, which errors mean damaged content, and what a quarantined file
held."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import struct
from pathlib import Path

from edge_agent.buffer.model import BufferError


class _Damaged(sqlite3.DatabaseError):
    """Content that no SQLite check sees as damage but that the buffer never writes (a ``meta``
    value that is not a number)."""


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc``, raised by a read, means the content is damaged (and not a full disk, a
    permission, a lock: causes that go away, with the database still good)."""
    if isinstance(exc, _Damaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPTION
    # Raised by Python's sqlite3 itself, reading a TEXT value (a topic with a flipped high
    # bit) that is not UTF-8: quick_check and integrity_check do not look at encodings.
    return str(exc).startswith("Could not decode to UTF-8")


@dataclasses.dataclass
class _Checked:
    problem: str | None = None
    """Why the database must be quarantined, or None."""
    repaired: str | None = None
    """What was repaired (rebuilt indexes), or None."""
    wal_frames: int | None = None
    """The WAL frames SQLite's recovery kept (None: not known)."""


def _check(path: Path) -> _Checked:
    """``PRAGMA integrity_check``, and what quick_check does not see: the schema version
    against the tables. Index entries that do not match their table (which quick_check does
    not compare: the drain read a wrong row, or failed at every read) are rebuilt (REINDEX,
    nothing lost) when the tables themselves are sound."""
    checked = _Checked()
    try:
        # Read-write (we hold the lock): SQLite can then recover a stale -shm after a crash.
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            checked.wal_frames = _wal_frames_kept(db)
            result = _integrity(db, "integrity_check")
            if result is not None:
                if _integrity(db, "quick_check") is not None:
                    checked.problem = "integrity_check: " + result
                    return checked
                # The pages and tables are sound: only indexes differ from their tables.
                try:
                    db.execute("REINDEX")
                except sqlite3.IntegrityError as exc:
                    # A row changed in its table can now equal another in a UNIQUE key: the
                    # index cannot be rebuilt, and the content is damaged all the same. (Any
                    # other error goes to the handler below: a full disk or a lock leaves a
                    # repairable database in place, not quarantined.)
                    checked.problem = f"integrity_check: {result}; REINDEX failed: {exc}"
                    return checked
                again = _integrity(db, "integrity_check")
                if again is not None:
                    checked.problem = f"integrity_check: {result}; after REINDEX: {again}"
                    return checked
                checked.repaired = f"indexes rebuilt (REINDEX), no event lost: {result}"
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and tables:
                # The schema is made and its version set in one transaction: a header saying
                # 0 over tables is damage, and creating the schema again would fail (for ever).
                checked.problem = (
                    f"schema version 0 but it holds tables ({', '.join(sorted(tables)[:5])})"
                )
                return checked
            missing = _TABLES.get(version, frozenset()) - tables
            if missing:
                checked.problem = (
                    f"schema version {version} without its tables {', '.join(sorted(missing))}"
                )
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            # A full disk (no room for the -shm file), a lock, a permission: the database may be
            # perfectly good, and moving it aside would lose it. Refuse to start instead.
            raise _left_in_place(path, exc) from None
        checked.problem = f"cannot read the database: {exc}"
    return checked


def _left_in_place(path: Path, exc: sqlite3.DatabaseError) -> BufferError:
    """The refusal to start for an error that is not damage (`_is_damage`)."""
    return BufferError(
        f"cannot open the buffer {path}: {exc} ({getattr(exc, 'sqlite_errorname', '?')});"
        " it is not known to be corrupt and was left in place"
    )


def _integrity(db: sqlite3.Connection, pragma: str) -> str | None:
    """What ``PRAGMA {pragma}`` found wrong (its first 5 lines), or None."""
    result = db.execute(f"PRAGMA {pragma}").fetchall()
    return None if result == [("ok",)] else "; ".join(str(r[0]) for r in result[:5])


def _wal_frames_kept(db: sqlite3.Connection) -> int | None:
    """How many frames of the WAL SQLite's recovery kept (a passive checkpoint's "log" count,
    read by the first connection: the close of the last one would checkpoint anyway); None if
    the checkpoint could not run (a full disk: then `_check` says why)."""
    try:
        row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.OperationalError:
        return None
    return None if row is None or row[1] < 0 else int(row[1])


_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def _wal_commits(wal: Path) -> list[int]:
    """The frames (numbered from 1) of ``wal`` that end a commit and belong to the WAL's
    current generation (its salts), read from the frame headers alone: SQLite's recovery keeps
    the frames up to the first whose checksum fails, and drops the rest without a word."""
    try:
        with wal.open("rb") as file:
            header = file.read(_WAL_HEADER)
            if len(header) < _WAL_HEADER:
                return []
            magic, _, page_size = struct.unpack(">III", header[:12])
            salts = header[16:24]
            if magic not in _WAL_MAGIC or not 512 <= page_size <= 65536:
                return []
            commits, frame = [], 0
            while len(head := file.read(_WAL_FRAME_HEADER)) == _WAL_FRAME_HEADER:
                frame += 1
                if head[8:16] == salts and head[4:8] != b"\0\0\0\0":
                    commits.append(frame)
                file.seek(page_size, os.SEEK_CUR)
            return commits
    except OSError:
        return []


def _wal_loss(commits: list[int], kept: int | None, *, synced: bool) -> tuple[str, str] | None:
    """The incident (kind, detail) if recovery dropped commits of the WAL (`_wal_commits`).

    ``synced``: the last run had durability ``full``, so a commit was acknowledged only once
    fsynced, and commits were written one after the other. A power loss then cuts at most the
    last commit, in the middle of its write or its fsync: its events were never acknowledged
    (``wal-torn``; a producer that got no ack sends again). More commits dropped, or any with
    ``normal`` (acknowledged before they are synced), lost acknowledged events (``wal-damaged``).
    """
    if kept is None:
        return None
    lost = [frame for frame in commits if frame > kept]
    if not lost:
        return None
    frames = f"frame {kept + 1}" if lost[-1] == kept + 1 else f"frames {kept + 1} to {lost[-1]}"
    if synced and len(lost) == 1:
        return "wal-torn", (
            f"the last commit in the -wal file ({frames}) did not survive"
            " the unclean stop and SQLite's recovery dropped it: with durability full, a commit"
            " cut before its fsync completed, whose events had not been acknowledged (their"
            " producers send them again); its seqs are not given again"
        )
    why = (
        "durability full: all but the last had been synced and acknowledged"
        if synced
        else "durability normal: commits are acknowledged before they are synced"
    )
    return "wal-damaged", (
        f"the -wal file was damaged after an unclean stop: SQLite's recovery kept its first {kept}"
        f" frames and dropped the {len(lost)} commit{'s' if len(lost) > 1 else ''} after them"
        f" ({frames}): their events are lost ({why}); their seqs are not given again"
    )


_TABLES = {
    1: frozenset({"events", "meta", "dead_letters", "sqlite_sequence"}),
    2: frozenset({"events", "meta", "dead_letters", "drops", "incidents"}),
    3: frozenset({"events", "meta", "dead_letters", "drops", "incidents", "suspects"}),
}
"""Tables each known schema version has (what the migrations and the agent use)."""


_CORRUPTION = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
"""The primary result codes that mean the file itself is damaged (or not a database)."""


def _count_what_we_can(path: Path) -> str:
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
    except sqlite3.DatabaseError as exc:
        return f"its events could not be counted ({exc})"
    try:
        try:
            count, size = db.execute(
                "SELECT count(*), total(length(payload)) FROM events"
            ).fetchone()
            return f"about {count} events ({int(size)} payload bytes) were in it"
        except sqlite3.DatabaseError as exc:
            why = exc
        try:
            # A count reads every page; the seq range only the two ends of the key's b-tree,
            # which a damaged page in between does not stop.
            # (min and max in one query scan the whole table.)
            low = db.execute("SELECT min(seq) FROM events").fetchone()[0]
            high = db.execute("SELECT max(seq) FROM events").fetchone()[0]
        except sqlite3.DatabaseError:
            return f"its events could not be counted ({why})"
        if low is None:
            return f"its events could not be counted ({why}); the table reads as empty"
        return (
            f"its events could not be counted ({why}); their seqs ran from {low} to {high}"
            f" (at most {high - low + 1} events)"
        )
    finally:
        db.close()
