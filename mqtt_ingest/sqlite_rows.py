"""Multi-row INSERTs, shared by the two SQLite writers (the agent's buffer, the sink's sqlite
core queue).

SQLite runs a multi-row INSERT in one step with the GIL released, where ``executemany`` or a
statement per row takes the GIL back for every row, so the event loop's thread and the database
thread hand it back and forth per event. Chunk sizes are powers of two: only a handful of
statements are ever prepared, and they stay in the connection's statement cache.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

__all__ = ["insert_rows"]


def insert_rows(
    db: sqlite3.Connection,
    statement: Callable[[int], str],
    params: Sequence[object],
    width: int,
    *,
    most: int,
) -> None:
    """Insert the rows of ``params`` (``width`` values each, flattened) with ``statement(rows)``,
    an INSERT of ``rows`` placeholder groups, in chunks of at most ``most`` rows."""
    start = 0
    remaining = len(params) // width
    while remaining:
        rows = min(most, 1 << (remaining.bit_length() - 1))
        db.execute(statement(rows), params[start * width : (start + rows) * width])
        start += rows
        remaining -= rows
