"""bench.buffer (a), the accept rate: the agent's Python API (`Agent.publish` from many
concurrent producers, `Agent.publish_many` in batches) vs raw sqlite3 inserting the same rows into
the same schema."""

from __future__ import annotations

import asyncio
import cProfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.buffer_setup import INSERT, TOPICS, Durability, Row, config_text, raw_connection
from bench.report import out
from edge_agent import Agent, parse_config

__all__ = ["MANY_BATCH", "MANY_PRODUCERS", "RateResult", "api_many_rate", "api_rate", "raw_rate"]


@dataclass(frozen=True)
class RateResult:
    events: int
    seconds: float
    commits: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def api_rate(
    directory: Path,
    events: int,
    producers: int,
    bodies: list[bytes],
    durability: Durability,
    profiler: cProfile.Profile | None = None,
    linger: float | None = None,
) -> RateResult:
    config = parse_config(
        config_text(directory, durability=durability, listener=False, linger=linger)
    )
    async with Agent(config) as agent:
        numbers = iter(range(events))

        async def producer() -> None:
            for n in numbers:
                await agent.publish(TOPICS[n % len(TOPICS)], bodies[n % len(bodies)])

        commits_before = agent.buffer.commits
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(producers):
                tasks.create_task(producer())
        seconds = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        commits = agent.buffer.commits - commits_before
        stored = (await agent.buffer.stats()).events
    if stored != events:
        out(f"  WARNING: {stored} events in the buffer after publishing {events}")
    return RateResult(events, seconds, commits)


MANY_PRODUCERS = 10
MANY_BATCH = 100


async def api_many_rate(
    directory: Path, events: int, bodies: list[bytes], durability: Durability
) -> RateResult:
    """(a2): `Agent.publish_many`, `MANY_PRODUCERS` producers each publishing batches of
    `MANY_BATCH` (a producer with many events at once, e.g. a poll of many sensors)."""
    config = parse_config(
        config_text(directory, durability=durability, listener=False, linger=None)
    )
    async with Agent(config) as agent:
        starts = iter(range(0, events, MANY_BATCH))

        async def producer() -> None:
            for start in starts:
                batch = [
                    (TOPICS[n % len(TOPICS)], bodies[n % len(bodies)])
                    for n in range(start, min(start + MANY_BATCH, events))
                ]
                await agent.publish_many(batch)

        commits_before = agent.buffer.commits
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(MANY_PRODUCERS):
                tasks.create_task(producer())
        seconds = time.perf_counter() - start
        commits = agent.buffer.commits - commits_before
        stored = (await agent.buffer.stats()).events
    if stored != events:
        out(f"  WARNING: {stored} events in the buffer after publishing {events}")
    return RateResult(events, seconds, commits)


def raw_rate(path: Path, rows: list[Row], batch: int, durability: Durability) -> RateResult:
    db = raw_connection(path, durability)
    try:
        start = time.perf_counter()
        commits = 0
        for first in range(0, len(rows), batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT, rows[first : first + batch])
            db.execute("COMMIT")
            commits += 1
        seconds = time.perf_counter() - start
        stored = db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()
    if stored != len(rows):
        out(f"  WARNING: {stored} rows in the raw database after inserting {len(rows)}")
    return RateResult(len(rows), seconds, commits)
