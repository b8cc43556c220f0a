"""Process lifecycle shared by both services."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["being_cancelled", "cancel_until_done", "drop_outcome", "reader_gone", "stop_on_signals"]


def stop_on_signals(*signals: signal.Signals) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (or ``signals``); call from inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signals or (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def cancel_until_done(
    tasks: Iterable[asyncio.Task[Any]], *, again_every: float = 1.0
) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling those still running again every
    ``again_every`` seconds. Exceptions stay in the tasks (for their task group to collect).

    One cancellation is not always enough: on Python 3.11, ``asyncio.wait_for`` (inside aio-pika,
    aiormq, nats-py and aiomqtt) returns the awaited call's result instead of raising when the
    cancellation lands as the call completes, and a task looping over such calls carries on, so
    a task group waiting for it waits for ever. Cancelling again can cut short a task's own
    clean-up after the first cancellation: only for tasks whose clean-up is brief.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_every)


def being_cancelled() -> bool:
    """Whether the current task was asked to stop. A CancelledError caught while it was not
    came from within an awaited call (aiormq fails the calls it awaits that way when its
    connection closes): a failure of that call, not the end of the task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def drop_outcome(future: asyncio.Future[Any]) -> None:
    """Done callback of a future whose outcome nobody awaits any more (a call given up on, a
    read no longer needed): its exception, if any, counts as retrieved, so it is not logged as
    "never retrieved"."""
    if not future.cancelled():
        future.exception()


def reader_gone() -> int:
    """For a command whose stdout reader went away (`... | head`: it has all it wants): no
    traceback, and none at exit either (the interpreter flushes stdout once more). Returns 0."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
