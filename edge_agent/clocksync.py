"""Whether an NTP client keeps this host's clock synchronised (``edge-agent doctor``'s clock).

The kernel knows: adjtimex(2), read-only with ``modes`` 0 and allowed without privilege, reports
the clock's maximum error, which an NTP client (chronyd, ntpd, systemd-timesyncd) keeps small and
which the kernel lets grow to 16 s (setting ``STA_UNSYNC``) once nothing updates it. systemd's
``timedatectl`` "NTPSynchronized" is that same test, maximum error under 16 s: ``STA_UNSYNC``
alone is not one, chronyd may keep it set to stop the kernel writing the RTC. A container shares
its host's clock and sees the host's state. Where adjtimex cannot be called (not Linux, a seccomp
filter), ``timedatectl`` is asked; where nothing answers, the state is unknown, with the reasons.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from dataclasses import dataclass

__all__ = ["ClockSync", "clock_sync", "kernel_sync", "parse_timedatectl", "timedatectl_sync"]

UNSYNCED_MAX_ERROR_US = 16_000_000
"""The kernel's ceiling for the maximum error (NTP_PHASE_LIMIT, microseconds): reached, the clock
is not synchronised."""

TIMEDATECTL_TIMEOUT = 5.0


@dataclass(frozen=True)
class ClockSync:
    synchronised: bool | None  # None: nothing could tell
    detail: str


def clock_sync() -> ClockSync:
    """This host's NTP synchronisation, from the kernel or else from ``timedatectl``."""
    try:
        maxerror, esterror = _adjtimex()
    except OSError as exc:
        kernel = f"adjtimex: {exc.strerror or exc}"
    else:
        return kernel_sync(maxerror, esterror)
    systemd = timedatectl_sync()
    if isinstance(systemd, ClockSync):
        return systemd
    return ClockSync(None, f"NTP synchronisation unknown ({kernel}; {systemd})")


def kernel_sync(maxerror_us: int, esterror_us: int) -> ClockSync:
    """What adjtimex(2)'s maximum and estimated errors (microseconds) say."""
    if maxerror_us >= UNSYNCED_MAX_ERROR_US:
        return ClockSync(
            False,
            f"not synchronised: the kernel's maximum error is {maxerror_us / 1e6:.0f} s, its"
            " ceiling (no NTP client has updated this clock lately)",
        )
    return ClockSync(
        True,
        f"NTP synchronised (kernel: estimated error {_seconds(esterror_us)}, at most"
        f" {_seconds(maxerror_us)})",
    )


def parse_timedatectl(text: str) -> bool | None:
    """The synchronisation ``timedatectl`` reports: ``show`` (``NTPSynchronized=yes``, systemd
    239 and later) or ``status`` (``System clock synchronized: yes``; ``NTP synchronized: yes``
    before 239). None if the text says neither."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if sep and key.strip() in (
            "NTPSynchronized",
            "System clock synchronized",
            "NTP synchronized",
        ):
            answer = value.strip()
            if answer in ("yes", "no"):
                return answer == "yes"
    return None


def _seconds(microseconds: int) -> str:
    return (
        f"{microseconds / 1000:.1f} ms"
        if microseconds < 1_000_000
        else f"{microseconds / 1e6:.1f} s"
    )


class _Timex(ctypes.Structure):
    """``struct timex`` up to the fields read, the same in every Linux ABI and libc (the legacy
    ``adjtimex`` symbol on 32-bit time64 glibc too); the rest, whose size differs, is room for
    what the kernel writes after them."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_byte * 512),
    ]


def _adjtimex() -> tuple[int, int]:
    """(maximum error, estimated error) in microseconds; OSError if adjtimex cannot be called."""
    try:
        call = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        raise OSError("not available on this system") from None
    call.argtypes = [ctypes.POINTER(_Timex)]
    call.restype = ctypes.c_int
    timex = _Timex()  # modes 0: read only
    if call(ctypes.byref(timex)) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return timex.maxerror, timex.esterror


def timedatectl_sync() -> ClockSync | str:
    """What ``timedatectl`` says, or why it could not say."""
    why = "timedatectl: no answer"
    for command in (["timedatectl", "show"], ["timedatectl", "status"]):
        try:
            done = subprocess.run(  # noqa: S603  # a fixed command
                command,
                capture_output=True,
                text=True,
                timeout=TIMEDATECTL_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            return "timedatectl: not installed"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"timedatectl: {exc}"
        synchronised = parse_timedatectl(done.stdout)
        if synchronised is not None:
            state = "NTP synchronised" if synchronised else "not synchronised"
            return ClockSync(synchronised, f"{state} (timedatectl)")
        first = (done.stderr.strip() or done.stdout.strip()).splitlines()
        why = f"timedatectl: {first[0] if first else f'exit status {done.returncode}'}"
    return why
