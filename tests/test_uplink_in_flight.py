"""The uplink's bookkeeping of what is in flight: acknowledgements that never come time out
and the events go again, no packet id is reused while in flight, ``window_bytes`` bounds the
payloads out, and an event alone in flight when the connection is lost is tried again at once,
not blamed for a dead link (F5), and not sent once its TTL has expired. The sink is real (in
this process); faults come from the chaos proxy and failpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent import window as window_module
from edge_agent.buffer import inspect
from mqtt_ingest import failpoints
from tests.harness.agent import uplink_section, write_config
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.pki import Pki
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.harness.uplink import acks_held, configure, counted_losses, new_device

pytestmark = [pytest.mark.fault, pytest.mark.integration]


async def test_an_unacknowledged_publish_times_out_and_is_sent_again(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """Acknowledgements that never come end the connection after ``publish_timeout`` (well
    before keep-alive would notice), and the events go again on the next one."""
    extra = 'publish_timeout = "1s"\nkeepalive = 600'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "ptimeout", extra) as held:
        agent, uplink, proxy = held
        started = asyncio.get_running_loop().time()
        for i in range(20):
            await agent.publish("sensors/t", f"{i}".encode())
        await until(lambda: "not confirmed within 1s" in uplink.status.last_error, timeout=10)
        waited = asyncio.get_running_loop().time() - started
        figures("publish timeout 1s", seconds_to_failure=round(waited, 2))
        assert uplink.status.delivered == 0
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = sorted({int(m.payload) for _, m in read_messages(tmp_path / "core.db")})
    assert stored == list(range(20))


async def test_no_packet_id_is_reused_while_in_flight(
    tmp_path: Path,
    pki: Pki,
    chaos_proxy_factory: ChaosProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho's packet ids wrap after 65,535; the uplink sends nothing whose id could be the oldest
    in flight's. Shown with the span cut to 3: with acknowledgements held, 3 messages go out."""
    monkeypatch.setattr(window_module, "MID_SPAN", 3)
    extra = 'format = "raw"\nwindow = 10'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "mids", extra) as held:
        agent, uplink, proxy = held
        for i in range(50):
            await agent.publish("sensors/t", f"{i}".encode())
        await until(lambda: uplink.in_flight == 3)
        peak = uplink.in_flight
        for _ in range(20):
            await asyncio.sleep(0.05)
            peak = max(peak, uplink.in_flight)
        assert peak == 3
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = sorted({int(m.payload) for _, m in read_messages(tmp_path / "core.db")})
    assert stored == list(range(50))


async def test_an_event_alone_in_flight_at_a_cut_goes_again_without_other_traffic(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """An event alone in flight when the connection is lost is a suspect (poison handling), but
    with nothing else to send it is tried again at once, not held until other events flow."""
    device = new_device(pki, "alone")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        config = load_config(configure(tmp_path, pki, device, proxy.port))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole(direction=Direction.UPSTREAM)  # the PUBLISH never reaches the sink
            await agent.publish("sensors/t", b"0")
            await until(lambda: uplink.in_flight == 1)
            await proxy.reset()
            await until(lambda: uplink.status.failures >= 1)
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
            assert uplink.status.dead_lettered == 0
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]


async def test_an_event_alone_in_flight_when_the_link_dies_is_not_blamed(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A blackhole (F5) with one event alone in flight: paho's keep-alive or the silence watchdog
    ends the connection. That was counted against the event as if the sink had closed on it, so
    a quiet, flapping link dead-lettered innocent events after ``max_attempts`` blackholes. It
    is set aside (a path that drops a large packet would otherwise hold the others back) and
    never counted; after its first such loss it goes again as soon as the link is back."""
    device = new_device(pki, "dead-link")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'keepalive = 2\npublish_timeout = "5s"'  # dead after 4 s, before the timeout
        path = configure(tmp_path, pki, device, proxy.port, extra=extra)
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole()
            event_id = await agent.publish("sensors/t", b"0")
            await until(lambda: uplink.in_flight == 1)
            await until(lambda: uplink.status.failures >= 1, timeout=20)
            assert uplink.status.last_error is not None
            error = uplink.status.last_error
            assert "Keep alive timeout" in error or "the link is dead" in error, error
            seq = int(event_id.rsplit("/", 1)[1])
            assert counted_losses(config.agent.data_dir, seq) == 0
            proxy.pass_through()
            await agent.publish("sensors/t", b"1")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            assert uplink.status.dead_lettered == 0
    assert sorted(m.payload for _, m in read_messages(tmp_path / "core.db")) == [b"0", b"1"]


async def test_an_event_set_aside_then_expired_is_not_sent(tmp_path: Path, pki: Pki) -> None:
    """An event set aside (lost alone in flight) was sent from its copy in memory after the TTL
    sweep had dropped (and counted) it: the core queue got an event reported as dropped."""
    device = new_device(pki, "ttl-suspect")
    async with sink(tmp_path, pki) as server:
        path = write_config(
            tmp_path / "agent", device_id=device.device_id,
            buffer='ttl_sweep_interval = "200ms"',
            uplink=uplink_section(pki, device, server.port),
            topics='[[topics]]\nfilter = "#"\nqos = 1\nttl = "2s"\n',
        )  # fmt: skip
        config = load_config(path)
        data = config.agent.data_dir
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            # The sink's stage fails: it closes the connection, nothing acknowledged or stored.
            failpoints.arm("ingest.before_store", "raise")
            try:
                await agent.publish("sensors/t", b"expired")
                await until(lambda: uplink.status.failures >= 1)  # lost alone: set aside
                await until(lambda: ("ttl", "sensors/t") in inspect(data).drops, timeout=10)
            finally:
                failpoints.disarm_all()
            await agent.publish("sensors/t", b"fresh")
            await until(lambda: inspect(data).events == 0, timeout=20)
            await asyncio.sleep(0.5)  # a probe of the stale copy would go now
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"fresh"]


async def test_window_bytes_bounds_what_is_in_flight(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """With the acknowledgements held, no more than ``window_bytes`` of payloads go out, however
    large the window; once they flow again, everything arrives."""
    extra = 'format = "raw"\nwindow = 100\nwindow_bytes = 4000'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "wbytes", extra) as held:
        agent, uplink, proxy = held
        for i in range(200):
            await agent.publish("sensors/t", b"%04d" % i + bytes(996))  # 1,000-byte events
        await until(lambda: uplink.in_flight == 4)
        peak = uplink.in_flight
        for _ in range(20):
            await asyncio.sleep(0.05)
            peak = max(peak, uplink.in_flight)
        figures("window_bytes 4000", in_flight=peak)
        assert peak == 4  # 4 x 1,000 bytes: the window of 100 never fills
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = [int(m.payload[:4]) for _, m in read_messages(tmp_path / "core.db")]
    assert sorted(set(stored)) == list(range(200))
