"""Keep the long-running agent's resident memory close to what it uses (glibc only).

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which the encoded envelopes and fetched pages of a drain (tens of KiB each, allocated and freed
over and over) come from the heap and stay resident once freed. A fixed threshold of 64 KiB
keeps them in their own mappings, given back to the system when freed: with 1,000,000 events
buffered, the agent's peak RSS during a drain was ~3 MB lower with the same drain rate
(docs/benchmarks.md, "Drain"). The same as ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment.

Only for the `edge-agent run` process: the Python API runs inside its user's process, whose
allocator settings are not ours to change.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["MMAP_THRESHOLD", "tune_malloc"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD`; False (and nothing changed) on another C
    library, or when ``MALLOC_MMAP_THRESHOLD_`` is set already (the operator's choice wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)  # the interpreter's own symbols, the C library's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  # only glibc has it (musl has a no-op mallopt)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
        return False
    return True
