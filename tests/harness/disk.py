"""A small real filesystem for full-disk tests (RELIABILITY F7): a tmpfs of a given size mounted
on a directory of the test's own, so SQLite meets a real ENOSPC, not a simulated limit."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(directory: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` bytes on ``directory`` (created) for the block. Mounting needs
    root (or CAP_SYS_ADMIN): as another user the test is skipped, as root (CI) a failed mount
    fails it, so that CI never silently loses these tests."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        problem = f"cannot mount a tmpfs for a full disk: {mounted.stderr.strip()}"
        if os.geteuid() == 0:
            pytest.fail(problem)
        pytest.skip(problem)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def fill(directory: Path, leave: int) -> Path:
    """Take the filesystem's free space down to about ``leave`` bytes with a file of zeros, as
    another process (logs, a core dump) would; returns the file, to delete for room again."""
    filler = directory / "filler"
    with filler.open("ab") as handle:
        while (room := free_bytes(directory) - leave) > 0:
            try:
                handle.write(bytes(min(room, 1 << 20)))
                handle.flush()
            except OSError:
                break
    return filler
