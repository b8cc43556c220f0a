"""What the agent benchmarks send: distinct random 200-byte payloads over numbered topics."""

from __future__ import annotations

import os

__all__ = ["PAYLOAD_BYTES", "payloads", "topics"]

PAYLOAD_BYTES = 200


def topics(count: int) -> list[str]:
    """``sensors/s0/temperature`` ... ``sensors/s{count - 1}/temperature``."""
    return [f"sensors/s{n}/temperature" for n in range(count)]


def payloads(count: int = 64) -> list[bytes]:
    """Distinct random 200-byte payloads: nothing compresses or deduplicates them."""
    return [os.urandom(PAYLOAD_BYTES) for _ in range(count)]
