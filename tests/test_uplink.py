"""The uplink against a real sink (in process, sqlite core queue) over mutual TLS with JWTs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect, read_events
from edge_agent.uplink import LinkState, read_link_status
from tests.harness.agent import uplink_section, write_config
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink

pytestmark = pytest.mark.integration

TOPICS = """
[[topics]]
filter = "alarms/#"
qos = 2
priority = 9

[[topics]]
filter = "bulk/#"
qos = 0

[[topics]]
filter = "#"
qos = 1
"""


def agent_config(
    tmp_path: Path, pki: Pki, device: DeviceCreds, port: int, *, extra: str = "", token: str = ""
) -> Path:
    kwargs = {"token": token} if token else {}
    return write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, extra=extra, **kwargs),
        topics=TOPICS,
    )


def new_device(pki: Pki, prefix: str) -> DeviceCreds:
    return pki.device(f"{prefix}-{uuid.uuid4().hex[:6]}")


@pytest.mark.parametrize("fmt", ["batch-v1", "raw"])
async def test_events_reach_the_core_queue_once_in_order(
    tmp_path: Path, pki: Pki, fmt: str
) -> None:
    device = new_device(pki, "up")
    async with sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, device, server.port, extra=f'format = "{fmt}"')
        config = load_config(path)
        async with Agent(config) as agent:
            ids = []
            for i in range(300):
                topic = ("alarms/door", "bulk/vib", "sensors/t1")[i % 3]
                ids.append(await agent.publish(topic, f"{i}".encode()))
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            status = read_link_status(config.agent.data_dir)
            assert status is not None
            assert status.state is LinkState.ONLINE
            assert agent.uplink is not None
            assert agent.uplink.status.delivered == 300
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    prefix = f"devices/{device.device_id}/"
    assert sorted(m.event_id for m in stored) == sorted(ids) if fmt == "batch-v1" else True
    assert len(stored) == 300
    for topic, qos in (("alarms/door", 2), ("bulk/vib", 0), ("sensors/t1", 1)):
        mine = [m for m in stored if m.topic == prefix + topic]
        assert len(mine) == 100
        assert {m.qos for m in mine} == {qos}
        payloads = [int(m.payload) for m in mine]
        assert payloads == sorted(payloads), f"{topic} out of order"
    status = read_link_status(config.agent.data_dir)
    assert status is not None
    assert status.state is LinkState.STOPPED


async def test_backlog_built_offline_drains_when_the_sink_appears(tmp_path: Path, pki: Pki) -> None:
    device = new_device(pki, "off")
    port = free_port()
    config = load_config(agent_config(tmp_path, pki, device, port))
    async with Agent(config) as agent:
        for i in range(500):
            await agent.publish(f"sensors/s{i % 5}", f"{i}".encode())
        await until(lambda: (s := read_link_status(config.agent.data_dir)) is not None
                    and s.state is LinkState.BACKOFF)  # fmt: skip
        assert inspect(config.agent.data_dir).events == 500
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert len(stored) == 500
    assert len({m.event_id for m in stored}) == 500


async def test_high_priority_events_overtake_the_backlog(tmp_path: Path, pki: Pki) -> None:
    device = new_device(pki, "prio")
    port = free_port()
    config = load_config(
        agent_config(tmp_path, pki, device, port, extra='format = "raw"\nwindow = 1')
    )
    async with Agent(config) as agent:
        for i in range(200):
            await agent.publish("sensors/t", f"{i}".encode())
        await agent.publish("alarms/fire", b"!")
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert stored[0].topic.endswith("alarms/fire")


async def test_nothing_is_lost_when_the_link_goes_away(tmp_path: Path, pki: Pki) -> None:
    """The sink stops and comes back on the same port while events keep arriving."""
    device = new_device(pki, "flap")
    port = free_port()
    config = load_config(agent_config(tmp_path, pki, device, port))
    published = 0
    async with Agent(config) as agent:
        for _ in range(3):
            async with sink(tmp_path, pki, port=port):
                for _ in range(200):
                    await agent.publish("sensors/t", f"{published}".encode())
                    published += 1
                    await asyncio.sleep(0.001)
            for _ in range(100):
                await agent.publish("sensors/t", f"{published}".encode())
                published += 1
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [int(m.payload) for _, m in read_messages(tmp_path / "core.db")]
    figures("link flaps", published=published, stored=len(stored), unique=len(set(stored)))
    assert sorted(set(stored)) == list(range(published))
    assert len(stored) == published  # the sqlite core queue dedupes resends by event id
    assert not list(read_events(config.agent.data_dir))
