"""Capped exponential backoff with full jitter, for every retry loop of both services.

AWS architecture blog, "Exponential Backoff And Jitter": attempt n waits
``uniform(0, min(cap, initial * 2**n))`` seconds, so that many clients that failed together do
not retry together.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """``delay(n)`` for a caller that counts its attempts; `next_delay` / `reset` for one that
    lets the backoff count its consecutive failures."""

    initial: float = 0.5
    cap: float = 30.0
    failures: int = 0
    """Consecutive failures so far (`next_delay` counts them, `reset` clears them)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {self.initial}, {self.cap}")

    def ceiling(self, attempt: int) -> float:
        # min() before the power would overflow a float after ~1000 attempts.
        return min(self.cap, self.initial * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return self.ceiling(attempt) * rng()

    def next_delay(self, rng: Callable[[], float] = random.random) -> float:
        """The delay after one more failure."""
        delay = self.delay(self.failures, rng)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
