"""Drain order when priorities change (SPEC P3): buffered events take their topic's priority of
now, at start and on a reload (SIGHUP); an alarm committed during an empty read above the
cursor is sent at once; and envelopes are runs of increasing seqs, whatever the priorities or
QoS the rows of one topic were stored with. The sink is real (in this process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent import Agent, load_config
from edge_agent.buffer import StoredEvent, inspect, read_events
from edge_agent.config import AgentConfig
from edge_agent.messages import Messages
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.mosquitto import free_port
from tests.harness.pki import Pki
from tests.harness.report import until
from tests.harness.sink import running_sink as sink
from tests.harness.uplink import configure, new_device, preload, stored_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def with_priority(path: Path, priority: int) -> AgentConfig:
    """The agent's config at ``path`` with the catch-all rule at ``priority`` (written back)."""
    rule = 'filter = "#"\nqos = 1'
    path.write_text(path.read_text().replace(rule, f"{rule}\npriority = {priority}"))
    config = load_config(path)
    assert config.topics[-1].priority == priority
    return config


async def test_a_topic_whose_priority_changed_keeps_its_order(tmp_path: Path, pki: Pki) -> None:
    """Events buffered at priority 0, then the topic's rule moved to priority 5 and more came.
    Rows kept the priority they were stored with, and the drain (priority first) sent the newer
    events first (SPEC P3). In batch-v1 one envelope held both runs, its seqs not increasing: it
    failed to encode on every connection and nothing more was delivered. At start the buffered
    events now take their topic's priority of now."""
    device = new_device(pki, "prio")
    async with sink(tmp_path, pki) as server:
        path = configure(tmp_path, pki, device, server.port)  # the default batch format
        await preload(load_config(path), 3)
        config = with_priority(path, 5)
        async with Agent(config.model_copy(update={"uplink": None})) as agent:
            for payload in (b"10", b"11", b"12"):
                await agent.publish("sensors/t", payload)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
            failures = uplink.status.failures
    assert failures == 0
    assert stored_payloads(tmp_path / "core.db") == [0, 1, 2, 10, 11, 12]


async def test_a_reload_gives_buffered_events_their_new_priority(tmp_path: Path, pki: Pki) -> None:
    """SIGHUP with a topic's priority raised (say, alarms stuck behind a backlog of telemetry
    during an outage): the buffered events of that topic take it too, not only new ones."""
    device = new_device(pki, "reprio")
    path = configure(tmp_path, pki, device, free_port())  # nothing listens: all stays buffered
    config = load_config(path)
    async with Agent(config) as agent:
        for payload in (b"1", b"2", b"3"):
            await agent.publish("sensors/t", payload)
        await agent.publish("alarms/door", b"a")  # its own rule: priority 9, not changed
        assert agent.reload(with_priority(path, 5)) == []
        data = config.agent.data_dir
        await until(
            lambda: [e.priority for e in read_events(data) if e.topic == "sensors/t"] == [5] * 3,
            timeout=10,
        )
        priorities = {e.topic: e.priority for e in read_events(data)}
    assert priorities == {"sensors/t": 5, "alarms/door": 9}


async def test_an_alarm_committed_during_an_empty_read_above_the_cursor_is_sent(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A read of events above the cursor's priority (preemption) finds nothing, and an alarm is
    committed while it runs: the next read, after the cursor, cleared the preemption flag
    although it cannot see priorities above the cursor, and the alarm stayed in the buffer
    until the next connection (with a token file: until its renewal, or never). The commit is
    placed inside that read by wrapping the buffer's read (the seam the uplink reads through)."""
    device = new_device(pki, "preempt")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\nwindow = 4\nwindow_bytes = 4000'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        data = config.agent.data_dir
        await preload(config, 60, size=1000)  # priority 0 ("alarms/#" has priority 9)
        proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            buffer = uplink.buffer
            read = buffer.next_events
            committed = asyncio.Event()

            async def next_events(
                limit: int,
                after: tuple[int, int] | None = None,
                *,
                skip: frozenset[int] = frozenset(),
                max_bytes: int | None = None,
                above: int | None = None,
                hold: bool = False,
            ) -> list[StoredEvent]:
                events = await read(
                    limit, after, skip=skip, max_bytes=max_bytes, above=above, hold=hold
                )
                if above is not None and not events and not committed.is_set():
                    committed.set()
                    await agent.publish("alarms/a", b"2000")  # after this read's snapshot
                return events

            buffer.next_events = next_events  # type: ignore[method-assign]
            await until(lambda: uplink.status.delivered >= 10, timeout=20)
            await agent.publish("alarms/a", b"1000")  # preempts; the read after it is empty
            await asyncio.wait_for(committed.wait(), 20)
            proxy.pass_through()
            await until(lambda: inspect(data).events == 0, timeout=20)
            connections = uplink.status.connections
    assert connections == 1
    assert sorted(stored_payloads(tmp_path / "core.db"))[-2:] == [1000, 2000]


def test_an_envelope_run_ends_where_the_seq_does_not_increase(tmp_path: Path, pki: Pki) -> None:
    """Rows of one topic at two priorities (a reload in progress, a requeued dead letter) come
    in drain order with seqs going down: each run of increasing seqs is its own envelope."""
    config = load_config(configure(tmp_path, pki, new_device(pki, "runs"), free_port()))
    assert config.uplink is not None
    messages = Messages(config.uplink, "dev", "0123456789abcdef")

    def event(seq: int, priority: int) -> StoredEvent:
        return StoredEvent(seq, "sensors/t", b"x", 1, priority, 0, 0)

    out = messages.drain_order([event(4, 5), event(5, 5), event(1, 0), event(2, 0)])
    assert [m.seqs for m in out] == [[4, 5], [1, 2]]


def test_a_topic_whose_qos_changed_twice_goes_up_in_seq_order(tmp_path: Path, pki: Pki) -> None:
    """Found by review: events keep the QoS their rule had when they were accepted, and
    envelopes were grouped by topic and QoS: a topic at QoS 1, then 2, then 1 again went up as
    seqs 1-2 and 5-6 (one envelope), then 3-4 (SPEC P3, with no fault)."""
    config = load_config(configure(tmp_path, pki, new_device(pki, "qos-runs"), free_port()))
    assert config.uplink is not None
    messages = Messages(config.uplink, "dev", "0123456789abcdef")

    def event(seq: int, qos: int) -> StoredEvent:
        return StoredEvent(seq, "sensors/t", b"x", qos, 0, 0, 0)

    out = messages.drain_order([event(1, 1), event(2, 1), event(3, 2), event(4, 2), event(5, 1)])
    assert [(m.seqs, m.qos) for m in out] == [([1, 2], 1), ([3, 4], 2), ([5], 1)]
