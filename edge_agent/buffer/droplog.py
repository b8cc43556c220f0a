"""Drops logged once per burst (SPEC P4: "logged once per burst with the seq range").

A full buffer with ``drop-oldest`` at a low event rate drops one event per group commit; a line
per commit was a line per event (journald on the gateway's flash, and the operator's view lost).
Each (reason, topic) burst gets a line when it starts, a line at most every ``every`` seconds
while it lasts (what was dropped since the last one), and a closing line with the whole burst's
count and seq range once ``quiet`` seconds pass without a drop (noticed at the next drop, at the
next `flush`, or at close). The counts themselves are exact in the ``drops`` table meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mqtt_ingest.clock import Clock

__all__ = ["DropLog"]

log = logging.getLogger("edge_agent.buffer")


@dataclass
class _Burst:
    first: int
    last: int
    total: int
    last_drop_at: float
    logged_at: float
    since_logged: int = 0  # dropped after the last line
    since_first: int = 0  # the first seq of those


class DropLog:
    def __init__(self, clock: Clock, *, every: float = 60.0, quiet: float = 10.0) -> None:
        self._clock = clock
        self._every = every
        self._quiet = quiet
        self._bursts: dict[tuple[str, str], _Burst] = {}

    def record(self, reason: str, topic: str, events: int, first: int, last: int) -> None:
        """``events`` dropped on ``topic`` for ``reason``, seqs ``first`` to ``last``."""
        now = self._clock.time()
        key = (reason, topic)
        burst = self._bursts.get(key)
        if burst is not None and now - burst.last_drop_at > self._quiet:
            self._end(key, burst)
            burst = None
        if burst is None:
            log.warning(
                "buffer: dropping events on %r: %s (%d, seq %d..%d)",
                topic, reason, events, first, last,
            )  # fmt: skip
            self._bursts[key] = _Burst(first, last, events, now, now)
            return
        burst.last = last
        burst.total += events
        burst.last_drop_at = now
        if not burst.since_logged:
            burst.since_first = first
        burst.since_logged += events
        if now - burst.logged_at >= self._every:
            log.warning(
                "buffer: still dropping events on %r: %s (%d more, seq %d..%d; %d in this burst)",
                topic, reason, burst.since_logged, burst.since_first, last, burst.total,
            )  # fmt: skip
            burst.logged_at = now
            burst.since_logged = 0

    def flush(self, *, all_bursts: bool = False) -> None:
        """Close the bursts that have ended (every one with ``all_bursts``: at close)."""
        now = self._clock.time()
        for key, burst in list(self._bursts.items()):
            if all_bursts or now - burst.last_drop_at > self._quiet:
                self._end(key, burst)

    def _end(self, key: tuple[str, str], burst: _Burst) -> None:
        del self._bursts[key]
        if burst.since_logged:  # else the lines so far already cover the whole burst
            reason, topic = key
            log.warning(
                "buffer: dropped %d events on %r: %s (seq %d..%d, the whole burst)",
                burst.total, topic, reason, burst.first, burst.last,
            )  # fmt: skip
