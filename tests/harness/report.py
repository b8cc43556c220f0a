"""Fault tests print their figures (RELIABILITY: the evidence, not only the pass) and poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["figures", "until"]


def figures(name: str, **values: object) -> None:
    """One line of figures, shown by ``pytest -s`` and in the report of a failing test."""
    print(f"[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))  # noqa: T201


async def until(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> None:
    """Poll ``predicate`` (state outside this event loop: files, processes) until it holds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  # polling state another process or thread owns
            await asyncio.sleep(every)
