"""Named failpoints compiled into the code (STYLE 20, RELIABILITY "Harness").

``hit("drain.after_puback_before_delete")`` is a no-op unless that name is armed, either in-process
with `arm` or for a whole subprocess through the ``BRIDGE_FAILPOINTS`` environment variable::

    BRIDGE_FAILPOINTS="drain.before_publish=kill9@3,buffer.commit=sleep:0.5"

Actions: ``kill9`` (SIGKILL this process: a crash, no cleanup), ``raise`` (`FailpointError`),
``sleep:S`` (block for S seconds; `ahit` sleeps without blocking the loop). ``@N`` fires on the
N-th hit only (1-based), ``@N-M`` on the N-th to the M-th; without either every hit fires.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass

__all__ = [
    "ENV_VAR",
    "FailpointError",
    "active",
    "ahit",
    "arm",
    "disarm_all",
    "hit",
    "parse_spec",
]

ENV_VAR = "BRIDGE_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"failpoint {name!r} fired")
        self.name = name


@dataclass
class _Armed:
    action: str
    seconds: float = 0.0
    hits_from: int = 1
    hits_to: int | None = None  # None: no end
    hits: int = 0


_lock = threading.Lock()
_armed: dict[str, _Armed] = {}


def parse_spec(spec: str) -> dict[str, _Armed]:
    """Parse ``name=action[@N|@N-M]`` items separated by commas; raise ValueError naming a bad
    item."""
    result: dict[str, _Armed] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{ENV_VAR}: {item!r} is not name=action")
        hits_from, hits_to = 1, None
        if "@" in action:
            action, _, counts = action.rpartition("@")
            first, dash, last = counts.partition("-")
            bounds = (first, last) if dash else (first,)
            if not all(b.isdigit() and int(b) >= 1 for b in bounds) or int(bounds[-1]) < int(first):
                raise ValueError(
                    f"{ENV_VAR}: {item!r}: @N or @N-M needs positive whole numbers, N <= M"
                )
            hits_from, hits_to = int(first), int(bounds[-1])
        seconds = 0.0
        if action.startswith("sleep:"):
            try:
                seconds = float(action.removeprefix("sleep:"))
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {item!r}: sleep:S needs seconds") from None
            action = "sleep"
        if action not in {"kill9", "raise", "sleep"}:
            raise ValueError(f"{ENV_VAR}: {item!r}: action must be kill9, raise or sleep:S")
        result[name] = _Armed(action, seconds, hits_from, hits_to)
    return result


def arm(name: str, action: str) -> None:
    """Arm one failpoint in this process (``action`` as in the environment variable)."""
    with _lock:
        _armed.update(parse_spec(f"{name}={action}"))


def disarm_all() -> None:
    with _lock:
        _armed.clear()


def active() -> bool:
    """Whether any failpoint is armed (lets a hot path skip extra steps in production)."""
    return bool(_armed)


def _fire(name: str) -> _Armed | None:
    # Fast path: nothing armed is the production case and costs one dict lookup.
    if not _armed:
        return None
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return None
        armed.hits += 1
        last = armed.hits_to
        if armed.hits < armed.hits_from or (last is not None and armed.hits > last):
            return None
    if armed.action == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    if armed.action == "raise":
        raise FailpointError(name)
    return armed


def hit(name: str) -> None:
    """Fire failpoint ``name`` if armed; sleeps block the calling thread."""
    armed = _fire(name)
    if armed is not None:
        time.sleep(armed.seconds)


async def ahit(name: str) -> None:
    """Fire failpoint ``name`` if armed; sleeps yield to the event loop."""
    armed = _fire(name)
    if armed is not None:
        await asyncio.sleep(armed.seconds)


_armed.update(parse_spec(os.environ.get(ENV_VAR, "")))
