"""Benchmark of the agent's accept path (the SQLite buffer), side by side with references.

    python -m bench.buffer [--runs 3] [--events 30000] [--seconds 5] ...

In one run, with 200-byte payloads, data directories in a temporary directory (removed at the
end):

(a) accept rate through the Python API (``Agent.publish``) with many concurrent producers, vs raw
    ``sqlite3`` inserting the same rows into the same schema (WAL, ``synchronous=FULL``) in
    batches of 1000 per transaction; alternating, ``--runs`` times, medians compared.
(b) accept rate through the local MQTT listener: the agent runs here, QoS 1 publishers in a
    subprocess (raw sockets, pipelined PUBLISH with a bounded in-flight window per connection).
(c) disk bytes written per event (``/proc/self/io`` ``write_bytes``: bytes this process caused to
    be sent to the block layer) while events are accepted at a paced 1,000 events/s with
    ``durability = "full"``, vs a naive loop (one INSERT + COMMIT per event, same schema and
    PRAGMAs, same pacing).
(d) p50/p99/max accept latency (call to return of ``Agent.publish``) in the same paced run.

Figures are printed, never asserted: a missed goal is reported as missed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.child import answer, run_child
from bench.load import PAYLOAD_BYTES, payloads, topics
from bench.report import out, percentile, print_profile, scratch, table, yes
from bench.wire import DISCONNECT, connect_packet, length, utf8
from edge_agent import Agent, parse_config
from edge_agent.buffer import DB_NAME, Buffer
from edge_agent.config import BufferConfig

TOPICS = topics(16)
INSERT = (
    "INSERT INTO events (topic, payload, qos, priority, event_time, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
Durability = Literal["full", "normal"]
Row = tuple[str, bytes, int, int, int, None]

# Goals of the spec.
GOAL_API_RATIO = 0.5
GOAL_BYTES_PER_EVENT = 1000
GOAL_BYTES_RATIO = 0.2
GOAL_P99_MS = 10.0


def proc_io() -> dict[str, int]:
    """This process's I/O counters (all threads)."""
    counters: dict[str, int] = {}
    with open("/proc/self/io") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            counters[key.strip()] = int(value)
    return counters


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


# -- (a) accept rate: Python API vs raw sqlite3 --------------------------------------------------


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


def make_rows(events: int, bodies: list[bytes]) -> list[Row]:
    """The rows the buffer writes for these events (catch-all rule: qos 1, priority 0, no TTL)."""
    now_ms = int(time.time() * 1000)
    return [row(n, bodies, now_ms) for n in range(events)]


def row(n: int, bodies: list[bytes], now_ms: int) -> Row:
    return (TOPICS[n % len(TOPICS)], bodies[n % len(bodies)], 1, 0, now_ms, None)


# -- (b) accept rate through the local listener ---------------------------------------------------


class _Publisher(asyncio.Protocol):
    """One MQTT connection sending ``total`` QoS 1 PUBLISH packets, ``window`` unacknowledged."""

    def __init__(self, client_id: str, total: int, window: int, bodies: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        self.client_id = client_id
        self.total = total
        self.window = window
        self.bodies = bodies
        self.connected: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[float] = loop.create_future()
        self.sent = 0
        self.acked = 0
        self.started = False
        self._data = bytearray()
        self._transport: asyncio.Transport | None = None
        topic = utf8(f"sensors/{client_id}/temperature")
        self._headers = [
            bytes([0x32]) + length(len(topic) + 2 + len(body)) + topic for body in bodies
        ]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(connect_packet(self.client_id))

    def start(self) -> None:
        self.started = True
        self._top_up()

    def _top_up(self) -> None:
        assert self._transport is not None
        limit = min(self.total, self.acked + self.window)
        if self.sent >= limit:
            return
        chunks = []
        headers, bodies = self._headers, self.bodies
        for n in range(self.sent, limit):
            index = n % len(bodies)
            chunks.append(headers[index] + (n % 65535 + 1).to_bytes(2, "big") + bodies[index])
        self.sent = limit
        self._transport.write(b"".join(chunks))

    def data_received(self, data: bytes) -> None:
        self._data += data
        buffered = self._data
        position = 0
        # The server only sends CONNACK and PUBACK here: 4 bytes each.
        while len(buffered) - position >= 4:
            kind, length = buffered[position], buffered[position + 1]
            if length != 2 or kind not in (0x20, 0x40):
                self._fail(f"unexpected packet {bytes(buffered[position : position + 4])!r}")
                return
            if kind == 0x20:
                if buffered[position + 3] != 0:
                    self._fail(f"CONNACK refused (code {buffered[position + 3]})")
                    return
                self.connected.set_result(None)
            else:
                self.acked += 1
            position += 4
        del buffered[:position]
        if self.acked >= self.total and not self.finished.done():
            assert self._transport is not None
            self.finished.set_result(time.perf_counter())
            self._transport.write(DISCONNECT)
            self._transport.close()
        elif self.started:
            self._top_up()

    def _fail(self, why: str) -> None:
        for future in (self.connected, self.finished):
            if not future.done():
                future.set_exception(ConnectionError(why))
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost after {self.acked} acks: {exc!r}")


async def publish_over_mqtt(
    port: int, events: int, connections: int, window: int
) -> dict[str, float]:
    """The publisher side of (b); runs in its own process (``python -m bench.buffer _publish``)."""
    loop = asyncio.get_running_loop()
    bodies = payloads()
    share = [events // connections + (n < events % connections) for n in range(connections)]
    publishers = [
        _Publisher(f"bench-pub-{n}", share[n], window, bodies) for n in range(connections)
    ]
    for publisher in publishers:
        await loop.create_connection(lambda p=publisher: p, "127.0.0.1", port)  # type: ignore[misc]
    await asyncio.gather(*(p.connected for p in publishers))
    start = time.perf_counter()
    for publisher in publishers:
        publisher.start()
    ends = await asyncio.gather(*(p.finished for p in publishers))
    return {"events": sum(p.acked for p in publishers), "seconds": max(ends) - start}


async def listener_rate(
    directory: Path,
    events: int,
    connections: int,
    window: int,
    durability: Durability,
    linger: float | None = None,
) -> RateResult:
    config = parse_config(
        config_text(directory, durability=durability, listener=True, linger=linger)
    )
    async with Agent(config) as agent:
        port = agent.listener_port
        assert port is not None
        commits_before = agent.buffer.commits
        result = await run_child(
            "the publisher process", "bench.buffer", "_publish",
            str(port), str(events), str(connections), str(window),
        )  # fmt: skip
        commits = agent.buffer.commits - commits_before
        stored = (await agent.buffer.stats()).events
    if stored != events or result["events"] != events:
        out(f"  WARNING: {result['events']} acked, {stored} stored, {events} published")
    return RateResult(int(result["events"]), float(result["seconds"]), commits)


# -- (c) + (d): paced at --rate events/s ----------------------------------------------------------


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


# -- the run --------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


async def run(args: argparse.Namespace, root: Path) -> None:
    bodies = payloads()
    durability: Durability = args.durability
    out(
        f"bench.buffer: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, data in {root}, {PAYLOAD_BYTES}-byte payloads"
    )
    defaults = BufferConfig()
    linger = defaults.commit_linger if args.commit_linger is None else args.commit_linger
    out(
        f"agent buffer: commit_linger {linger * 1000:g} ms"
        f"{' (default)' if args.commit_linger is None else ''}, "
        f"commit_max_events {defaults.commit_max_events}"
    )

    # (a)
    out(
        f"\n(a) accept rate, durability={durability}: Python API with {args.producers} concurrent "
        f"producers vs raw sqlite3 executemany in batches of {args.batch}; "
        f"{args.events} events per run, {args.runs} runs alternating; (a2) publish_many, "
        f"{MANY_PRODUCERS} producers x batches of {MANY_BATCH}"
    )
    rows = make_rows(args.events, bodies)
    api: list[RateResult] = []
    raw: list[RateResult] = []
    many: list[RateResult] = []
    for number in range(args.runs):
        # Alternate which goes first, so that neither always runs on a warmer machine.
        order = ("api", "raw", "many") if number % 2 == 0 else ("raw", "many", "api")
        for which in order:
            directory = root / f"a-{which}-{number}"
            if which == "many":
                many.append(await api_many_rate(directory, args.events, bodies, durability))
            elif which == "api":
                api.append(
                    await api_rate(
                        directory,
                        args.events,
                        args.producers,
                        bodies,
                        durability,
                        linger=args.commit_linger,
                    )
                )
            else:
                path = await fresh_database(directory)
                raw.append(await asyncio.to_thread(raw_rate, path, rows, args.batch, durability))
        out(
            f"  run {number + 1}: API {api[-1].rate:>9,.0f} ev/s "
            f"({api[-1].events / max(api[-1].commits, 1):.0f} events/commit) | "
            f"raw {raw[-1].rate:>9,.0f} ev/s ({raw[-1].commits} commits) | "
            f"publish_many {many[-1].rate:>9,.0f} ev/s"
        )
    api_median = statistics.median(r.rate for r in api)
    raw_median = statistics.median(r.rate for r in raw)
    many_median = statistics.median(r.rate for r in many)

    # (b)
    out(
        f"\n(b) accept rate through the local listener, durability={durability}: "
        f"{args.connections} connections x window {args.window} QoS 1 PUBLISH, publishers in a "
        f"subprocess; {args.listener_events} events per run, {args.runs} runs"
    )
    listener: list[RateResult] = []
    for number in range(args.runs):
        listener.append(
            await listener_rate(
                root / f"b-{number}",
                args.listener_events,
                args.connections,
                args.window,
                durability,
                args.commit_linger,
            )
        )
        result = listener[-1]
        out(
            f"  run {number + 1}: {result.rate:>9,.0f} ev/s "
            f"({result.events / max(result.commits, 1):.0f} events/commit)"
        )
    listener_median = statistics.median(r.rate for r in listener)

    # (c) + (d)
    out(
        f"\n(c)+(d) paced at {args.rate:,.0f} events/s for {args.seconds:g} s "
        f"(after {args.warmup:g} s warm-up), durability=full: API (one task per event) "
        "vs naive one-INSERT+COMMIT-per-event loop"
    )
    paced = await paced_api(
        root / "c-api", args.rate, args.seconds, args.warmup, bodies, args.commit_linger
    )
    naive_path = await fresh_database(root / "c-naive")
    naive = await asyncio.to_thread(
        paced_naive, naive_path, args.rate, args.seconds, args.warmup, bodies
    )
    for name, measured in (("API", paced), ("naive", naive)):
        out(
            f"  {name:<5}: {measured.events} events in {measured.seconds:.2f} s "
            f"({measured.rate:,.0f} ev/s), {measured.commits} commits "
            f"({measured.events / max(measured.commits, 1):.1f} events/commit); per event: "
            f"write_bytes {measured.write_bytes / measured.events:,.0f} B, "
            f"wchar {measured.wchar / measured.events:,.0f} B; latency "
            f"p50 {_ms(percentile(measured.latencies, 0.5))} "
            f"p99 {_ms(percentile(measured.latencies, 0.99))} "
            f"max {_ms(measured.latencies[-1])}"
        )
    counter = "write_bytes"
    if naive.write_bytes == 0:
        counter = "wchar"
        out(
            "  NOTE: write_bytes stayed 0 (the filesystem does not account block-layer writes "
            "here): falling back to wchar (bytes passed to write(2)/pwrite(2))"
        )
    used_api = paced.write_bytes if counter == "write_bytes" else paced.wchar
    used_naive = naive.write_bytes if counter == "write_bytes" else naive.wchar
    per_event = used_api / paced.events
    per_event_naive = used_naive / naive.events
    bytes_ratio = per_event / per_event_naive if per_event_naive else math.nan

    p50 = percentile(paced.latencies, 0.5)
    p99 = percentile(paced.latencies, 0.99)
    api_ratio = api_median / raw_median
    out("\nSummary (medians of the runs for rates; /proc/self/io counters for disk bytes):")
    table(
        [
            (
                "(a) API accept rate",
                f"{api_median:,.0f} ev/s",
                f"raw sqlite3 {raw_median:,.0f} ev/s",
                f"{api_ratio:.3f}",
                f">= {GOAL_API_RATIO}",
                yes(api_ratio >= GOAL_API_RATIO),
            ),
            (
                f"(a2) API publish_many x{MANY_BATCH}",
                f"{many_median:,.0f} ev/s",
                f"raw sqlite3 {raw_median:,.0f} ev/s",
                f"{many_median / raw_median:.3f}",
                "(none: reported)",
                "-",
            ),
            (
                "(b) listener accept rate (QoS 1)",
                f"{listener_median:,.0f} ev/s",
                f"API {api_median:,.0f} ev/s",
                f"{listener_median / api_median:.2f}",
                "(none: reported)",
                "-",
            ),
            (
                f"(c) disk bytes/event ({counter})",
                f"{per_event:,.0f} B",
                f"naive {per_event_naive:,.0f} B",
                f"{bytes_ratio:.3f}",
                f"<= {GOAL_BYTES_PER_EVENT:,} B",
                yes(per_event <= GOAL_BYTES_PER_EVENT),
            ),
            (
                "(c) vs naive",
                f"{per_event:,.0f} B",
                f"naive {per_event_naive:,.0f} B",
                f"{bytes_ratio:.3f}",
                f"<= {GOAL_BYTES_RATIO}x naive",
                yes(bytes_ratio <= GOAL_BYTES_RATIO),
            ),
            (
                "(d) accept latency p50",
                _ms(p50),
                f"naive {_ms(percentile(naive.latencies, 0.5))}",
                "",
                "",
                "-",
            ),
            (
                "(d) accept latency p99",
                _ms(p99),
                f"naive {_ms(percentile(naive.latencies, 0.99))}",
                "",
                f"<= {GOAL_P99_MS:g} ms",
                yes(p99 * 1000 <= GOAL_P99_MS),
            ),
            (
                "(d) accept latency max",
                _ms(paced.latencies[-1]),
                f"naive {_ms(naive.latencies[-1])}",
                "",
                "",
                "-",
            ),
        ]
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiled = await api_rate(
            root / "a-profiled",
            args.events,
            args.producers,
            bodies,
            durability,
            profiler,
            args.commit_linger,
        )
        print_profile(
            profiler,
            "cProfile of the event-loop thread in an extra (a) API run, not in the medians "
            f"({profiled.rate:,.0f} ev/s under the profiler; SQLite's own thread is not profiled):",
            [("tottime", 25)],
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.buffer", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of (a) and (b) (default 3)")
    parser.add_argument("--events", type=int, default=30_000, help="events per (a) run")
    parser.add_argument("--producers", type=int, default=1000, help="concurrent API producers")
    parser.add_argument("--batch", type=int, default=1000, help="raw sqlite3 rows per commit")
    parser.add_argument("--listener-events", type=int, default=30_000, help="events per (b) run")
    parser.add_argument("--connections", type=int, default=8, help="(b) MQTT connections")
    parser.add_argument("--window", type=int, default=128, help="(b) in-flight QoS 1 per conn.")
    parser.add_argument("--rate", type=float, default=1000.0, help="(c)/(d) events per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="(c)/(d) measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="(c)/(d) unmeasured seconds")
    parser.add_argument(
        "--durability",
        choices=["full", "normal"],
        default="full",
        help="durability for (a) and (b); (c) and (d) always use full",
    )
    parser.add_argument(
        "--commit-linger",
        type=float,
        default=None,
        help="the agent's [buffer] commit_linger in seconds (default: the agent's default)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the temporary data directory goes"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the event loop in one extra (a) API run"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_publish"]:
        port, events, connections, window = (int(value) for value in argv[1:5])
        answer(asyncio.run(publish_over_mqtt(port, events, connections, window)))
        return
    args = parse_args(argv)
    with scratch("bench-buffer-", args.dir) as root:
        asyncio.run(run(args, root))


if __name__ == "__main__":
    main()
