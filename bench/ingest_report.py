"""The report of ``bench.ingest``: medians per server and TLS mode, the goals, and the top of
the cProfile runs of our server."""

from __future__ import annotations

import pstats
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.ingest_runs import Sample
from bench.ingest_servers import SERVERS
from bench.report import out

# The goals this benchmark checks (printed, never asserted).
GOAL_VS_AMQTT = 2.0
GOAL_VS_MOSQUITTO = 0.5
GOAL_CPU_US = 40.0


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    server: str
    tls: bool
    rate: float
    rate_min: float
    rate_max: float
    cpu_us: float
    peak_mb: float
    loadgen: float
    other: float
    runs: int


def summarise(samples: Sequence[Sample]) -> list[Row]:
    groups: dict[tuple[str, bool], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.server, sample.tls].append(sample)
    rows = []
    for (server, tls), group in groups.items():
        rates = [s.rate for s in group]
        rows.append(
            Row(
                server,
                tls,
                statistics.median(rates),
                min(rates),
                max(rates),
                statistics.median(s.cpu_us for s in group),
                statistics.median(s.peak_rss for s in group) / 2**20,
                statistics.median(s.loadgen_load for s in group),
                max(s.other_load for s in group),
                len(group),
            )
        )
    order = {name: i for i, name in enumerate(SERVERS)}
    rows.sort(key=lambda r: (r.tls, order[r.server]))
    return rows


def _paired(samples: Sequence[Sample], other: str, tls: bool) -> str:
    """Ours/other per run (the two ran minutes apart at most): median and range."""
    rates = {(s.server, s.run): s.rate for s in samples if s.tls == tls}
    ratios = [
        rates["ours", run] / rates[other, run]
        for (server, run) in rates
        if server == "ours" and (other, run) in rates
    ]
    if not ratios:
        return ""
    return (
        f" [per-run pairs: median {statistics.median(ratios):.2f}x, "
        f"{min(ratios):.2f} - {max(ratios):.2f}]"
    )


def report(rows: Sequence[Row], samples: Sequence[Sample]) -> None:
    out("| server | TLS | events/s (median) | min - max | server CPU us/event | peak RSS MB "
         "| load-gen cores | other cores (max) | runs |")  # fmt: skip
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out(
            f"| {r.server} | {'on' if r.tls else 'off'} | {r.rate:,.0f} "
            f"| {r.rate_min:,.0f} - {r.rate_max:,.0f} | {r.cpu_us:.1f} | {r.peak_mb:.1f} "
            f"| {r.loadgen:.2f} | {r.other:.2f} | {r.runs} |"
        )
    out()
    by_key = {(r.server, r.tls): r for r in rows}
    for tls in (False, True):
        ours = by_key.get(("ours", tls))
        if ours is None:
            continue
        mode = "TLS on " if tls else "TLS off"
        parts = []
        for server, goal in (("amqtt", GOAL_VS_AMQTT), ("mosquitto", GOAL_VS_MOSQUITTO)):
            other = by_key.get((server, tls))
            if other is not None:
                ratio = ours.rate / other.rate
                met = "met" if ratio >= goal else "MISSED"
                parts.append(
                    f"ours/{server} = {ratio:.2f}x (goal >= {goal}x: {met})"
                    + _paired(samples, server, tls)
                )
        met = "met" if ours.cpu_us <= GOAL_CPU_US else "MISSED"
        parts.append(f"ours CPU = {ours.cpu_us:.1f} us/event (goal <= {GOAL_CPU_US:.0f}: {met})")
        out(f"{mode}: " + ";\n         ".join(parts))
    busy = [r for r in rows if r.loadgen >= 0.9]
    if busy:
        names = ", ".join(f"{r.server}/TLS {'on' if r.tls else 'off'}" for r in busy)
        out(
            f"Note: the load generator was busy >= 0.9 cores for {names}: those rates may be "
            "limited by the generator (or by the two servers sharing the machine's cores), "
            "not by the server."
        )


def profile_report(directory: Path, top: int = 25) -> None:
    for path in sorted(directory.glob("*.prof")):
        stats = pstats.Stats(str(path))
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(entry[2] for entry in raw.values()) or 1.0
        out(f"\nProfile {path.name} (tottime shares of {total:.2f}s profiled CPU; cProfile "
             "inflates Python-level calls):")  # fmt: skip
        ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
        for (filename, line, name), (_, calls, tottime, cumtime, _) in ranked:
            where = _short(filename)
            out(
                f"  {tottime / total:6.1%}  tot {tottime:7.3f}s  cum {cumtime:7.3f}s  "
                f"{calls:>9} calls  {where}:{line}({name})"
            )
        out("  Cumulative (time inside, callees included) of mqtt_ingest, amqtt and keep-alive:")
        mine = [
            item
            for item in raw.items()
            if any(m in item[0][0] for m in ("mqtt_ingest/", "amqtt/", "asyncio/timeouts.py"))
        ]
        for (filename, line, name), (_, calls, _, cumtime, _) in sorted(
            mine, key=lambda item: item[1][3], reverse=True
        )[:15]:
            out(f"  {cumtime / total:6.1%}  {calls:>9} calls  {_short(filename)}:{line}({name})")
        by_area: dict[str, float] = defaultdict(float)
        for (filename, _, name), entry in raw.items():
            by_area[_area(filename, name)] += entry[2]
        out("  By area (tottime, areas >= 0.5%):")
        for area, seconds in sorted(by_area.items(), key=lambda item: item[1], reverse=True):
            if seconds / total >= 0.005:
                out(f"    {seconds / total:6.1%}  {area}")


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _area(filename: str, name: str) -> str:
    if filename == "~":
        if "poll" in name:
            return "epoll wait (idle time and the syscall)"
        if "ssl" in name.lower():
            return "ssl (C: read/write/encrypt)"
        if "socket" in name or "send" in name or "recv" in name:
            return "socket syscalls (C)"
        return "other builtins (C)"
    for area in ("mqtt_ingest/", "amqtt/", "asyncio/"):
        if area in filename:
            return area + Path(filename).name
    return _short(filename)
