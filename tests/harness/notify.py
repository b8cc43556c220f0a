"""A stand-in for systemd's notification socket: a real ``AF_UNIX`` ``SOCK_DGRAM`` socket that
records every sd_notify datagram with its arrival time (``time.monotonic()``)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Notification", "NotifySocket"]


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class NotifySocket:
    """``with NotifySocket(path) as sd:`` (or ``NotifySocket()`` for an abstract ``@name``);
    pass ``sd.address`` as ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path | None = None) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"bridge-test-{uuid.uuid4().hex}"
            self._socket.bind("\0" + name)
            self.address = "@" + name
        else:
            self._socket.bind(str(path))
            self.address = str(path)
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self._received.append(Notification(time.monotonic(), fields))

    @property
    def received(self) -> list[Notification]:
        with self._lock:
            return list(self._received)

    def with_field(self, key: str, value: str | None = None) -> list[Notification]:
        """Every notification carrying ``key`` (with ``value``, if given)."""
        return [
            n
            for n in self.received
            if key in n.fields and (value is None or n.fields[key] == value)
        ]

    def pings(self) -> list[float]:
        """Arrival times of the ``WATCHDOG=1`` pings."""
        return [n.at for n in self.with_field("WATCHDOG", "1")]

    def wait_for(
        self, predicate: Callable[[Notification], bool], timeout: float = 30.0
    ) -> Notification:
        """The first notification (already received or to come) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for notification in self.received:
                if predicate(notification):
                    return notification
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching notification within {timeout}s; got: "
                    f"{[n.fields for n in self.received][-20:]}"
                )
            time.sleep(0.05)
