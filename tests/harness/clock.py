"""A fake clock for JWT times (RELIABILITY "Harness": injected into minting and verification;
system time is never changed)."""

from __future__ import annotations

import time

__all__ = ["SkewedClock"]


class SkewedClock:
    """The system clock off by ``offset`` seconds, ticking (a device whose clock is wrong)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()
