"""Reading the buffer without its lock, for the operator's commands (`edge-agent status`,
`buffer peek|export|dead`) while the agent runs: read-only connections, `BufferError` when there
is no buffer or it cannot be read."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_agent.buffer.drain import _dead_letters, _epoch, _next_events, _stats
from edge_agent.buffer.model import DB_NAME, BufferError, BufferStats, DeadLetter, StoredEvent, T

__all__ = ["inspect", "read_dead_letters", "read_epoch", "read_events"]


def _open_read_only(directory: Path) -> tuple[sqlite3.Connection, Path]:
    """A read-only connection to the buffer in ``directory``, for the operator's commands;
    `BufferError` if there is none or it cannot be read."""
    path = directory / DB_NAME
    try:
        if not path.exists():
            raise BufferError(f"no buffer at {path}")
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
    except (OSError, sqlite3.DatabaseError) as exc:
        raise _unreadable(path, exc) from None
    try:
        db.execute("PRAGMA user_version")  # connecting alone opens nothing yet
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _unreadable(path, exc) from None
    return db, path


def _unreadable(path: Path, exc: OSError | sqlite3.DatabaseError) -> BufferError:
    hint = ""
    if isinstance(exc, PermissionError) or "unable to open" in str(exc):
        hint = " (run this as the agent's user, or as root)"
    return BufferError(f"cannot read the buffer {path}: {exc}{hint}")


def _read_only(directory: Path, function: Callable[..., T], *args: object) -> T:
    """``function(db, *args)`` on a read-only connection to the buffer in ``directory``;
    `BufferError` if there is none or it cannot be read."""
    db, path = _open_read_only(directory)
    try:
        return function(db, *args)
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    finally:
        db.close()


def inspect(directory: Path) -> BufferStats:
    """Read-only statistics of the buffer in ``directory``; works while the agent runs."""
    return _read_only(directory, _stats)


def read_epoch(directory: Path) -> str:
    """The buffer's epoch (the middle of its event ids), read-only and at once: `inspect`
    counts every event for it (seconds for a million)."""
    epoch = _read_only(directory, _epoch)
    if epoch is None:
        raise BufferError(f"the buffer {directory / DB_NAME} has no epoch")
    return epoch


def read_dead_letters(directory: Path, *, limit: int = -1) -> list[DeadLetter]:
    """The dead letters in seq order, read-only (``buffer dead``), at most ``limit`` (-1: all).
    Raises `BufferError` if the buffer cannot be read."""
    return _read_only(directory, _dead_letters, limit)


def read_events(
    directory: Path, *, limit: int | None = None, topic_filter: Callable[[str], bool] | None = None
) -> Iterator[StoredEvent]:
    """Buffered events in drain order, read-only (for ``buffer peek`` / ``export``); at most
    ``limit`` of them. Raises `BufferError` if the buffer cannot be read.

    Read in pages, one short statement each: the consumer may be slow (``export | less``), and
    a statement open all that time kept the agent's WAL from being checkpointed (it grew by all
    that the agent wrote meanwhile).
    """
    if limit is not None and limit <= 0:
        return
    db, path = _open_read_only(directory)
    try:
        after: tuple[int, int] | None = None
        taken = 0
        while page := _next_events(db, _READ_PAGE, after, frozenset(), None, None):
            for event in page:
                if topic_filter is not None and not topic_filter(event.topic):
                    continue
                yield event
                taken += 1
                if limit is not None and taken >= limit:
                    return
            after = (page[-1].priority, page[-1].seq)
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    finally:
        db.close()


_READ_PAGE = 500
