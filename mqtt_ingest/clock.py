"""The clock seam (STYLE 10): wall-clock time only for JWT ``iat``/``exp``, monotonic for timers.

Code that needs either takes a `Clock`; tests inject `FakeClock` instead of touching system time.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the Unix epoch (wall clock; may jump)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts and intervals)."""
        ...


class SystemClock:
    """The real clocks of the host."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; ``skew`` shifts the wall clock alone.

    ``advance`` moves both clocks (time passing); ``skew`` moves the wall clock only (a device whose
    clock is wrong), which is what JWT leeway tests need.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards; use skew() for a wrong wall clock")
        self._wall += seconds
        self._mono += seconds

    def skew(self, seconds: float) -> None:
        self._wall += seconds
