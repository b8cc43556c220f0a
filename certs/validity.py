"""Validity periods of what the PKI signs, and the wall clock they are taken from."""

from __future__ import annotations

import datetime as dt
import math
import time

from certs.errors import PkiError

__all__ = ["BACKDATE", "now", "validity", "wait_until"]

BACKDATE = dt.timedelta(minutes=5)  # a certificate's start, before now


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def wait_until(second: int) -> None:
    """Return once the wall clock reads ``second`` or later."""
    while (left := second - time.time()) > 0:
        time.sleep(left)


def validity(not_before: dt.datetime | None, days: float) -> tuple[dt.datetime, dt.datetime]:
    """(start, end) of ``days`` from ``not_before``, or from 5 minutes ago (a verifier whose
    clock is a little behind must not find it not yet valid): then it must end after now."""
    if not (days > 0 and math.isfinite(days)):
        raise PkiError(f"validity must be a positive number of days, got {days}")
    start = not_before if not_before is not None else now() - BACKDATE
    if start.tzinfo is None:
        raise PkiError("not_before must carry a time zone")
    try:
        end = start + dt.timedelta(days=days)
    except OverflowError:
        raise PkiError(f"{days:g} days from {start:%Y-%m-%d} is out of range") from None
    if not_before is None and end <= now():
        raise PkiError(
            f"a validity of {days:g} days from {BACKDATE.seconds // 60} minutes ago (the"
            " backdating that spares verifiers whose clock is behind) has ended already"
        )
    return start, end
