"""Benchmark of the cloud sink (issue #5), side by side with its references in one run.

    python -m bench.sink [--events 100000] [--runs 3] [--publishers 32] [--connections 2000] ...

Every program runs in its own process on this machine: ``cloud-sink run`` (the console script,
a generated config, fresh for every run), Mosquitto 2.0.11 (mutual TLS, ``set_tcp_nodelay true``,
no subscriber: it receives and forwards nothing), the load generator and the bare backend loops.
TLS material comes from our ``certs`` package: one device certificate per publisher, since the
sink takes the device id from the certificate's CN and wants it as client id and user name too;
each CONNECT carries a device-signed ES256 JWT.

(1) Throughput. ``--publishers`` mutual-TLS clients in one load-generator process (asyncio
    protocols, pre-encoded packets, no MQTT library) publish QoS 1 to
    ``devices/<id>/telemetry``, each keeping ``--window`` PUBLISH packets unacknowledged. Two
    formats: ``raw`` (one 200-byte event per PUBLISH, the sink generates the ids) and ``batch``
    (``format=batch-v2``, the agent's default: envelopes of ``--envelope-events`` events with
    unique seqs, as the agent cuts them). The measured window runs from "go" to the last PUBACK
    of ``--events`` events (after a warm-up); the sink acknowledges only what its backend
    confirmed, so the rate is the confirmed rate. Targets: the sink into ``sqlite``, ``amqp``
    (RabbitMQ), ``nats`` (JetStream), and Mosquitto receiving the same packets (no forwarding).
(2) References: each backend's bare client loop in its own process, the same messages (subject
    or routing key, headers, 200-byte payloads, persistent / file storage) at several windows:
    nats-py ``publish_async`` with ``publish_async_max_pending`` = window; aio-pika with
    publisher confirms and ``window`` publishes awaiting their confirm (``mandatory``). The
    messages are built before the clock starts. The best window is the reference.
(3) Idle connections: ``--connections`` mutual-TLS clients (a certificate and a JWT each) connect
    to a fresh sink (sqlite backend, ``max_connections`` raised) and to Mosquitto, stay idle for
    ``--hold`` seconds with keep-alive ``--keep-alive`` (PINGREQ every half of it); reported:
    VmRSS before and after, per connection, how many stayed connected.

CPU per event is utime + stime from ``/proc/PID/stat`` over the measured window (sink, load
generator, the broker's own processes). Runs alternate between targets; rates are medians. A
fresh sink, core-queue database, RabbitMQ exchange/queue and JetStream stream (unique names,
deleted afterwards) serve every run; the number of messages the backend holds is checked after
each. ``--profile DIR`` adds one cProfile'd sink run per backend (batch) and prints its top.
Figures are printed, never asserted: a missed goal is reported as missed. docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.drain_processes import make_dir
from bench.report import out, print_profile, scratch, table, yes
from bench.sink_backends import BACKENDS, bare_main
from bench.sink_loadgen import PAYLOAD_BYTES, load_main, make_pki, raise_nofile
from bench.sink_runs import Sample, Settings, bare_run, idle_run, profiled_main, throughput_run

FORMATS = ("batch", "raw")


# Goals of issue #5 (printed, never asserted).
GOAL_NATS_RATIO = 1.0
GOAL_AMQP_RATIO = 1.5
GOAL_SQLITE_BATCH = 50_000
GOAL_CONNECTIONS = 2_000


# -- the run -------------------------------------------------------------------------------------


def _median(samples: Sequence[Sample], target: str, fmt: str) -> float:
    rates = [s.rate for s in samples if s.target == target and s.fmt == fmt]
    return statistics.median(rates) if rates else math.nan


def _summary(samples: Sequence[Sample], args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    groups = sorted({(s.target, s.fmt) for s in samples})
    out("\nMedians:")
    for target, fmt in groups:
        group = [s for s in samples if s.target == target and s.fmt == fmt]
        rates = [s.rate for s in group]
        cpu = statistics.median(s.server_cpu / s.events * 1e6 for s in group)
        broker = statistics.median(s.broker_cpu / s.events * 1e6 for s in group)
        rss = statistics.median(s.rss_mb for s in group)
        out(
            f"  {target:<9} {fmt:<6} {statistics.median(rates):>9,.0f} ev/s "
            f"[{min(rates):,.0f} - {max(rates):,.0f}], {'client' if 'bare' in target else 'server'}"
            f" {cpu:.1f} µs/ev, broker {broker:.1f} µs/ev"
            + ("" if math.isnan(rss) else f", HWM {rss:.1f} MB")
        )
    for backend, goal in (("nats", GOAL_NATS_RATIO), ("amqp", GOAL_AMQP_RATIO)):
        bare = [
            (f, _median(samples, f"bare-{backend}", f)) for t, f in groups if t == f"bare-{backend}"
        ]
        if not bare:
            continue
        window, reference = max(bare, key=lambda item: item[1])
        for fmt in FORMATS:
            rate = _median(samples, backend, fmt)
            if math.isnan(rate):
                continue
            rows.append((
                f"sink -> {backend}, {fmt}", f"{rate:,.0f} ev/s",
                f"bare loop {window} {reference:,.0f}", f"{rate / reference:.2f}",
                f">= {goal}x", yes(rate / reference >= goal),
            ))  # fmt: skip
    for fmt in FORMATS:
        rate = _median(samples, "sqlite", fmt)
        if math.isnan(rate):
            continue
        mosquitto = _median(samples, "mosquitto", fmt)
        wanted = f">= {GOAL_SQLITE_BATCH:,} ev/s" if fmt == "batch" else "-"
        rows.append((
            f"sink -> sqlite, {fmt}", f"{rate:,.0f} ev/s", f"mosquitto {mosquitto:,.0f}",
            f"{rate / mosquitto:.2f}", wanted,
            yes(rate >= GOAL_SQLITE_BATCH) if fmt == "batch" else "-",
        ))  # fmt: skip
    del args
    return rows


async def run(args: argparse.Namespace, root: Path) -> None:
    limit = raise_nofile()
    load = os.getloadavg()
    out(
        f"bench.sink: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, OpenSSL "
        f"{ssl.OPENSSL_VERSION.split()[1]}, RLIMIT_NOFILE {limit}; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.publishers} publishers, {args.events:,}"
        f" events per run, {PAYLOAD_BYTES}-byte payloads, QoS 1, mutual TLS, windows "
        f"raw {args.window} / batch {args.batch_window} messages, {args.envelope_events} events "
        f"per envelope"
    )
    started = time.perf_counter()
    pki, devices = await asyncio.to_thread(
        make_pki, root / "pki", max(args.publishers, args.connections if "c" in args.parts else 0),
        "bench-d",
    )  # fmt: skip
    out(f"PKI: CA, server and {len(devices)} device certificates with tokens in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    settings = Settings(root, pki, devices, args)
    targets = [t for t in args.targets.split(",") if t]
    formats = [f for f in args.formats.split(",") if f]
    if "t" in args.parts:
        samples: list[Sample] = []
        out("\n(1)+(2) throughput, runs alternating")
        for number in range(1, args.runs + 1):
            for target in targets:
                if target.startswith("bare-"):
                    backend = target.removeprefix("bare-")
                    windows = args.nats_windows if backend == "nats" else args.amqp_windows
                    for window in (int(w) for w in windows.split(",")):
                        sample = await bare_run(backend, window, number, settings)
                        samples.append(sample)
                        out(f"  run {number}: " + sample.line())
                    continue
                for fmt in formats:
                    sample = await throughput_run(target, fmt, number, settings)
                    samples.append(sample)
                    out(f"  run {number}: " + sample.line())
        rows += _summary(samples, args)
        if args.profile is not None:
            for backend in [t for t in targets if t in BACKENDS]:
                path = args.profile / f"sink-{backend}.prof"
                profiled = Settings(root / "profile", pki, devices, args, profile=path)
                make_dir(profiled.root)
                sample = await throughput_run(backend, "batch", 0, profiled)
                print_profile(
                    path,
                    f"cProfile of the sink ({sample.line()})",
                    [("tottime", 30), ("cumulative", 30)],
                )
    if "c" in args.parts:
        out(
            f"\n(3) {args.connections:,} idle mutual-TLS connections, keep-alive "
            f"{args.keep_alive} s (PINGREQ every {args.keep_alive / 2:g} s), held {args.hold:g} s"
        )
        chosen = devices[: args.connections]
        for target in ("sqlite", "mosquitto"):
            idle = await idle_run(target, settings, chosen)
            out("  " + idle.line().replace("sqlite   ", "sink     "))
            name = "sink (sqlite)" if target == "sqlite" else "mosquitto"
            rows.append((
                f"{name}: idle connections held", f"{idle.alive:,} of {idle.connections:,}",
                f"{idle.lost} lost", "", f">= {GOAL_CONNECTIONS:,}" if target == "sqlite" else "",
                yes(idle.alive >= GOAL_CONNECTIONS and idle.lost == 0)
                if target == "sqlite" else "-",
            ))  # fmt: skip
            rows.append((
                f"{name}: RSS per idle connection", f"{idle.per_connection_kb:.1f} KB",
                f"{idle.rss_before:.1f} -> {idle.rss_end:.1f} MB", "", "(reported)", "-",
            ))  # fmt: skip
    load = os.getloadavg()
    out(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out("Summary (rates: medians of the runs):")
    table(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sink", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--events", type=int, default=100_000, help="measured events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of every target (default 3)")
    parser.add_argument("--publishers", type=int, default=32, help="load-generator clients")
    parser.add_argument("--window", type=int, default=64, help="raw: unacked PUBLISH per client")
    parser.add_argument("--batch-window", type=int, default=4, help="batch: unacked envelopes")
    parser.add_argument("--envelope-events", type=int, default=292, help="events per envelope")
    parser.add_argument(
        "--targets", default="sqlite,nats,bare-nats,amqp,bare-amqp,mosquitto",
        help="what to measure, comma-separated, in this order within a run",
    )  # fmt: skip
    parser.add_argument("--formats", default="batch,raw", help="load formats for the sink")
    parser.add_argument(
        "--sink-linger", type=float, default=None, metavar="MS",
        help="the sink's [listener] batch_linger in ms (default: the sink's default)",
    )  # fmt: skip
    parser.add_argument("--nats-windows", default="256,1024,4096", help="bare nats-py windows")
    parser.add_argument("--amqp-windows", default="100,500", help="bare aio-pika windows")
    parser.add_argument(
        "--mosquitto-scale", type=int, default=10, help="Mosquitto gets this many times --events"
    )
    parser.add_argument(
        "--tls-read-buffer", type=int, default=0, metavar="BYTES",
        help="the sink's [listener] tls_read_buffer (default: the sink's default, 64 KiB)",
    )  # fmt: skip
    parser.add_argument("--bare-events", type=int, default=0, help="(default: --events)")
    parser.add_argument("--connections", type=int, default=GOAL_CONNECTIONS, help="(3) clients")
    parser.add_argument("--keep-alive", type=int, default=20, help="(3) keep-alive seconds")
    parser.add_argument("--hold", type=float, default=60.0, help="(3) seconds held idle")
    parser.add_argument("--parts", default="tc", help="t: throughput, c: idle connections")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary data goes")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="add one cProfile'd sink run per backend (batch); .prof files go to DIR",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_load"]:
        asyncio.run(load_main(json.loads(argv[1])))
        return
    if argv[:1] == ["_bare"]:
        out(json.dumps(asyncio.run(bare_main(json.loads(argv[1])))))
        return
    if argv[:1] == ["_profiled"]:
        sys.exit(profiled_main(argv[1], argv[2:]))
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with scratch("bench-sink-", args.dir) as root:
        asyncio.run(run(args, root.resolve()))


if __name__ == "__main__":
    main()
