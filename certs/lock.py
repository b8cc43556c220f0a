"""``DIR/.lock``: the flock that serializes the runs on one PKI directory.

Writers (issuing, revoking, the PKI's own CRL) hold it exclusively, created if missing. Readers
(``list``, ``crl --out`` on a PKI directory that cannot be written) hold it shared through a
read-only descriptor, so they work on read-only media (an offline CA mounted read-only) and
still wait for a writer on another mount of the same directory to finish.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from certs.errors import ReadOnlyPki
from certs.files import make_directory

__all__ = ["exclusive", "shared", "writable"]

_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def writable(directory: Path) -> bool:
    """Whether this process may create files in ``directory`` (False on a read-only mount, even
    as root, who ignores the mode bits)."""
    effective = os.access in os.supports_effective_ids
    return os.access(directory, os.W_OK, effective_ids=effective)


@contextlib.contextmanager
def exclusive(directory: Path, action: str) -> Iterator[None]:
    """Hold ``.lock`` exclusively (waited for) around a change to the directory; `ReadOnlyPki`
    naming ``action`` if the directory cannot be written, or cannot be created if missing. Not
    re-entrant: a second flock on a new descriptor would wait for itself."""
    try:
        make_directory(directory)
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            why = f"{exc.filename}: {exc.strerror}"
            raise ReadOnlyPki(directory, action, why, missing=True) from exc
        raise
    if not writable(directory):
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
        raise ReadOnlyPki(
            directory, action, os.strerror(errno.EROFS if read_only else errno.EACCES)
        )
    try:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise ReadOnlyPki(directory, action, f"{exc.filename}: {exc.strerror}") from exc
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def shared(directory: Path) -> Iterator[None]:
    """Hold ``.lock`` shared (waited for) while reading the directory, without writing to it.
    Without a ``.lock`` to open (never written, or not readable by this user) it reads
    unlocked: every file it reads is replaced atomically, so it sees each whole, old or new."""
    try:
        fd = os.open(directory / ".lock", os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
