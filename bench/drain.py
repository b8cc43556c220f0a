"""Benchmark of the uplink's drain (issue #6), side by side with bare references in one run.

    python -m bench.drain [--events 200000] [--runs 3] [--window 100] ...

Everything runs on this machine, each program in its own process: ``edge-agent run`` (the console
script, with a generated config), ``cloud-sink run`` (sqlite core queue), Mosquitto (mutual TLS,
``set_tcp_nodelay true``), the bare reference clients and the paced producer. TLS material comes
from our ``certs`` package. Every event has a 200-byte payload and goes up at QoS 1 over mutual
TLS; the backlog is built with the buffer API before the agent starts, then copied for each run.

(a) raw mode: the agent drains ``--events`` to Mosquitto, one event per message, vs a bare
    aiomqtt loop publishing the same number of messages (same topics, payloads, window) to the
    same Mosquitto. Alternating, ``--runs`` times; medians and their ratio (goal >= 0.9x).
(b) batch mode: the agent drains ``--events`` through the sink into the sqlite core queue (goal
    >= 130,000 events/s end to end); reference: a bare aiomqtt loop publishing the same events as
    pre-encoded envelopes (``--format``; 500 events or 64 KiB, the agent's defaults) to the same
    sink, so the ratio says how much of the sink's capacity the agent reaches.
(c) the agent's RSS (``VmRSS`` from ``/proc/PID/status``, sampled while it drains, and ``VmHWM``)
    with ``--rss-events`` buffered (default 5 x ``--events``: 1,000,000), drained in batch mode
    through the sink (goal <= 64 MB); reference: the same agent idle and connected.
(d) end-to-end latency at ``--rate`` events/s for ``--latency-seconds`` (after a warm-up), with
    ``durability = "full"`` on both sides: a producer process publishes QoS 1 to the agent's local
    listener (send time in the payload, ``CLOCK_MONOTONIC``, which is system-wide); this process
    polls the core queue every 0.5 ms and takes each event's latency when it first sees its row
    (so a figure includes up to 0.5 ms of polling). Goal: p99 <= 18 ms.

Drain rates are measured from the agent's "online" log line (after CONNACK) to the moment the
last event is gone (a) from the agent's buffer (polled every 10 ms: deleted = acknowledged) or
(b) in the core queue; the bare loops from CONNACK to the last PUBACK. Figures are printed, never
asserted: a missed goal is reported as missed. ``--profile DIR`` adds one extra (a) and (b)
drain with the agent under cProfile (its event-loop thread) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import os
import shutil
import sqlite3
import ssl
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.child import answer
from bench.drain_agent import Drain, agent_drain, idle_rss
from bench.drain_backlog import build_backlog, core_count, read_only
from bench.drain_bare import bare_drain, bare_loop
from bench.drain_config import Pki, batch_format, make_pki
from bench.drain_latency import latency_run, produce
from bench.drain_processes import Process, start_mosquitto, start_sink
from bench.load import PAYLOAD_BYTES, topics
from bench.report import out, percentile, print_profile, scratch, table, yes
from mqtt_ingest.envelope import BATCH_FORMATS

# Goals of issue #6 (printed, never asserted).
GOAL_RAW_RATIO = 0.9
GOAL_BATCH_RATE = 130_000
GOAL_RSS_MB = 64.0
GOAL_P99_MS = 18.0


def _line(name: str, drain: Drain, *, rss: bool = False) -> str:
    memory = f", RSS peak {drain.peak_rss_mb:.1f} MB (HWM {drain.hwm_mb:.1f})" if rss else ""
    threads = ", ".join(
        f"{thread} {used / drain.events * 1e6:.1f}" for thread, used in drain.client_threads.items()
    )
    return (
        f"{name} {drain.rate:>9,.0f} ev/s ({drain.seconds:.2f} s; CPU client "
        f"{drain.client_cpu / drain.events * 1e6:.1f} µs/ev{f' ({threads})' if threads else ''}, "
        "server "
        f"{drain.server_cpu / drain.events * 1e6:.1f} µs/ev{memory})"
    )


def _print_profile(path: Path, title: str) -> None:
    print_profile(path, title, [("tottime", 25), ("cumulative", 30)])


async def alternate(
    runs: int, first: Callable[[int], object], second: Callable[[int], object]
) -> None:
    """Run number n of both, alternating which goes first."""
    for number in range(runs):
        order = (first, second) if number % 2 == 0 else (second, first)
        for step in order:
            result = step(number)
            if asyncio.iscoroutine(result):
                await result


Row = tuple[str, str, str, str, str, str]


async def with_sink(
    directory: Path,
    pki: Pki,
    args: argparse.Namespace,
    step: Callable[[Process, Path], object],
) -> None:
    """A fresh sink (and core queue) in ``directory`` for the time of ``step(sink, core)``."""
    sink, core = await start_sink(directory, pki, args.sink_linger)
    try:
        result = step(sink, core)
        if asyncio.iscoroutine(result):
            await result
    finally:
        await sink.stop()


async def part_a(args: argparse.Namespace, root: Path, pki: Pki, backlog: Path) -> list[Row]:
    out(
        f"\n(a) raw mode to Mosquitto: agent vs bare aiomqtt loop, {args.events:,} events per "
        f"run, {args.runs} runs alternating"
    )
    agent_runs: list[Drain] = []
    bare_runs: list[Drain] = []
    broker = await start_mosquitto(root / "mosquitto", pki)
    try:

        async def agent(n: int) -> None:
            agent_runs.append(
                await agent_drain(root / f"a-{n}", backlog, pki, broker, None, args.events, args)
            )
            out(f"  run {n + 1}: " + _line("agent", agent_runs[-1]))

        async def bare(n: int) -> None:
            bare_runs.append(
                await bare_drain(root / f"a-bare-{n}", pki, broker, args.events, args, batch=False)
            )
            out(f"  run {n + 1}: " + _line("bare ", bare_runs[-1]))

        await alternate(args.runs, agent, bare)
        if args.profile is not None:
            path = args.profile / "agent-raw.prof"
            profiled = await agent_drain(
                root / "a-prof", backlog, pki, broker, None, args.events, args, profile=path
            )
            _print_profile(path, "cProfile of the agent, (a) raw drain: " + _line("", profiled))
    finally:
        await broker.stop()
    ratios = sorted(a.rate / b.rate for a, b in zip(agent_runs, bare_runs, strict=True))
    out(f"  per-run ratios agent/bare: {', '.join(f'{r:.3f}' for r in ratios)}")
    agent_rate = statistics.median(d.rate for d in agent_runs)
    bare_rate = statistics.median(d.rate for d in bare_runs)
    ratio = agent_rate / bare_rate
    return [
        (
            "(a) raw drain to Mosquitto",
            f"{agent_rate:,.0f} ev/s",
            f"bare loop {bare_rate:,.0f} ev/s",
            f"{ratio:.3f}",
            f">= {GOAL_RAW_RATIO}x bare",
            yes(ratio >= GOAL_RAW_RATIO),
        )
    ]


async def part_b(args: argparse.Namespace, root: Path, pki: Pki, backlog: Path) -> list[Row]:
    out(
        f"\n(b) batch mode through the sink into the sqlite core queue: agent vs bare loop of "
        f"pre-encoded envelopes, {args.events:,} events per run, {args.runs} runs alternating "
        "(fresh sink and core queue each)"
    )
    agent_runs: list[Drain] = []
    bare_runs: list[Drain] = []

    async def agent(n: int) -> None:
        async def step(sink: Process, core: Path) -> None:
            agent_runs.append(
                await agent_drain(root / f"b-{n}", backlog, pki, sink, core, args.events, args)
            )

        await with_sink(root / f"b-sink-{n}", pki, args, step)
        out(f"  run {n + 1}: " + _line("agent", agent_runs[-1]))

    async def bare(n: int) -> None:
        async def step(sink: Process, core: Path) -> None:
            bare_runs.append(
                await bare_drain(root / f"b-bare-{n}", pki, sink, args.events, args, batch=True)
            )
            with contextlib.closing(read_only(core)) as db:
                stored = core_count(db)
            if stored != args.events:
                out(f"  WARNING: {stored} events in the core queue, sent {args.events}")

        await with_sink(root / f"b-bare-sink-{n}", pki, args, step)
        out(f"  run {n + 1}: " + _line("bare ", bare_runs[-1]))

    await alternate(args.runs, agent, bare)
    if args.profile is not None:
        path = args.profile / "agent-batch.prof"
        profiled: list[Drain] = []

        async def profiled_step(sink: Process, core: Path) -> None:
            profiled.append(
                await agent_drain(
                    root / "b-prof", backlog, pki, sink, core, args.events, args, profile=path
                )
            )

        await with_sink(root / "b-prof-sink", pki, args, profiled_step)
        _print_profile(path, "cProfile of the agent, (b) batch drain: " + _line("", profiled[0]))
    agent_rate = statistics.median(d.rate for d in agent_runs)
    bare_rate = statistics.median(d.rate for d in bare_runs)
    return [
        (
            "(b) batch drain into the core queue",
            f"{agent_rate:,.0f} ev/s",
            f"bare loop {bare_rate:,.0f} ev/s",
            f"{agent_rate / bare_rate:.3f}",
            f">= {GOAL_BATCH_RATE:,} ev/s",
            yes(agent_rate >= GOAL_BATCH_RATE),
        )
    ]


async def part_c(args: argparse.Namespace, root: Path, pki: Pki) -> list[Row]:
    rss_events = args.rss_events or 5 * args.events
    out(f"\n(c) agent RSS: {rss_events:,} events buffered, drained in batch mode through the sink")
    big = root / "backlog-rss"
    seconds = await build_backlog(big, rss_events, topics(args.topics))
    out(f"  backlog of {rss_events:,} events built in {seconds:.1f} s")
    drains: list[Drain] = []

    async def drain(sink: Process, core: Path) -> None:
        drains.append(await agent_drain(root / "c", big, pki, sink, core, rss_events, args))

    await with_sink(root / "c-sink", pki, args, drain)
    shutil.rmtree(big)
    out("  " + _line("agent", drains[0], rss=True))
    idle: list[float] = []

    async def idle_step(sink: Process, core: Path) -> None:
        idle.append(await idle_rss(root / "c-idle", pki, sink, args))

    await with_sink(root / "c-idle-sink", pki, args, idle_step)
    out(f"  idle connected agent (empty buffer, 2 s after online): VmRSS {idle[0]:.1f} MB")
    rss = drains[0].peak_rss_mb
    return [
        (
            f"(c) agent RSS, {rss_events:,} buffered",
            f"{rss:.1f} MB",
            f"idle connected {idle[0]:.1f} MB",
            f"{rss / idle[0]:.2f}",
            f"<= {GOAL_RSS_MB:g} MB",
            yes(rss <= GOAL_RSS_MB),
        )
    ]


async def part_d(args: argparse.Namespace, root: Path, pki: Pki) -> list[Row]:
    out(
        f"\n(d) end-to-end latency at {args.rate:,.0f} events/s for {args.latency_seconds:g} s "
        f"(after {args.warmup:g} s warm-up), durability full, producer -> agent listener -> "
        "sink -> sqlite core queue"
    )
    legs = await latency_run(root / "d", pki, args)
    latencies = legs.total
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    out(
        f"  {len(latencies)} events: p50 {p50 * 1000:.2f} ms, p90 "
        f"{percentile(latencies, 0.9) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max "
        f"{latencies[-1] * 1000 if latencies else math.nan:.2f} ms"
    )
    for name, values in (
        ("sent -> accepted by the agent", legs.accept),
        ("accepted -> read by the sink", legs.uplink),
        ("read by the sink -> in the core queue", legs.store),
    ):
        out(
            f"    {name:<38} p50 {percentile(values, 0.5) * 1000:6.2f} ms,"
            f" p99 {percentile(values, 0.99) * 1000:6.2f} ms (+-1 ms: whole-ms timestamps)"
        )
    return [
        ("(d) e2e latency p50", f"{p50 * 1000:.2f} ms", "", "", "", "-"),
        (
            "(d) e2e latency p99",
            f"{p99 * 1000:.2f} ms",
            "",
            "",
            f"<= {GOAL_P99_MS:g} ms",
            yes(p99 * 1000 <= GOAL_P99_MS),
        ),
    ]


async def run(args: argparse.Namespace, root: Path) -> None:
    out(
        f"bench.drain: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, OpenSSL {ssl.OPENSSL_VERSION.split()[1]}; data in "
        f"{root}; {PAYLOAD_BYTES}-byte payloads, QoS 1, mutual TLS, {args.topics} topics round "
        f"robin, window {args.window}, durability {args.durability}, "
        f"batch format {batch_format(args)}"
    )
    pki = make_pki(root / "pki")
    rows: list[Row] = []
    if "a" in args.parts or "b" in args.parts:
        backlog = root / "backlog"
        seconds = await build_backlog(backlog, args.events, topics(args.topics))
        out(f"backlog of {args.events:,} events built with the buffer API in {seconds:.1f} s")
        if "a" in args.parts:
            rows += await part_a(args, root, pki, backlog)
        if "b" in args.parts:
            rows += await part_b(args, root, pki, backlog)
        shutil.rmtree(backlog)
    if "c" in args.parts:
        rows += await part_c(args, root, pki)
    if "d" in args.parts:
        rows += await part_d(args, root, pki)
    out("\nSummary (rates: medians of the runs):")
    table(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--events", type=int, default=200_000, help="backlog of (a) and (b)")
    parser.add_argument("--runs", type=int, default=3, help="runs of (a) and (b) (default 3)")
    parser.add_argument(
        "--rss-events", type=int, default=None, help="backlog of (c) (default 5 x --events)"
    )
    parser.add_argument("--topics", type=int, default=8, help="topics, round robin (default 8)")
    parser.add_argument("--window", type=int, default=100, help="[uplink] window (default 100)")
    parser.add_argument(
        "--durability", choices=["full", "normal"], default="full", help="for (a)-(c); (d): full"
    )
    parser.add_argument(
        "--format", choices=sorted(BATCH_FORMATS), default=None,
        help="the envelope format of (b)-(d), agent and bare loop (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--commit-linger", type=float, default=None, metavar="MS",
        help="the agent's [buffer] commit_linger in ms (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-linger", type=float, default=None, metavar="MS",
        help="the agent's [uplink.batch] linger in ms (default: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--sink-linger", type=float, default=None, metavar="MS",
        help="the sink's [listener] batch_linger in ms (default: the sink's default)",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, default=1000.0, help="(d) events per second")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="(d) measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="(d) unmeasured seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up a drain after this")
    parser.add_argument(
        "--parts", default="abcd", help="which of (a)-(d) to run, e.g. 'ab' (default abcd)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary data goes")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="cProfile the agent in one extra (a) and (b) drain; .prof files go to DIR",
    )  # fmt: skip
    return parser.parse_args(argv)


def _profiled(path: Path, argv: list[str]) -> int:
    """``edge-agent`` under cProfile (the event-loop thread); the stats are dumped at exit."""
    from edge_agent.cli import main as agent_main

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return agent_main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        answer(asyncio.run(bare_loop(json.loads(argv[1]))))
        return
    if argv[:1] == ["_produce"]:
        port, total, rate, topic_count = int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4])
        answer(asyncio.run(produce(port, total, rate, topic_count)))
        return
    if argv[:1] == ["_profiled"]:
        sys.exit(_profiled(Path(argv[1]), argv[2:]))
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with scratch("bench-drain-", args.dir) as root:
        asyncio.run(run(args, root))


if __name__ == "__main__":
    main()
