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
import math
import os
import sqlite3
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.buffer_listener import listener_rate, publish_over_mqtt
from bench.buffer_paced import paced_api, paced_naive
from bench.buffer_rates import (
    MANY_BATCH,
    MANY_PRODUCERS,
    RateResult,
    api_many_rate,
    api_rate,
    raw_rate,
)
from bench.buffer_setup import Durability, fresh_database, make_rows
from bench.child import answer
from bench.load import PAYLOAD_BYTES, payloads
from bench.report import out, percentile, print_profile, scratch, table, yes
from edge_agent.config import BufferConfig

# The runs stay importable from here, as docs/benchmarks.md names them (`paced_api`, ...).
__all__ = [
    "api_many_rate",
    "api_rate",
    "listener_rate",
    "main",
    "paced_api",
    "paced_naive",
    "raw_rate",
]

# Goals of the spec.
GOAL_API_RATIO = 0.5
GOAL_BYTES_PER_EVENT = 1000
GOAL_BYTES_RATIO = 0.2
GOAL_P99_MS = 10.0


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
