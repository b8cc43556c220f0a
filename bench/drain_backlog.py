"""bench.drain's backlog, built once with the buffer API and copied for each run, and the
read-only looks at the agent's buffer and the sink's sqlite core queue that tell a drain's end."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from bench.load import payloads

__all__ = ["buffer_empty", "build_backlog", "copy_backlog", "core_count", "read_only"]


async def build_backlog(directory: Path, events: int, topic_names: list[str]) -> float:
    """``events`` events (round robin over the topics) in a fresh buffer; returns seconds."""
    from edge_agent.buffer import Buffer, NewEvent

    bodies = payloads()
    started = time.perf_counter()
    buffer = await Buffer.open(
        directory,
        durability="normal",
        max_events=events + 1,
        max_bytes=2**40,
        commit_linger=0,
        commit_max_events=50_000,
    )
    try:
        now_ms = int(time.time() * 1000)
        for first in range(0, events, 50_000):
            chunk = [
                NewEvent(
                    topic_names[n % len(topic_names)],
                    bodies[n % len(bodies)],
                    1,
                    0,
                    now_ms,
                    None,
                    "reject",
                )
                for n in range(first, min(events, first + 50_000))
            ]
            for outcome in await buffer.append(chunk):
                if not isinstance(outcome, int):
                    raise RuntimeError(f"backlog: {outcome}")
    finally:
        await buffer.aclose()
    return time.perf_counter() - started


def copy_backlog(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("agent.lock", "*.tmp"))


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(
        path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=5
    )


def buffer_empty(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is None


def core_count(db: sqlite3.Connection) -> int:
    """Rows in the core queue (positions are assigned 1, 2, ... and never deleted here)."""
    value = db.execute("SELECT max(position) FROM events").fetchone()[0]
    return int(value or 0)
