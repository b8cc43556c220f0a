"""Uplink test material shared by the uplink fault tests: a fresh device and its agent config
against a sink, a buffer filled beforehand, what reached the sink's core queue, the link's state,
the losses counted against a poison suspect, and an agent whose acknowledgements are held."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.config import AgentConfig
from edge_agent.link import LinkState, read_link_status
from edge_agent.uplink import Uplink
from tests.harness.agent import uplink_section, write_config
from tests.harness.chaos import ChaosProxy, ChaosProxyFactory, Direction
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.report import until
from tests.harness.sink import running_sink as sink
from tests.test_uplink import TOPICS

__all__ = [
    "acks_held",
    "configure",
    "counted_losses",
    "link",
    "new_device",
    "preload",
    "stored_payloads",
]


def new_device(pki: Pki, prefix: str) -> DeviceCreds:
    return pki.device(f"{prefix}-{uuid.uuid4().hex[:6]}")


def configure(
    tmp_path: Path,
    pki: Pki,
    device: DeviceCreds,
    port: int,
    *,
    extra: str = "",
    token: str = "",
    host: str = "localhost",
) -> Path:
    kwargs = {"token": token} if token else {}
    return write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, host=host, extra=extra, **kwargs),
        topics=TOPICS,
    )


async def preload(
    config: AgentConfig, count: int, topics: tuple[str, ...] = ("sensors/t",), size: int = 0
) -> None:
    """``count`` events in the buffer, committed by an agent without its uplink; payload = the
    number, padded with spaces to ``size`` bytes (`stored_payloads` reads it back)."""
    async with Agent(config.model_copy(update={"uplink": None})) as agent:
        for i in range(count):
            await agent.publish(topics[i % len(topics)], f"{i}".encode().ljust(size))


def stored_payloads(core: Path) -> list[int]:
    return [int(m.payload) for _, m in read_messages(core)]


def link(config: AgentConfig) -> LinkState | None:
    status = read_link_status(config.agent.data_dir)
    return None if status is None else status.state


def counted_losses(data_dir: Path, seq: int) -> int:
    """The losses the buffer keeps against event ``seq`` as poison (read-only, beside the agent)."""
    db = sqlite3.connect((data_dir / "buffer.db").resolve().as_uri() + "?mode=ro", uri=True)
    try:
        row = db.execute("SELECT losses FROM suspects WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    return 0 if row is None else int(row[0])


@contextlib.asynccontextmanager
async def acks_held(
    tmp_path: Path, pki: Pki, proxies: ChaosProxyFactory, prefix: str, extra: str
) -> AsyncIterator[tuple[Agent, Uplink, ChaosProxy]]:
    """A sink, the chaos proxy in front of it and an agent connected through the proxy (uplink
    settings ``extra``), which then holds whatever the sink sends: PUBACKs, PINGRESPs."""
    device = new_device(pki, prefix)
    async with sink(tmp_path, pki) as server:
        proxy = await proxies("127.0.0.1", server.port)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole(direction=Direction.DOWNSTREAM)
            yield agent, uplink, proxy
