"""Events for the SQLite buffer's own tests (tests/test_buffer*.py, tests/test_power_loss.py): a
`NewEvent` with the defaults those tests take for granted, its payload first and any other field
by keyword."""

from __future__ import annotations

from typing import Literal

from edge_agent.buffer import NewEvent

__all__ = ["event"]


def event(
    payload: bytes = b"x",
    *,
    topic: str = "t",
    priority: int = 0,
    on_full: Literal["reject", "drop-oldest"] = "reject",
    ttl: float | None = None,
    qos: int = 1,
) -> NewEvent:
    return NewEvent(topic, payload, qos, priority, 1_700_000_000_000, ttl, on_full)
