"""How the benchmarks print: unbuffered lines, percentiles, cProfile reports, the closing
summary table and the total time."""

from __future__ import annotations

import contextlib
import cProfile
import io
import math
import pstats
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["out", "percentile", "print_profile", "scratch", "table", "yes"]

HEADER = ("measure", "figure", "reference", "ratio", "goal", "met")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def yes(met: bool) -> str:
    return "yes" if met else "NO"


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN for an empty one)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def print_profile(
    source: Path | cProfile.Profile, title: str, orders: Sequence[tuple[str, int]]
) -> None:
    """A blank line, ``title``, then the stats of ``source`` (a profiler, or a file it dumped)
    once per ``(sort key, lines)`` of ``orders``."""
    report = io.StringIO()
    stats = pstats.Stats(str(source) if isinstance(source, Path) else source, stream=report)
    for key, lines in orders:
        stats.sort_stats(key).print_stats(lines)
    out(f"\n{title}")
    out(report.getvalue().rstrip())


@contextlib.contextmanager
def scratch(prefix: str, parent: Path | None) -> Iterator[Path]:
    """A temporary directory for a run's data (in ``parent``, else the system's), removed at the
    end; then the closing line with the run's total time."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as root:
        yield Path(root)
    out(f"\ntotal time {time.perf_counter() - started:.0f} s; temporary data removed")


def table(rows: Sequence[tuple[str, ...]]) -> None:
    """The summary: one row per measure, columns as in `HEADER`."""
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out(rule)
    out("| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |")
    out(rule)
    for row in rows:
        out("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    out(rule)
