"""In-memory counters: the default `Metrics` and what tests read."""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Counters keyed by ``(name, reason)``; cheap enough for the hot path."""

    def __init__(self) -> None:
        self._values: Counter[tuple[str, str]] = Counter()

    def inc(self, name: str, amount: int = 1, reason: str = "") -> None:
        self._values[name, reason] += amount

    def get(self, name: str, reason: str | None = None) -> int:
        """One counter, or with ``reason=None`` the sum over all reasons."""
        if reason is not None:
            return self._values[name, reason]
        return sum(v for (n, _), v in self._values.items() if n == name)

    def items(self) -> list[tuple[str, str, int]]:
        """Every counter as ``(name, reason, value)`` (reason "" for none), sorted."""
        return [(name, reason, value) for (name, reason), value in sorted(self._values.items())]

    def snapshot(self) -> dict[str, int]:
        """``name`` or ``name{reason}`` -> value."""
        return {
            (f"{name}{{{reason}}}" if reason else name): value
            for (name, reason), value in sorted(self._values.items())
        }
