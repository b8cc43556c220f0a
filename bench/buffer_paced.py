"""bench.buffer (c) and (d): events accepted at a paced rate with ``durability = "full"``, the
disk bytes written per event and each call's latency, through the API or a naive loop (one
INSERT + COMMIT per event)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from bench.buffer_setup import INSERT, TOPICS, config_text, raw_connection, row
from bench.procfs import proc_io
from edge_agent import Agent, parse_config

__all__ = ["PacedResult", "paced_api", "paced_naive"]


@dataclass(frozen=True)
class PacedResult:
    events: int
    seconds: float
    commits: int
    write_bytes: int
    wchar: int
    latencies: list[float]  # seconds, ascending

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def paced_api(
    directory: Path,
    rate: float,
    seconds: float,
    warmup: float,
    bodies: list[bytes],
    linger: float | None = None,
) -> PacedResult:
    """Publish one event every 1/rate s, each in its own task; measure after ``warmup`` s."""
    config = parse_config(config_text(directory, durability="full", listener=False, linger=linger))
    total = int((warmup + seconds) * rate)
    measured_from = int(warmup * rate)
    latencies: list[float] = []
    async with Agent(config) as agent:

        async def one(n: int) -> None:
            called = time.perf_counter()
            await agent.publish(TOPICS[n % len(TOPICS)], bodies[n % len(bodies)])
            if n >= measured_from:
                latencies.append(time.perf_counter() - called)

        tasks: set[asyncio.Task[None]] = set()
        io_start = proc_io()
        commits_start = agent.buffer.commits
        window_start = time.perf_counter()
        start = time.perf_counter()
        for n in range(total):
            if n == measured_from:
                io_start = proc_io()
                commits_start = agent.buffer.commits
                window_start = time.perf_counter()
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*tasks)
        window = time.perf_counter() - window_start
        io_end = proc_io()
        commits = agent.buffer.commits - commits_start
    return PacedResult(
        events=total - measured_from,
        seconds=window,
        commits=commits,
        write_bytes=io_end["write_bytes"] - io_start["write_bytes"],
        wchar=io_end["wchar"] - io_start["wchar"],
        latencies=sorted(latencies),
    )


def paced_naive(
    path: Path, rate: float, seconds: float, warmup: float, bodies: list[bytes]
) -> PacedResult:
    """One INSERT + COMMIT per event (synchronous=FULL), paced the same way."""
    db = raw_connection(path, "full")
    total = int((warmup + seconds) * rate)
    measured_from = int(warmup * rate)
    latencies: list[float] = []
    try:
        io_start = proc_io()
        window_start = start = time.perf_counter()
        for n in range(total):
            if n == measured_from:
                io_start = proc_io()
                window_start = time.perf_counter()
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            called = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute(INSERT, row(n, bodies, int(time.time() * 1000)))
            db.execute("COMMIT")
            if n >= measured_from:
                latencies.append(time.perf_counter() - called)
        window = time.perf_counter() - window_start
        io_end = proc_io()
    finally:
        db.close()
    return PacedResult(
        events=total - measured_from,
        seconds=window,
        commits=total - measured_from,
        write_bytes=io_end["write_bytes"] - io_start["write_bytes"],
        wchar=io_end["wchar"] - io_start["wchar"],
        latencies=sorted(latencies),
    )
