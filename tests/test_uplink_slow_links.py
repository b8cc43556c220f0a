"""Slow links and false disconnects (RELIABILITY F6): latency, 2 kB/s and 1-byte slices, messages
that take longer than the keep-alive to cross, and QoS 0 streams get through without the link
being called dead; a cut of a slow QoS 0 stream loses little; and a frozen sink, or a peer from
which nothing comes back, is still noticed. Faults come from the chaos proxy and SIGSTOP; the
sink is real (in this process or a subprocess)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from edge_agent.link import UNSENT_LIMIT, LinkState
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.pki import Pki
from tests.harness.process import ProcessFactory
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.harness.sink import sink_on_a_port
from tests.harness.uplink import configure, new_device, preload, stored_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.mark.parametrize("shape", ["latency 500ms", "2 kB/s", "1-byte slices"])
async def test_slow_links_cause_no_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, shape: str
) -> None:
    """F6: while bytes flow, keep-alive (3 s here) never declares a slow link dead."""
    device = new_device(pki, "f6")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        if shape == "latency 500ms":
            proxy.latency(0.5)
        elif shape == "2 kB/s":
            proxy.bandwidth(2000)
        else:
            proxy.slice(1)
        config = load_config(
            configure(tmp_path, pki, device, proxy.port, extra="keepalive = 3\nwindow = 4")
        )
        events = 60
        async with Agent(config) as agent:
            for i in range(events):
                await agent.publish("sensors/t", f"{i}".encode() * 20)
                await asyncio.sleep(0.1)
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
    stored = [m.payload for _, m in read_messages(tmp_path / "core.db")]
    figures(f"slow link ({shape})", events=events, stored=len(stored), connections=connections)
    assert len(stored) == events
    assert connections == 1, "the slow link was dropped and reconnected"


async def test_large_messages_cross_a_slow_link_without_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """F6 with messages that take longer than the keep-alive to cross: 64 KiB batches at
    10 kB/s take 6.5 s, and the link holds little, so they wait in the agent's send queue. The
    sink's PINGRESP waits behind them, so for seconds nothing comes back: the agent's watchdog
    (1.5 x keep-alive) and paho's own check (about 2 x) used to call such a link dead, every
    time, and the events never crossed. TCP acknowledging the agent's bytes is life too, and
    holds off the publish timeout as well. Last comes one event of 100 kB (10 s, 5 keep-alives
    without a byte back): no limit in time cuts it."""
    device = new_device(pki, "f6big")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(10_000, direction=Direction.UPSTREAM)
        # A publish_timeout shorter than a crossing too: moving bytes are not a late PUBACK.
        extra = "keepalive = 2\npublish_timeout = 3"
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        events = 130
        await preload(config, events, size=1000)
        async with Agent(config) as agent:
            await agent.publish("sensors/big", b"130".ljust(100_000))
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
    stored = stored_payloads(tmp_path / "core.db")
    figures("large messages, slow link", events=events + 1, connections=connections)
    assert sorted(stored) == list(range(events + 1))
    assert connections == 1, "the slow link was dropped and reconnected"


@pytest.mark.parametrize("mix", ["QoS 0", "QoS 0 and 1"])
async def test_a_qos0_stream_crosses_a_slow_link_without_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, mix: str
) -> None:
    """F6 for QoS 0 alone: nothing is owed for it, so nothing comes back while it crosses, and
    the keep-alive's PINGREQ waits behind the queued bytes. At 20 kB/s 500 kB take 25 s, 12
    keep-alives: the link used to be called dead every few seconds, and what was in the socket
    at each cut was lost. The agent now asks the sink for a PINGRESP and counts the progress of
    its bytes until the sink has the PINGREQ. Then the link stays idle for 4 keep-alives: the
    sink's keep-alive must still get paho's PINGREQs in time.

    With one QoS 1 event in ten, the small QoS 1 message in flight waits behind the QoS 0 bytes
    queued before it, far more than two of its size: until its PUBACK can come, the progress of
    those bytes is life all the same."""
    device = new_device(pki, "f6q0")
    topics = ("bulk/x",) if mix == "QoS 0" else ("bulk/x",) * 9 + ("sensors/t",)
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 2"))
        events = 500
        await preload(config, events, topics=topics, size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: len(stored_payloads(tmp_path / "core.db")) >= events, timeout=90)
            await asyncio.sleep(4 * 2)
            connections, failures = uplink.status.connections, uplink.status.failures
    stored = stored_payloads(tmp_path / "core.db")
    figures(f"{mix}, slow link", events=events, stored=len(stored), connections=connections)
    assert sorted(stored) == list(range(events))
    assert (connections, failures) == (1, 0), "the slow link was dropped and reconnected"


async def test_a_cut_of_a_slow_link_loses_little_of_a_qos0_stream(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A QoS 0 event counts as sent once written to the socket, and is then deleted. Without a
    bound the kernel takes megabytes, minutes of a slow link, all lost at a cut: 2,882 of these
    3,000 events were. `UNSENT_LIMIT` keeps the rest in the buffer: a reset loses about
    what the kernel holds unsent (128 KiB), one batch in paho and what the path held."""
    device = new_device(pki, "cut0")
    events = 3000
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 5"))
        await preload(config, events, topics=("bulk/x",), size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: len(stored_payloads(tmp_path / "core.db")) >= 60, timeout=30)
            left_at_cut = inspect(config.agent.data_dir).events
            await proxy.reset()
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            connections = uplink.status.connections
    stored = stored_payloads(tmp_path / "core.db")
    lost = events - len(set(stored))
    figures("cut of a QoS 0 stream", events=events, left_at_cut=left_at_cut, lost=lost)
    assert connections >= 2
    assert lost <= (UNSENT_LIMIT + 64 * 1024 + 32 * 1024) // 1000, "more lost than the bound"


async def test_a_frozen_sink_is_noticed_while_large_messages_are_sent(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """A sink that stops (SIGSTOP: a hung process, its kernel still up) while large messages
    flow. Its kernel acknowledges what fits in its receive buffer, then nothing: that
    progress of the agent's bytes (F6) must not keep the link alive. The agent gives up on the
    connection within a few keep-alives and delivers everything once the sink runs again."""
    port, sink_process = sink_on_a_port(tmp_path, pki, process_factory)
    await sink_process.astart()
    device = new_device(pki, "frozen")
    config = load_config(configure(tmp_path, pki, device, port, extra="keepalive = 2"))
    sent = 0

    async def publish(count: int) -> None:
        nonlocal sent
        for _ in range(count // 100):
            numbers = range(sent, sent + 100)
            await asyncio.gather(
                *(agent.publish("sensors/t", f"{n}".encode().ljust(1000)) for n in numbers)
            )
            sent += 100
            await asyncio.sleep(0.05)

    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        await publish(300)
        sink_process.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # 3 MB over 1.5 s: more than the window, more than a receive buffer takes.
        await publish(3000)
        await until(lambda: uplink.status.state is not LinkState.ONLINE, timeout=30)
        noticed = time.monotonic() - stopped
        sink_process.signal(signal.SIGCONT)
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
        connections = uplink.status.connections
    assert await sink_process.asigterm() == 0
    stored = stored_payloads(tmp_path / "core.db")
    figures("frozen sink", events=sent, noticed_after_s=round(noticed, 1), connections=connections)
    assert sorted(set(stored)) == list(range(sent))
    assert noticed < 15, "a frozen sink kept the link looking alive"


@pytest.mark.parametrize("topic", ["sensors/t", "bulk/x"])
async def test_progress_of_our_bytes_stops_counting_when_nothing_comes_back(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, topic: str
) -> None:
    """Bytes still acknowledged by TCP while nothing at all comes back (here the path from the
    sink is cut while the way up runs at 40 kB/s; a middlebox in front of a hung sink does the
    same): without a limit the agent would count that as life for as long as it has a window to
    send, 1 MiB, 26 s. It stops counting once the sink's TCP has the PINGREQ the agent queued
    when progress first counted (about 200 KiB behind what was queued then, with the slack: 5 s)
    and then gives up after 1.5 keep-alives. The same under a stream of QoS 0 alone
    (``bulk/x``), for which the sink owes nothing but that PINGRESP; what was in the socket at
    the cut is lost then, everything else is delivered afterwards."""
    device = new_device(pki, "mute")
    events = 1500
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 2"))
        await preload(config, events, topics=(topic,), size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None, timeout=30)
            proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
            proxy.blackhole(direction=Direction.DOWNSTREAM)
            cut = time.monotonic()
            await until(lambda: uplink.status.state is not LinkState.ONLINE, timeout=60)
            noticed = time.monotonic() - cut
            error = uplink.status.last_error
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
    stored = stored_payloads(tmp_path / "core.db")
    noticed = round(noticed, 1)
    figures(f"mute peer ({topic})", noticed_after_s=noticed, stored=len(stored), error=error)
    if topic == "sensors/t":
        assert sorted(stored) == list(range(events))
    else:
        assert len(stored) == len(set(stored))
        assert set(stored) <= set(range(events))
        assert max(stored) == events - 1, "the events after the cut were not delivered"
    assert noticed < 20, error
