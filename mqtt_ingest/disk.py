"""Free space on a filesystem, for the disk reserves of the agent's buffer and the sink's sqlite
core queue: SQLite on a filesystem full to the last byte cannot even delete or checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["free_bytes", "megabytes"]


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on ``directory``'s filesystem."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
