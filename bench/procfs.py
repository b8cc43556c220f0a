"""What the benchmarks read from ``/proc``: a process's CPU time, per thread too, its memory,
this process's I/O counters and the whole machine's busy time."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cpu_seconds", "memory_mb", "proc_io", "system_busy", "thread_cpu_seconds"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``: everything but idle, iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of a process's main thread ("main": the agent's event loop) and of all its
    other threads together ("threads": the buffer's, mostly). Python 3.11 does not name its
    threads for the kernel, so they are told apart by thread id. A thread that ends between two
    readings drops out of the difference; the agent's threads live as long as it does."""
    seconds = {"main": 0.0, "threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        name = "main" if task.name == str(pid) else "threads"
        seconds[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (MiB)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", math.nan), values.get("VmHWM", math.nan)


def proc_io() -> dict[str, int]:
    """This process's I/O counters (all threads)."""
    counters: dict[str, int] = {}
    with open("/proc/self/io") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            counters[key.strip()] = int(value)
    return counters
