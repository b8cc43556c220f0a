"""Talking to systemd without libsystemd: ``sd_notify`` datagrams and the watchdog (SPEC §5).

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET`` (a file system path, or ``@name``
for a socket in the abstract namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and
perhaps ``$WATCHDOG_PID``). A service sends newline-separated ``KEY=VALUE`` datagrams to that
socket: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at
least once per ``WATCHDOG_USEC``, ``RELOADING=1`` / ``READY=1`` around a reload and
``STOPPING=1`` when it begins to shut down (sd_notify(3)).

`Notifier` sends them; without ``$NOTIFY_SOCKET`` (not started by systemd) every method is a
no-op, so the services call it unconditionally. `Supervisor` is the asyncio side: a task that
pings the watchdog from the event loop at half the watchdog period, so a blocked loop stops the
pings and systemd restarts the service, and keeps ``STATUS=`` current::

    async with Supervisor(Notifier.from_environment()) as supervisor:
        async with Agent(config) as agent:
            supervisor.ready(lambda: agent_status(agent))   # READY=1, then STATUS= updates
            await stop.wait()
            supervisor.stopping()                           # STOPPING=1

A reload (SIGHUP) is announced with ``supervisor.reloading()`` before and ``supervisor.ready()``
after it (systemd shows the unit as "reloading" in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from mqtt_ingest import failpoints

__all__ = [
    "STALL_FAILPOINT",
    "Notifier",
    "ServiceStatus",
    "Supervisor",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

STALL_FAILPOINT = "systemd.watchdog_tick"
"""Hit on the event loop before every watchdog ping. Armed with ``sleep:S`` it blocks the loop
itself (a synchronous sleep), which is what a real hang looks like to systemd."""

STATUS_EVERY = 5.0  # seconds: a changed status line is sent at most this often...
TICK = 1.0  # ...but a changed state (link, backend) within this long


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What ``systemctl status`` shows. ``state`` is the coarse part (link or backend state):
    a change there is sent at once; ``text`` changes (counters) at most every few seconds."""

    state: str
    text: str


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog is asked of
    this process: unset or invalid ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` naming another one
    (sd_watchdog_enabled(3))."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


class Notifier:
    """Sends sd_notify datagrams to ``address`` (None: every call is a no-op).

    Sending never raises and never blocks: the socket is non-blocking, and a full or vanished
    socket loses that one message (logged once), as libsystemd's sd_notify does.
    """

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog
        """Seconds between watchdog pings, or None when systemd watches nothing."""
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning(
                "systemd: ignoring NOTIFY_SOCKET=%r (neither a path nor @abstract)", address
            )
            address = None
        return cls(address, watchdog_interval(env) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines (keys upper-cased); True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8", "replace"), target)
        except OSError as exc:
            if not self._failing:
                # Once per run of failures: a watchdog ping every few seconds must not flood.
                log.warning("systemd: cannot notify %s: %s", self.address, _why(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("systemd: notifications to %s go through again", self.address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = _one_line(status)
        return self.send(**fields)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match this to its reload.
        return self.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        return self.send(STATUS=_one_line(text))

    def ping(self) -> bool:
        return self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
        return "the socket is full (message dropped)"
    return exc.strerror or str(exc)


class Supervisor:
    """Watchdog pings and status updates from a task on the event loop (see the module doc).

    ``async with`` starts the task when there is anything to do (a notify socket); leaving the
    block stops it and closes the socket. Status comes from ``ready(status)``: a cheap,
    synchronous callable, polled every second.
    """

    def __init__(self, notifier: Notifier, *, status_every: float = STATUS_EVERY) -> None:
        self.notifier = notifier
        self._status_every = status_every
        self._status: Callable[[], ServiceStatus] | None = None
        self._sent: ServiceStatus | None = None
        self._sent_at = 0.0
        self._stopping = False
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Supervisor:
        self._stack.callback(self.notifier.close)
        if self.notifier.enabled:
            if self.notifier.watchdog is not None:
                log.info("systemd: watchdog ping every %.1fs", self.notifier.watchdog)
            tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            task = tasks.create_task(self._run(), name="mqtt_ingest.systemd.supervisor")
            self._stack.callback(task.cancel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def ready(self, status: Callable[[], ServiceStatus] | None = None) -> None:
        """``READY=1`` with the current status; ``status`` (kept) is polled from now on."""
        if status is not None:
            self._status = status
        current = self._current()
        self.notifier.ready(current.text if current is not None else None)
        self._remember(current)

    def reloading(self) -> None:
        """``RELOADING=1``; call `ready` when the reload is done."""
        self.notifier.reloading()

    def reload(self, apply: Callable[[], None]) -> None:
        """``RELOADING=1``, ``apply()``, then ``READY=1`` whatever ``apply`` did."""
        self.reloading()
        try:
            apply()
        finally:
            self.ready()

    def stopping(self, status: str = "stopping") -> None:
        """``STOPPING=1``: from now on the status stays ``status``; watchdog pings go on."""
        self._stopping = True
        self.notifier.stopping(status)

    def _current(self) -> ServiceStatus | None:
        if self._status is None:
            return None
        try:
            return self._status()
        except Exception:  # a broken status line must not take the watchdog down
            log.exception("systemd: computing the status line failed")
            return None

    def _remember(self, status: ServiceStatus | None) -> None:
        self._sent = status
        self._sent_at = time.monotonic()

    async def _run(self) -> None:
        watchdog = self.notifier.watchdog
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if watchdog is not None and now >= next_ping:
                failpoints.hit(STALL_FAILPOINT)
                self.notifier.ping()
                next_ping = time.monotonic() + watchdog
            if not self._stopping and self._status is not None:
                self._update_status(now)
            delay = TICK if watchdog is None else min(TICK, next_ping - time.monotonic())
            await asyncio.sleep(max(0.0, delay))

    def _update_status(self, now: float) -> None:
        current = self._current()
        if current is None or current == self._sent:
            return
        if (
            self._sent is None
            or current.state != self._sent.state
            or now - self._sent_at >= self._status_every
        ):
            self.notifier.status(current.text)
            self._remember(current)
