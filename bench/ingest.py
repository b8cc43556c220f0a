"""Ingest benchmark: our MQTT ingest server against Mosquitto and amqtt, under the same load.

N concurrent publishers each send QoS 1 PUBLISH packets with 200-byte payloads, pipelined up to a
bounded window of unacknowledged packets per client, to each server in turn: `IngestServer` with a
no-op durable stage, a Mosquitto broker and an amqtt broker, each with TLS (mutual, a device
certificate from our ``certs`` package) and without. Every server runs in its own process, so its
CPU time (``/proc/PID/stat`` utime + stime) and peak RSS (``VmHWM`` in ``/proc/PID/status``) are
its own; the load generator runs in separate worker processes. A fresh server process serves each
run; runs are interleaved (run 1 of every server and TLS mode, then run 2, ...) and medians are
reported. The CPU that other processes use during each measured window is measured too
(``/proc/stat``); a window disturbed by more than ``--max-other`` cores is measured again.

Each client connects (clean session), sends ``--warmup`` publishes and waits for their PUBACKs;
then every client is told to go at once and the measured window runs until the last PUBACK of
``--events`` publishes per client. A client keeps at most ``--window`` publishes unacknowledged
and tops up in chunks of ``--refill``. The figures are printed; goals are checked, never asserted.

Usage, from the repository root::

    python -m bench.ingest                      # 8 publishers x 10,000 events, 3 runs, TLS on+off
    python -m bench.ingest --publishers 16 --events 20000 --runs 5 --tls off
    python -m bench.ingest --servers ours --profile /tmp/prof   # cProfile of our server

Figures and how to read them: docs/benchmarks.md. The two internal modes ``serve`` and ``load``
are how this script starts its own server and load-generator processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.ingest_loadgen import PAYLOAD_BYTES, load_main
from bench.ingest_report import profile_report, report, summarise
from bench.ingest_runs import Failed, Sample, Settings, one_run
from bench.ingest_servers import SERVERS, make_pki, serve_main
from bench.report import out

# -- entry points -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="QoS 1 ingest benchmark: ours vs Mosquitto vs amqtt, TLS on and off.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--publishers", type=int, default=8, help="concurrent publishing clients")
    parser.add_argument("--events", type=int, default=10000, help="measured events per publisher")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up events per publisher")
    parser.add_argument("--window", type=int, default=32, help="unacked publishes per client")
    parser.add_argument(
        "--refill",
        type=int,
        default=0,
        help="top a client's window up once this many slots are free (0: half the window)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per server and TLS mode")
    parser.add_argument("--tls", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated subset of " + "/".join(SERVERS),
    )
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per phase")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.2,
        help="cores other processes may use during a measurement before it is retried",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the machine to be quiet before each measurement",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a measurement disturbed by others"
    )
    parser.add_argument(
        "--mosquitto-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set_tcp_nodelay in the Mosquitto config (asyncio sets TCP_NODELAY itself)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run our server under cProfile, write .prof files here and print the top functions "
        "(slows our server down: its figures are then not comparable)",
    )
    return parser


async def _run_main(args: argparse.Namespace) -> int:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        out(f"unknown servers: {', '.join(sorted(unknown))}")
        return 2
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.tls]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        settings = Settings(
            publishers=args.publishers,
            events=args.events,
            warmup=args.warmup,
            window=args.window,
            refill=max(1, min(args.refill or args.window // 2, args.window)),
            workers=max(1, min(args.workers, args.publishers)),
            timeout=args.timeout,
            max_other=args.max_other,
            quiet_wait=args.quiet_wait,
            retries=args.retries,
            nodelay=args.mosquitto_nodelay,
            workdir=workdir,
            pki=make_pki(workdir / "pki"),
            profile=args.profile,
        )
        out(
            f"{args.publishers} publishers x {args.events} QoS 1 events ({PAYLOAD_BYTES}-byte "
            f"payloads, window {args.window}, {args.warmup} warm-up) per run; {args.runs} runs; "
            f"{settings.workers} load-generator process(es); {os.cpu_count()} CPUs; "
            f"Python {sys.version.split()[0]}"
        )
        samples: list[Sample] = []
        for run in range(1, args.runs + 1):
            for tls in modes:
                for kind in servers:
                    sample = await _measure(kind, tls, run, settings)
                    if sample is not None:
                        samples.append(sample)
        out()
        if samples:
            report(summarise(samples), samples)
        if args.profile is not None:
            profile_report(args.profile)
    return 0 if samples else 1


async def _measure(kind: str, tls: bool, run: int, settings: Settings) -> Sample | None:
    """One sample, re-run (up to ``settings.retries`` times) if other processes disturbed it."""
    sample: Sample | None = None
    for attempt in range(settings.retries + 1):
        try:
            sample = await one_run(kind, tls, run, settings)
        except Failed as exc:
            out(f"FAILED: {exc}")
            return None
        disturbed = sample.other_load > settings.max_other
        out(
            f"run {run} TLS {'on ' if tls else 'off'} {kind:<9} "
            f"{sample.rate:>9,.0f} events/s  {sample.cpu_us:6.1f} us/event  "
            f"peak RSS {sample.peak_rss / 2**20:6.1f} MB  "
            f"load-gen {sample.loadgen_load:.2f} cores  other {sample.other_load:.2f} cores"
            + (
                "  (disturbed" + (": again)" if attempt < settings.retries else ": kept)")
                if disturbed
                else ""
            )
        )
        if not disturbed:
            break
    return sample


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        parser = argparse.ArgumentParser(prog="bench.ingest serve")
        parser.add_argument("kind", choices=("ours", "amqtt"))
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--ca")
        parser.add_argument("--cert")
        parser.add_argument("--key")
        parser.add_argument("--profile")
        serve_main(parser.parse_args(argv[1:]))
        return 0
    if argv and argv[0] == "load":
        parser = argparse.ArgumentParser(prog="bench.ingest load")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--name", default="w0")
        parser.add_argument("--clients", type=int, required=True)
        parser.add_argument("--events", type=int, required=True)
        parser.add_argument("--warmup", type=int, default=0)
        parser.add_argument("--window", type=int, default=32)
        parser.add_argument("--refill", type=int, default=1)
        parser.add_argument("--ca")
        parser.add_argument("--cert")
        parser.add_argument("--key")
        asyncio.run(load_main(parser.parse_args(argv[1:])))
        return 0
    return asyncio.run(_run_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
