"""How the benchmarks print: unbuffered lines and the closing summary table."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["out", "table", "yes"]

HEADER = ("measure", "figure", "reference", "ratio", "goal", "met")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def yes(met: bool) -> str:
    return "yes" if met else "NO"


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
