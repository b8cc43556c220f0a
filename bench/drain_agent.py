"""bench.drain's agent measured: one drain of a copied backlog to Mosquitto (raw) or through the
sink into the core queue (batch), for (a)-(c), and the agent's RSS idle, the reference of (c)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.drain_backlog import buffer_empty, copy_backlog, core_count, read_only
from bench.drain_config import Pki, write_agent_config
from bench.drain_processes import Process, make_dir, online_at, start_agent
from bench.procfs import cpu_seconds, memory_mb, thread_cpu_seconds
from bench.report import out

__all__ = ["Drain", "agent_drain", "idle_rss"]


@dataclass(frozen=True)
class Drain:
    events: int
    seconds: float
    client_cpu: float  # seconds of CPU of the agent or bare client over the drain
    server_cpu: float  # of Mosquitto or the sink
    peak_rss_mb: float = math.nan  # max VmRSS sampled during the drain
    hwm_mb: float = math.nan  # VmHWM at the end
    client_threads: dict[str, float] = field(default_factory=dict)  # the agent's CPU per thread

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def agent_drain(
    root: Path,
    backlog: Path,
    pki: Pki,
    server: Process,
    core: Path | None,
    events: int,
    args: argparse.Namespace,
    profile: Path | None = None,
) -> Drain:
    """Copy the backlog, start the agent against ``server``, wait until every event is gone from
    its buffer (raw) or in the core queue ``core`` (batch)."""
    data = root / "data"
    copy_backlog(backlog, data)
    config = write_agent_config(root, data, pki, server.port, args, raw=core is None)
    server_cpu = cpu_seconds(server.pid)
    agent = await start_agent(config, root / "agent.log", profile)
    try:
        agent_cpu = cpu_seconds(agent.pid)
        threads = thread_cpu_seconds(agent.pid)
        watched = read_only(core) if core is not None else read_only(data / "buffer.db")
        peak = 0.0
        deadline = time.monotonic() + args.timeout
        try:
            while True:
                peak = max(peak, memory_mb(agent.pid)[0])
                done = core_count(watched) >= events if core is not None else buffer_empty(watched)
                if done:
                    ended = time.time()
                    break
                if agent.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not drain:\n{agent.log()[-3000:]}")
                await asyncio.sleep(0.01)
            if core is not None and core_count(watched) != events:
                out(f"  WARNING: {core_count(watched)} events in the core queue, sent {events}")
        finally:
            watched.close()
        agent_cpu = cpu_seconds(agent.pid) - agent_cpu
        threads = {
            name: used - threads.get(name, 0.0)
            for name, used in thread_cpu_seconds(agent.pid).items()
        }
        server_cpu = cpu_seconds(server.pid) - server_cpu
        hwm = memory_mb(agent.pid)[1]
        started = online_at(agent)
        if started is None:
            raise RuntimeError(f"no 'online' line in the agent's log:\n{agent.log()[-3000:]}")
    finally:
        status = await agent.stop()
    if status != 0:
        out(f"  WARNING: the agent exited with status {status}")
    link = json.loads((data / "link.json").read_text())
    if link["delivered"] != events:
        out(f"  WARNING: the agent reports {link['delivered']} delivered, expected {events}")
    shutil.rmtree(data)
    return Drain(events, ended - started, agent_cpu, server_cpu, peak, hwm, threads)


async def idle_rss(root: Path, pki: Pki, sink: Process, args: argparse.Namespace) -> float:
    """VmRSS of an agent with an empty buffer, 2 s after it came online to the sink."""
    make_dir(root)
    config = write_agent_config(root, root / "data", pki, sink.port, args, raw=False)
    agent = await start_agent(config, root / "agent.log")
    try:
        deadline = time.monotonic() + 30
        while online_at(agent) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the idle agent did not come online:\n{agent.log()[-3000:]}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        return memory_mb(agent.pid)[0]
    finally:
        await agent.stop()
