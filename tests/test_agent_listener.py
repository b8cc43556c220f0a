"""The agent's local MQTT listener, one of its three sources: a PUBACK only once the event is
committed, no ack and a closed connection for an invalid event or one a full buffer refuses, mutual
TLS on any address, and no log line per connection for devices that connect per reading."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import aiomqtt
import pytest

from edge_agent import Agent, load_config
from edge_agent.buffer import inspect, read_events
from tests.harness.agent import write_config
from tests.harness.pki import Pki
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet


async def test_listener_acks_only_committed_events(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    async with Agent(config) as agent:
        port = agent.listener_port
        assert port is not None
        async with aiomqtt.Client("127.0.0.1", port, identifier="sensor-1") as client:
            for i in range(20):
                await client.publish("sensors/t", f"{i}".encode(), qos=1)
                # The PUBACK came: the event is in the database, seen from another connection.
                assert inspect(config.agent.data_dir).events == i + 1
            await client.publish("alarms/smoke", b"!", qos=2)
        # An invalid event gets no ack and the connection is closed; nothing stored.
        raw = await RawClient.connected(port, "bad-sensor")
        await raw.send(publish_packet("sensors//t", b"x", qos=1, packet_id=1))
        assert await raw.closed_within(2)
        big = await RawClient.connected(port, "big-sensor")
        await big.send(publish_packet("bulk/x", b"y" * 2000, qos=1, packet_id=1))
        assert await big.closed_within(2)
    assert [e.payload for e in read_events(config.agent.data_dir)] == [b"!"] + [
        f"{i}".encode() for i in range(20)
    ]


async def test_local_devices_that_connect_per_reading_log_no_line_per_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC §5: never a log line per event. A script or a battery sensor that connects for each
    reading made the listener log "connected" and "disconnected" at INFO: two lines per event
    (and a publisher refused by a full buffer, two per retry). They are debug lines on the
    agent's listener now (the sink, whose devices stay connected, keeps them at INFO); the
    listener's metrics count the connections."""
    config = load_config(write_config(tmp_path))
    caplog.set_level(logging.DEBUG)
    async with Agent(config) as agent:
        assert agent.listener_port is not None
        for i in range(5):
            async with aiomqtt.Client(
                "127.0.0.1", agent.listener_port, identifier=f"reading-{i}"
            ) as client:
                await client.publish("sensors/t", b"%d" % i, qos=1)
    lines = [r for r in caplog.records if r.name == "mqtt_ingest.connection"]
    connected = [r for r in lines if "connected from" in r.getMessage()]
    disconnected = [r for r in lines if ") disconnected:" in r.getMessage()]
    assert (len(connected), len(disconnected)) == (5, 5)  # still there, for --log-level DEBUG
    assert {r.levelno for r in connected + disconnected} == {logging.DEBUG}
    assert [r.getMessage() for r in lines if r.levelno >= logging.INFO] == []
    assert inspect(config.agent.data_dir).events == 5


async def test_listener_reject_when_full_gives_no_ack(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, buffer="max_events = 1"))
    async with Agent(config) as agent:
        assert agent.listener_port is not None
        raw = await RawClient.connected(agent.listener_port, "filler")
        await raw.send(publish_packet("alarms/1", b"a", qos=1, packet_id=1))
        ack = await raw.read()
        assert ack is not None
        assert ack.kind == 4
        await raw.send(publish_packet("alarms/2", b"b", qos=1, packet_id=2))
        assert await raw.closed_within(2)
    assert [e.payload for e in read_events(config.agent.data_dir)] == [b"a"]


async def test_listener_with_mutual_tls_on_any_address(tmp_path: Path, pki: Pki) -> None:
    listener = pki.server(f"listener-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"])
    listener_conf = (
        'host = "0.0.0.0"\nport = 0\n[listener.tls]\n'
        f'ca = "{pki.ca_cert}"\ncert = "{listener.cert_path}"\nkey = "{listener.key_path}"\n'
    )
    config = load_config(write_config(tmp_path, listener=listener_conf))
    device = pki.device(f"local-{uuid.uuid4().hex[:6]}")
    async with Agent(config) as agent:
        assert agent.listener_port is not None
        async with aiomqtt.Client(
            "localhost", agent.listener_port, tls_context=pki.client_context(device)
        ) as client:
            await client.publish("sensors/tls", b"secure", qos=1)
        # Without a client certificate: no CONNACK, the connection is closed.
        try:
            plain = await RawClient.open(agent.listener_port)
        except (ConnectionError, OSError):
            pass
        else:
            await plain.send(connect_packet("plain-text"))
            assert await plain.read(timeout=3) is None
            await plain.aclose()
    assert [e.payload for e in read_events(config.agent.data_dir)] == [b"secure"]
