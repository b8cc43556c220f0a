"""The buffer's database file, on the buffer's own thread: the directory lock, opening it (after
the checks of `edge_agent.buffer.checks`; a corrupt file quarantined, a damaged WAL's loss
recorded), migration, transactions and the totals kept beside them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from edge_agent.buffer.checks import (
    _check,
    _count_what_we_can,
    _Damaged,
    _is_damage,
    _left_in_place,
    _wal_commits,
    _wal_loss,
)
from edge_agent.buffer.model import (
    _EVENTS,
    _SCHEMA,
    _SUSPECTS,
    CACHE_KIB,
    DB_NAME,
    LOCK_NAME,
    PAGE_SIZE,
    SCHEMA_VERSION,
    STATE_NAME,
    BufferError,
    BufferLocked,
    T,
    _Totals,
)
from mqtt_ingest.clock import Clock
from mqtt_ingest.disk import fsync_directory

log = logging.getLogger("edge_agent.buffer")

LOCK_PATIENCE = 1.0  # seconds a starting agent waits for a held lock (see `_lock`)


WAL_SIZE_LIMIT = 4 * 1024**2
"""Bytes the WAL file is truncated to after a checkpoint that found it larger."""
DISK_FULL = ("database or disk is full", "disk i/o error")
"""How SQLite's errors start when it found no room to write (a full disk, ``RLIMIT_FSIZE``,
``max_page_count``); lower case."""


def agent_pid(directory: Path) -> int | None:
    """The pid of the agent holding ``directory``, or None if no agent runs there (-1: one
    does, its pid unreadable)."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    else:
        return None
    finally:
        os.close(fd)


def _open_lock_file(directory: Path) -> int:
    if directory.exists() and not directory.is_dir():
        raise BufferError(f"data_dir {directory} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise BufferError(f"cannot use data_dir {directory}: {exc.strerror or exc}") from None


async def _lock(directory: Path, patience: float = LOCK_PATIENCE) -> int:
    """Take ``directory``'s lock, or raise `BufferLocked` naming the holder's pid.

    A held lock is tried again for ``patience`` seconds: `agent_pid` (``status``, ``publish``,
    ``doctor``) holds it shared for an instant, and an agent starting in that instant must not
    take the probe for another agent.
    """
    fd = _open_lock_file(directory)
    deadline = time.monotonic() + patience
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise BufferLocked(
                        f"another edge-agent (pid {holder}) is using {directory}; "
                        "only one agent may use a data directory"
                    ) from None
            await asyncio.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)


def _open_checked(
    directory: Path,
    durability: Literal["full", "normal"],
    max_page_count: int | None,
    clock: Clock,
    connect: Callable[[Path], sqlite3.Connection],
    load: Callable[[sqlite3.Connection], T],
) -> tuple[sqlite3.Connection, T]:
    """Check the database (quarantine, repair, losses of the last run), open it (create,
    migrate) and ``load`` what the `Buffer` keeps in memory (its first reads).

    Content damaged in a way no check saw and that makes ``load`` fail (`_is_damage`: a topic
    that is not UTF-8, a ``meta`` value that is not a number) is quarantined like a failed
    check, and a fresh database opened: otherwise every start failed the same way (systemd
    restarting the agent for ever). On success the state file says "open"."""
    path = directory / DB_NAME
    state = directory / STATE_NAME
    now_ms = int(clock.time() * 1000)
    incidents: list[tuple[str, str]] = []
    # "open" (or "open normal": commits not synced) while an agent has it, "closed" after.
    previous = state.read_text().split() if state.exists() else []
    unclean = previous[:1] == ["open"]
    # Before _check: its connection, the last to close, may checkpoint and remove the WAL.
    wal_present = (directory / f"{DB_NAME}-wal").exists()
    wal_commits = _wal_commits(directory / f"{DB_NAME}-wal") if unclean and wal_present else []
    if state.exists() and (not path.exists() or path.stat().st_size == 0):
        # An agent had a database here (the state file says so), and an empty or missing file
        # would open as a fresh, empty database: its events gone without a word.
        what = "missing" if not path.exists() else "empty (0 bytes)"
        moved = _quarantine(directory, now_ms) if _any_file(directory) else None
        detail = f"the database file was {what}" + (f"; moved to {moved}" if moved else "")
        detail += "; the events it held, if any, are lost"
        log.error("buffer: %s", detail)
        incidents.append(("corrupt", detail))
    elif path.exists():
        checked = _check(path)
        if checked.problem is not None:
            incidents.append(_quarantined(directory, now_ms, checked.problem))
        else:
            if checked.repaired is not None:
                log.warning("buffer: %s", checked.repaired)
                incidents.append(("reindexed", checked.repaired))
            if unclean and not wal_present:
                detail = (
                    "the -wal file was missing after an unclean stop: recent commits may be lost"
                )
                log.error("buffer: %s", detail)
                incidents.append(("wal-missing", detail))
            elif (
                lost := _wal_loss(wal_commits, checked.wal_frames, synced=previous == ["open"])
            ) is not None:
                kind, detail = lost
                log.log(
                    logging.WARNING if kind == "wal-torn" else logging.ERROR, "buffer: %s", detail
                )
                incidents.append(lost)
    try:
        db, loaded = _open_loaded(connect, path, durability, max_page_count, now_ms, unclean,
                                  incidents, load)  # fmt: skip
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise _left_in_place(path, exc) from None  # it was a raw traceback (exit 1)
        incidents.append(_quarantined(directory, now_ms, f"its first reads failed: {exc}"))
        # A fresh database: this fails only for a cause that is not damage.
        try:
            db, loaded = _open_loaded(connect, path, durability, max_page_count, now_ms,
                                      unclean, incidents, load)  # fmt: skip
        except sqlite3.DatabaseError as again:
            raise _left_in_place(path, again) from None
    _write_state(state, "open" if durability == "full" else "open normal")
    return db, loaded


def _quarantined(directory: Path, now_ms: int, problem: str) -> tuple[str, str]:
    """Move the database aside after ``problem``; the incident saying what was in it."""
    counted = _count_what_we_can(directory / DB_NAME)
    moved = _quarantine(directory, now_ms)
    detail = f"{problem}; moved to {moved}; {counted}"
    log.error("buffer: corrupt database quarantined: %s", detail)
    return "corrupt", detail


def _open_loaded(
    connect: Callable[[Path], sqlite3.Connection],
    path: Path,
    durability: Literal["full", "normal"],
    max_page_count: int | None,
    now_ms: int,
    unclean: bool,
    incidents: list[tuple[str, str]],
    load: Callable[[sqlite3.Connection], T],
) -> tuple[sqlite3.Connection, T]:
    """Connect, set the pragmas, create or migrate the schema, jump the seqs after an unclean
    stop, record ``incidents`` and ``load``; the connection is closed if any of it fails (a
    second open in this process must not find the database locked)."""
    db = connect(path)
    try:
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op unless the database is new
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys=OFF")
        # Zero deleted rows only where the page is written anyway: Debian's SQLite defaults to ON,
        # which also rewrites every page the drain's deletes free (about 0.7 us of the buffer
        # thread's ~9 per drained event, docs/benchmarks.md). A freed page may keep old payload
        # bytes until it is reused, which a buffer that keeps taking events does soon.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # The WAL is checkpointed at about 1 MiB (1000 pages of 1 KiB) but may grow past that while
        # a reader holds a snapshot; then it is cut back to this size, not kept at its largest.
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if max_page_count is not None:
            db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            epoch = secrets.token_hex(8)  # hex: safe to write into the script
            db.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}"  # noqa: S608  # only constants, a hex epoch and an int
                f"INSERT INTO meta VALUES ('epoch', '{epoch}'), ('created_at', '{now_ms}');"
                f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
            log.info("buffer: created %s (epoch %s)", path, epoch)
        elif version > SCHEMA_VERSION:
            raise BufferError(
                f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}: "
                "upgrade the agent"
            )
        else:
            if version == 1:
                _migrate_from_1(db, path)
            if version <= 2:
                _migrate_from_2(db, path)
            if unclean:
                _skip_seqs(db, durability)
        for kind, detail in incidents:
            db.execute("INSERT INTO incidents VALUES (?, ?, ?)", (now_ms, kind, detail))
        return db, load(db)
    except BaseException:
        db.close()
        raise


SEQ_GAP = 1 << 32
"""How far the seqs jump after an unclean stop that may have rolled back commits."""


def _skip_seqs(db: sqlite3.Connection, durability: Literal["full", "normal"]) -> None:
    """After an unclean stop the last commits may have rolled back: with ``normal`` durability
    a power loss does that, and with any durability a missing WAL or a damaged WAL frame (SQLite's
    recovery silently drops the frames from the first one whose checksum fails, acknowledged
    commits with them). Nothing tells all of those from a kill -9 that lost nothing. The seqs
    the lost commits gave out may be at the sink already, under this epoch: given again to new
    events, the sink would drop those as duplicates (silently: an event id is what dedupes). So
    after every unclean stop the next seq is `SEQ_GAP` past the highest one kept, and that is
    synced before any event is taken (a second power loss must not roll it back)."""
    _, newest = _seq_marks(db)
    db.execute("PRAGMA synchronous=FULL")
    try:
        with _transaction(db):
            _set_meta(db, "high_water", newest + SEQ_GAP)
    finally:
        db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    log.warning(
        "buffer: after an unclean stop (its last commits may have rolled back), seqs go on from %d"
        " (not %d): those the lost commits gave out may be known at the sink",
        newest + SEQ_GAP + 1,
        newest + 1,
    )


def _migrate_from_1(db: sqlite3.Connection, path: Path) -> None:
    """Schema 1 -> 2: copy ``events`` into a table without AUTOINCREMENT and record the highest
    seq ever used as ``meta.high_water``. The copy needs the table's size again on disk."""
    with _migrating(db, path, 1):
        high_water = db.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
            " coalesce((SELECT max(seq) FROM events), 0),"
            " coalesce((SELECT max(seq) FROM dead_letters), 0))"
        ).fetchone()[0]
        db.execute("ALTER TABLE events RENAME TO events_1")
        db.execute("DROP INDEX events_drain")
        db.execute("DROP INDEX events_expiry")
        for statement in _EVENTS.split(";"):
            if statement.strip():
                db.execute(statement)
        copied = db.execute(
            "INSERT INTO events (seq, topic, payload, qos, priority, event_time, expires_at,"
            " attempts) SELECT seq, topic, payload, qos, priority, event_time, expires_at,"
            " attempts FROM events_1"
        ).rowcount
        db.execute("DROP TABLE events_1")
        db.execute("DELETE FROM sqlite_sequence")
        _set_meta(db, "high_water", high_water)
    log.warning(
        "buffer: migrated %s from schema 1 to 2 (%d events kept, last seq %d)",
        path,
        copied,
        high_water,
    )


def _migrate_from_2(db: sqlite3.Connection, path: Path) -> None:
    """Schema 2 -> 3: the ``suspects`` table. ``IF NOT EXISTS``: a schema 3 file whose header
    says 2 (a flipped byte) migrates to itself instead of failing each start."""
    with _migrating(db, path, 2):
        db.execute(_SUSPECTS)
    log.info("buffer: migrated %s from schema 2 to 3", path)


@contextlib.contextmanager
def _migrating(db: sqlite3.Connection, path: Path, version: int) -> Iterator[None]:
    """One migration step, ``version`` -> ``version`` + 1, in one transaction: a failure (a full
    disk) leaves the file as the step found it, and the agent refuses to start, saying why."""
    try:
        with _transaction(db):
            yield
            db.execute(f"PRAGMA user_version={version + 1}")
    except sqlite3.Error as exc:
        db.close()
        raise BufferError(
            f"{path} has schema version {version} and could not be migrated to {version + 1}"
            f" ({exc}); nothing was changed: its events are still there"
        ) from None


def _set_meta(db: sqlite3.Connection, key: str, value: object) -> None:
    db.execute(
        "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def _any_file(directory: Path) -> bool:
    return any((directory / f"{DB_NAME}{suffix}").exists() for suffix in ("", "-wal", "-shm"))


def _quarantine(directory: Path, now_ms: int) -> Path:
    target = directory / "quarantine"
    target.mkdir(exist_ok=True)
    stamp = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    base = target / f"buffer-{stamp}.db"
    # A name no earlier quarantine took (a clock stuck or set back gives the same stamp): the
    # lock keeps other agents out, and os.replace would silently overwrite the earlier files.
    number = 1
    while any(Path(f"{base}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        number += 1
        base = target / f"buffer-{stamp}-{number}.db"
    for suffix in ("", "-wal", "-shm"):
        source = directory / f"{DB_NAME}{suffix}"
        if source.exists():
            os.replace(source, f"{base}{suffix}")
    fsync_directory(directory)
    fsync_directory(target)
    return base


def _write_state(path: Path, value: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def _close_cleanly(db: sqlite3.Connection, directory: Path) -> None:
    """Checkpoint the WAL into the database and mark the state file closed. On a full disk (or
    an I/O error) the checkpoint cannot write the database: the WAL stays, with every commit in
    it, for the next open to replay, and the state stays "open" (a WAL is expected there)."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError as exc:
        if not str(exc).lower().startswith(DISK_FULL):
            raise
        log.warning("buffer: closed without a checkpoint (%s); the WAL keeps its commits", exc)
        return
    finally:
        db.close()
    _write_state(directory / STATE_NAME, "closed")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, totals: _Totals | None = None) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back if anything (even cancellation) escapes; then
    ``totals`` are restored to what they were at BEGIN."""
    saved = dataclasses.replace(totals) if totals is not None else None
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if totals is not None and saved is not None:
            totals.restore(saved)
        raise


def _load_epoch(db: sqlite3.Connection) -> str:
    """The database's epoch; `_Damaged` if its row is gone or its value is not what the buffer
    writes, 16 lowercase hex digits (quick_check does not see a flipped byte: a non-hex digit
    stopped every batch envelope, at every connection; an uppercase one made the agent's event
    ids differ from the sink's, which reads the epoch back from the envelope's bytes)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    if row is None:
        raise _Damaged("meta has no epoch")
    epoch = row[0]
    if not isinstance(epoch, str) or _EPOCH.fullmatch(epoch) is None:
        raise _Damaged(f"meta.epoch is not 16 lowercase hex digits: {str(epoch)[:40]!r}")
    return epoch


_EPOCH = re.compile(r"[0-9a-f]{16}")


def _load_totals(db: sqlite3.Connection, totals: _Totals) -> None:
    totals.events, totals.bytes = db.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
    ).fetchone()
    totals.dead_events, totals.dead_bytes = db.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM dead_letters"
    ).fetchone()
    totals.high_water, totals.last_seq = _seq_marks(db)
    totals.nothing_at_or_below = -1


def _seq_marks(db: sqlite3.Connection) -> tuple[int, int]:
    """(``meta.high_water``, the highest seq ever committed)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'high_water'").fetchone()
    try:
        high_water = int(row[0]) if row else 0
    except ValueError:
        raise _Damaged(f"meta.high_water is not a number: {row[0]!r}") from None
    newest = db.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
        " coalesce((SELECT max(seq) FROM dead_letters), 0))"
    ).fetchone()[0]
    return high_water, max(high_water, newest)


def _keep_high_water(db: sqlite3.Connection, totals: _Totals) -> None:
    """End every transaction that deletes events or dead letters with this.

    The next seq after a restart is one more than the highest of ``meta.high_water`` and the seqs
    still stored, so when a delete removes the newest seq, ``high_water`` must hold it. Only such
    a delete writes it (the drain catching up with the newest events), never an insert.
    """
    if totals.high_water >= totals.last_seq:
        return
    _, newest = _seq_marks(db)
    if newest < totals.last_seq:
        _set_meta(db, "high_water", totals.last_seq)
        totals.high_water = totals.last_seq
