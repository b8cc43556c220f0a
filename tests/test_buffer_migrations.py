"""Schema migrations of the SQLite buffer: a schema 1 buffer migrated with its events, dead
letters and seqs (or refused untouched when there is no room for the copy), schema 2 to 3."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.buffer import SCHEMA_VERSION, Buffer, BufferError, read_events
from tests.harness.buffer import event

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    event_time INTEGER NOT NULL,
    expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_drain ON events (priority DESC, seq);
CREATE INDEX events_expiry ON events (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE dead_letters (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    event_time INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at INTEGER NOT NULL
) STRICT;
CREATE TABLE drops (
    reason TEXT NOT NULL,
    topic TEXT NOT NULL,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (reason, topic)
) STRICT;
CREATE TABLE incidents (
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;
INSERT INTO meta VALUES ('epoch', '00112233aabbccdd'), ('created_at', '1700000000000');
PRAGMA user_version = 1;
"""


def _schema_1_buffer(directory: Path, events: int) -> None:
    """A buffer as schema 1 left it: ``events`` undelivered events, the newest one already
    deleted (so only sqlite_sequence knows its seq), one dead letter."""
    directory.mkdir(exist_ok=True)
    db = sqlite3.connect(directory / "buffer.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA_1)
    db.executemany(
        "INSERT INTO events (topic, payload, qos, priority, event_time, expires_at, attempts)"
        " VALUES (?, ?, 1, ?, 1700000000000, ?, ?)",
        [(f"t/{n % 3}", b"old %d" % n, n % 2, None if n % 4 else 1, n % 5) for n in range(events)],
    )
    db.execute(
        "INSERT INTO dead_letters SELECT seq, topic, payload, qos, priority, event_time,"
        " attempts, 'poison', 1700000000000 FROM events WHERE seq = 1"
    )
    db.execute("DELETE FROM events WHERE seq IN (1, ?)", (events,))
    db.close()


async def test_schema_1_buffer_is_migrated_with_its_events_and_seqs(tmp_path: Path) -> None:
    _schema_1_buffer(tmp_path, 50)
    before = [(e.seq, e.topic, e.payload, e.priority, e.attempts) for e in read_events(tmp_path)]
    assert len(before) == 48
    async with await Buffer.open(tmp_path) as buffer:
        assert buffer.epoch == "00112233aabbccdd"
        after = [(e.seq, e.topic, e.payload, e.priority, e.attempts) for e in read_events(tmp_path)]
        assert after == before
        stats = await buffer.stats()
        assert (stats.events, stats.dead_letters, stats.next_seq) == (48, 1, 51)
        assert await buffer.append_one(event()) == 51  # 50 was used, then deleted
        assert await buffer.requeue_dead() == 1
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        assert "AUTOINCREMENT" not in sql
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


async def test_schema_1_buffer_that_cannot_be_migrated_is_refused_untouched(
    tmp_path: Path,
) -> None:
    _schema_1_buffer(tmp_path, 300)
    before = list(read_events(tmp_path))
    db = sqlite3.connect(tmp_path / "buffer.db")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    # The copy needs room for the events table again: with a disk this full it fails.
    with pytest.raises(BufferError, match="schema version 1 and could not be migrated"):
        await Buffer.open(tmp_path, max_page_count=pages + 1)
    assert list(read_events(tmp_path)) == before
    async with await Buffer.open(tmp_path) as buffer:  # with room, it migrates
        assert (await buffer.stats()).events == len(before)


@pytest.mark.parametrize("table", ["without", "with"])
async def test_schema_2_buffer_is_migrated_to_3(tmp_path: Path, table: str) -> None:
    """Schema 3 adds the ``suspects`` table. A schema 3 file whose header says 2 (``with`` the
    table: a flipped byte) migrates to itself instead of failing on every start."""
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.append([event(b"%d" % n) for n in range(20)])
    db = sqlite3.connect(tmp_path / "buffer.db", isolation_level=None)
    if table == "without":
        db.execute("DROP TABLE suspects")
    db.execute("PRAGMA user_version = 2")
    db.close()
    async with await Buffer.open(tmp_path) as buffer:
        await buffer.record_losses(3, 1)
        third = [e for e in read_events(tmp_path) if e.seq == 3]
        assert await buffer.suspects(10) == (third, {3: 1})
        stats = await buffer.stats()
        assert (stats.events, stats.incidents) == (20, [])
    db = sqlite3.connect(tmp_path / "buffer.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    finally:
        db.close()
