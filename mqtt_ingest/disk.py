"""Files on disk: free space, for the disk reserves of the agent's buffer and the sink's sqlite
core queue (SQLite on a filesystem full to the last byte cannot even delete or checkpoint), and
the pieces of a crash-safe write (STYLE 14): a file fsynced before it is named, a directory
fsynced after."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

__all__ = ["free_bytes", "fsync_directory", "megabytes", "temporaries", "write_temporary"]


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on ``directory``'s filesystem."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """A new file next to ``path`` (a dot name) holding ``data``, with ``mode`` whatever the
    umask, fsynced; removed again if writing it fails. The caller links or renames it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def temporaries(path: Path, mode: int | None = None) -> list[Path]:
    """The files `write_temporary` made for ``path`` that are still there (a process killed
    before it removed one): regular files named exactly as it names them (``mkstemp``'s eight
    random characters), with permission bits ``mode`` if given, nothing else."""
    name = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no such directory, or not readable: none to be seen
        return []
    return sorted(
        Path(entry.path)
        for entry in entries
        if name.fullmatch(entry.name)
        and entry.is_file(follow_symlinks=False)
        and (mode is None or stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) == mode)
    )


def fsync_directory(directory: Path) -> None:
    """Make the names changed in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
