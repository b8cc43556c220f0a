"""Files of the PKI directory, written so that a crash leaves the old file or the whole new one
(STYLE 14): a temporary file in the same directory, fsynced, then linked or renamed into place,
and the directory fsynced."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from certs.errors import OutputExists
from mqtt_ingest import failpoints
from mqtt_ingest.disk import fsync_directory, write_temporary

__all__ = ["refuse_existing", "replace_file", "write_new"]


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An `OSError` while writing ``path`` names ``path``: a failed write or fsync names no
    file at all, and the temporary file's name would mean nothing to the operator."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file ``path``; never replaces an existing one.

    Written to a temporary file in the same directory, fsynced, then hard-linked to its name:
    ``link`` fails if the name exists, so two concurrent writers cannot clobber each other, and a
    crash leaves either no file or the whole file, never a truncated key.
    """
    with _naming(path):
        make_directory(path.parent)
        temporary = write_temporary(path, data, mode)
        try:
            failpoints.hit("certs.write_new.before_link")
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise OutputExists(path) from None
            failpoints.hit("certs.write_new.after_link")
        finally:
            temporary.unlink()
        fsync_directory(path.parent)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, fsync directory)."""
    with _naming(path):
        make_directory(path.parent)
        temporary = write_temporary(path, data, mode)
        try:
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)


GROUP_OTHERS_WRITE = 0o022
"""Taken off the directories the tool creates, whatever the umask: with ``umask 000`` they were
world-writable, and anyone could rename a CA certificate and key of their own over the PKI's
(or replace ``index.json``, ``crl.pem``): later certificates would be signed by their key. Only
taken off: a stricter umask (077) keeps them private."""


def make_directory(path: Path) -> None:
    """Create ``path`` and its missing parents, none writable by group or others."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        with contextlib.suppress(OSError):  # created and changed by someone else meanwhile
            os.chmod(created, stat.S_IMODE(os.stat(created).st_mode) & ~GROUP_OTHERS_WRITE)


def refuse_existing(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.exists():
            raise OutputExists(path)
