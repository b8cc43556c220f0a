"""End to end: agent -> mutual TLS + JWT -> sink -> core queue (sqlite, NATS JetStream, RabbitMQ).

A device is offline for a while with thousands of events on topics at QoS 0, 1 and 2, then comes
online. Every QoS 1/2 event must reach the core queue exactly once, in seq order per topic; QoS 0
is best effort and counted. With NATS, two sink instances share one stream and the device moves
from one to the other in the middle of the drain (the first one killed between the core queue's
confirmation and its PUBACK): the stream holds no duplicate.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect, read_events
from tests.harness.agent import uplink_section, write_config
from tests.harness.brokers import (
    NatsNames,
    RabbitNames,
    StreamMessage,
    drain_queue,
    nats_connection,
    read_stream,
)
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory
from tests.harness.report import figures, until
from tests.harness.sink import (
    CLOUD_SINK,
    amqp_backend,
    nats_backend,
    running_sink,
    write_sink_config,
)
from tests.harness.uplink import TOPICS

pytestmark = pytest.mark.integration

PER_TOPIC = 1000
TOPIC_QOS = {"alarms/door": 2, "sensors/t1": 1, "bulk/vib": 0}


async def offline_then_online(
    tmp_path: Path, device: DeviceCreds, pki: Pki, port: int, batch: int = 100
) -> tuple[Agent, Path]:
    """The agent's config; ``PER_TOPIC`` events per topic committed while no sink is there."""
    path = write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, extra=f"batch.max_events = {batch}"),
        topics=TOPICS,
    )
    config = load_config(path)
    async with Agent(config) as agent:  # the sink is not there yet: everything stays buffered
        for i in range(PER_TOPIC):
            for topic in TOPIC_QOS:
                await agent.publish(topic, f"{i}".encode())
        assert inspect(config.agent.data_dir).events == PER_TOPIC * len(TOPIC_QOS)
    return agent, path


def check_per_topic(
    device_id: str, events: Sequence[tuple[str, int, int | None, str]], what: str
) -> None:
    """``events``: (topic, qos, seq, event id) in core-queue order."""
    by_topic: dict[str, list[tuple[int | None, str]]] = defaultdict(list)
    for topic, qos, seq, event_id in events:
        short = topic.removeprefix(f"devices/{device_id}/")
        assert qos == TOPIC_QOS[short], f"{short} arrived with QoS {qos}"
        by_topic[short].append((seq, event_id))
    counts = {topic: len(items) for topic, items in by_topic.items()}
    figures(what, events=len(events), per_topic=counts)
    for topic, qos in TOPIC_QOS.items():
        items = by_topic[topic]
        ids = [event_id for _, event_id in items]
        assert len(ids) == len(set(ids)), f"{topic}: duplicates in the core queue"
        seqs = [seq for seq, _ in items]
        assert seqs == sorted(seqs), f"{topic}: not in seq order"  # type: ignore[type-var]
        if qos > 0:
            assert len(items) == PER_TOPIC, f"{topic}: {len(items)} of {PER_TOPIC}"
        else:
            assert len(items) <= PER_TOPIC


async def test_offline_backlog_reaches_sqlite_exactly_once_in_order(
    tmp_path: Path, pki: Pki
) -> None:
    device = pki.device(f"e2e-{uuid.uuid4().hex[:6]}")
    port = free_port()
    _, path = await offline_then_online(tmp_path, device, pki, port)
    config = load_config(path)
    async with running_sink(tmp_path, pki, port=port), Agent(config):
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
    events = [(m.topic, m.qos, m.seq, m.event_id) for _, m in read_messages(tmp_path / "core.db")]
    check_per_topic(device.device_id, events, "offline then online, sqlite")


async def whole_stream(names: NatsNames) -> list[StreamMessage]:
    async with nats_connection(names.url) as nc:
        info = await nc.jetstream().stream_info(names.stream)
    count = info.state.messages
    return await read_stream(names.url, names.stream, expected=count, timeout=30)


def from_stream(messages: list[StreamMessage]) -> list[tuple[str, int, int | None, str]]:
    return [
        (
            m.headers["topic"],
            int(m.headers["qos"]),
            int(m.headers["seq"]),
            m.headers["Nats-Msg-Id"],
        )
        for m in messages
    ]


async def test_offline_backlog_reaches_nats_exactly_once_in_order(
    tmp_path: Path, pki: Pki, nats_jetstream: NatsNames
) -> None:
    device = pki.device(f"e2e-nats-{uuid.uuid4().hex[:6]}")
    port = free_port()
    _, path = await offline_then_online(tmp_path, device, pki, port)
    config = load_config(path)
    backend = nats_backend(nats_jetstream)
    async with running_sink(tmp_path, pki, port=port, backend=backend), Agent(config):
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
    stored = await whole_stream(nats_jetstream)
    check_per_topic(device.device_id, from_stream(stored), "offline then online, NATS")


async def test_device_moves_to_another_sink_instance_without_duplicates(
    tmp_path: Path, pki: Pki, nats_jetstream: NatsNames, process_factory: ProcessFactory
) -> None:
    """Sink A dies (kill -9) after the stream confirmed a batch, before its PUBACK; the device
    reconnects to sink B on the same address (as through a load balancer) and resends."""
    device = pki.device(f"e2e-two-{uuid.uuid4().hex[:6]}")
    port = free_port()
    _, path = await offline_then_online(tmp_path, device, pki, port, batch=10)
    config = load_config(path)
    sink_config = write_sink_config(tmp_path, pki)
    text = sink_config.read_text()
    text = text[: text.index("[backend]")] + nats_backend(nats_jetstream)
    sink_config.write_text(text.replace("port = 0", f"port = {port}"))

    def instance(name: str, env: dict[str, str] | None = None) -> ManagedProcess:
        return process_factory(
            [CLOUD_SINK, "--config", str(sink_config), "run"],
            ready=r"listening on", name=name, env=env, start=False,
        )  # fmt: skip

    first = instance("sink-a", {"BRIDGE_FAILPOINTS": "ingest.before_ack=kill9@3"})
    second = instance("sink-b")
    async with Agent(config):
        await first.astart()
        assert await first.await_exit(timeout=60) == -9
        confirmed = {int(m.headers["seq"]) for m in await whole_stream(nats_jetstream)}
        buffered = {e.seq for e in read_events(config.agent.data_dir)}
        resent = len(confirmed & buffered)  # in the stream, but never acknowledged to the agent
        assert resent > 0, "the failpoint did not fire between the confirmation and the PUBACK"
        await second.astart()
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
        await second.asigterm()
    stored = await whole_stream(nats_jetstream)
    figures("confirmed by sink A, unacknowledged, resent to sink B", events=resent)
    check_per_topic(device.device_id, from_stream(stored), "two sink instances, one NATS stream")


async def test_offline_backlog_reaches_rabbitmq_in_order_with_stable_ids(
    tmp_path: Path, pki: Pki, rabbitmq: RabbitNames
) -> None:
    """RabbitMQ does not deduplicate: without faults every event arrives once; each carries its
    event id as ``message_id`` so consumers can deduplicate after faults."""
    device = pki.device(f"e2e-amqp-{uuid.uuid4().hex[:6]}")
    port = free_port()
    _, path = await offline_then_online(tmp_path, device, pki, port)
    config = load_config(path)
    backend = amqp_backend(rabbitmq)
    async with running_sink(tmp_path, pki, port=port, backend=backend), Agent(config):
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
    total = PER_TOPIC * len(TOPIC_QOS)
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=total, timeout=60)
    events = [
        (
            str(m.headers["topic"]),
            int(str(m.headers["qos"])),
            int(str(m.headers["seq"])),
            str(m.message_id),
        )
        for m in received
    ]
    assert all(m.delivery_mode == 2 for m in received)  # persistent
    check_per_topic(device.device_id, events, "offline then online, RabbitMQ")
