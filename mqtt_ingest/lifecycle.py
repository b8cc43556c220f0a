"""Process lifecycle shared by both services."""

from __future__ import annotations

import asyncio
import signal

__all__ = ["stop_on_signals"]


def stop_on_signals(*signals: signal.Signals) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (or ``signals``); call from inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signals or (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
