"""What bench.buffer's runs share: the agent's config, an empty database with the buffer's own
schema, a plain sqlite3 connection with the buffer's PRAGMAs, and the rows the buffer writes."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Literal

from bench.load import topics
from edge_agent.buffer import DB_NAME, Buffer

__all__ = [
    "INSERT",
    "TOPICS",
    "Durability",
    "Row",
    "config_text",
    "fresh_database",
    "make_rows",
    "raw_connection",
    "row",
]

TOPICS = topics(16)
INSERT = (
    "INSERT INTO events (topic, payload, qos, priority, event_time, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
Durability = Literal["full", "normal"]
Row = tuple[str, bytes, int, int, int, None]


def config_text(
    data_dir: Path, *, durability: Durability, listener: bool, linger: float | None
) -> str:
    """The agent's TOML: one catch-all rule (QoS 1, priority 0, no TTL); ``linger`` None keeps
    the agent's default ``commit_linger``."""
    listener_section = "port = 0\nmax_inflight = 256\n" if listener else "enabled = false\n"
    linger_line = "" if linger is None else f"commit_linger = {linger!r}\n"
    return (
        f'[agent]\ndevice_id = "bench-1"\ndata_dir = {json.dumps(str(data_dir))}\n\n'
        f'[buffer]\ndurability = "{durability}"\n{linger_line}\n'
        f"[listener]\n{listener_section}\n"
        '[[topics]]\nfilter = "#"\nqos = 1\n'
    )


async def fresh_database(directory: Path) -> Path:
    """Create an empty buffer database with the agent's own schema; return its path."""
    buffer = await Buffer.open(directory)
    await buffer.aclose()
    return directory / DB_NAME


def raw_connection(path: Path, durability: Durability) -> sqlite3.Connection:
    """A plain connection with the buffer's PRAGMAs (WAL, synchronous FULL/NORMAL)."""
    db = sqlite3.connect(path, isolation_level=None)
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"journal_mode is {mode!r}, not wal")
    db.execute("PRAGMA synchronous=FULL" if durability == "full" else "PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=OFF")
    return db


def make_rows(events: int, bodies: list[bytes]) -> list[Row]:
    """The rows the buffer writes for these events (catch-all rule: qos 1, priority 0, no TTL)."""
    now_ms = int(time.time() * 1000)
    return [row(n, bodies, now_ms) for n in range(events)]


def row(n: int, bodies: list[bytes], now_ms: int) -> Row:
    return (TOPICS[n % len(TOPICS)], bodies[n % len(bodies)], 1, 0, now_ms, None)
