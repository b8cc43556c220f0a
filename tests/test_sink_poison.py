"""Events the core queue can never take (SPEC §3, §7): one device's poison event must not take
the sink down for everyone.

Before the forwarder asked the backend, such an event failed its whole batch: the sink went into
an outage (no connection read, CONNACK 3 for everyone), the devices sharing the batch were
disconnected, and the poison event, never acknowledged, came back with each resend.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from mqtt_ingest import Counters
from tests.harness.brokers import NatsNames, RabbitNames, drain_queue, read_stream
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.sink import amqp_backend, device_token, nats_backend, running_sink

PUBACK = 4


async def connected(port: int, pki: Pki, creds: DeviceCreds) -> RawClient:
    client = await RawClient.open(port, ssl_context=pki.client_context(creds))
    await client.send(
        connect_packet(
            creds.device_id, username=creds.device_id, password=device_token(creds).encode()
        )
    )
    connack = await client.read()
    assert connack is not None
    assert connack.body == b"\x00\x00", connack
    return client


async def poison_beside_a_good_event(
    port: int, pki: Pki, level: str, payload: bytes
) -> tuple[DeviceCreds, RawClient, RawClient]:
    """A poison event and a good one from another device, in flight together (likely one
    backend batch); returns the poison device and both connections, the good event acked."""
    bad = pki.device(f"poison-{uuid.uuid4().hex[:6]}")
    good = pki.device(f"good-{uuid.uuid4().hex[:6]}")
    bad_client = await connected(port, pki, bad)
    good_client = await connected(port, pki, good)
    await good_client.send(
        publish_packet(f"devices/{good.device_id}/t", b"fine", qos=1, packet_id=1)
    )
    await bad_client.send(
        publish_packet(f"devices/{bad.device_id}/{level}", payload, qos=1, packet_id=1)
    )
    good_ack = await good_client.read()
    assert good_ack is not None
    assert (good_ack.kind, good_ack.packet_id) == (PUBACK, 1)
    return bad, bad_client, good_client


async def still_serving(port: int, pki: Pki, counters: Counters) -> None:
    """No outage: a new device connects and gets its event acknowledged."""
    assert counters.get("backend_outages") == 0
    third = pki.device(f"third-{uuid.uuid4().hex[:6]}")
    client = await connected(port, pki, third)
    await client.send(publish_packet(f"devices/{third.device_id}/t", b"later", qos=1, packet_id=7))
    ack = await client.read()
    assert ack is not None
    assert (ack.kind, ack.packet_id) == (PUBACK, 7)
    await client.aclose()


async def test_amqp_topic_over_a_routing_key_is_dead_lettered(
    tmp_path: Path, pki: Pki, rabbitmq: RabbitNames
) -> None:
    level = "x" * 260
    async with running_sink(tmp_path, pki, backend=amqp_backend(rabbitmq)) as server:
        bad, bad_client, good_client = await poison_beside_a_good_event(
            server.port, pki, level, b"poison"
        )
        ack = await bad_client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 1)
        assert isinstance(server.metrics, Counters)
        await still_serving(server.port, pki, server.metrics)
        assert server.metrics.get("forwarded", "dead_letter") == 1
        await bad_client.aclose()
        await good_client.aclose()
    [dead] = await drain_queue(rabbitmq.url, rabbitmq.dead_letter_queue, expected=1, timeout=10)
    assert dead.body == b"poison"
    assert dead.headers["device-id"] == bad.device_id
    assert "AMQP routing key holds 255" in str(dead.headers["reason"])
    assert len(await drain_queue(rabbitmq.url, rabbitmq.queue, expected=2, timeout=10)) == 2


async def test_nats_subject_over_the_control_line_is_dead_lettered(
    tmp_path: Path, pki: Pki, nats_jetstream: NatsNames
) -> None:
    async with running_sink(tmp_path, pki, backend=nats_backend(nats_jetstream)) as server:
        _, bad_client, good_client = await poison_beside_a_good_event(
            server.port, pki, "x" * 5000, b"poison"
        )
        ack = await bad_client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (PUBACK, 1)
        assert isinstance(server.metrics, Counters)
        await still_serving(server.port, pki, server.metrics)
        await bad_client.aclose()
        await good_client.aclose()
    [dead] = await read_stream(
        nats_jetstream.url, nats_jetstream.dead_letter_stream, expected=1, timeout=10
    )
    assert dead.body == b"poison"
    assert "NATS subjects here are limited to 3840" in dead.headers["reason"]


async def test_nats_event_too_large_even_as_a_dead_letter_is_refused_alone(
    tmp_path: Path, pki: Pki, nats_jetstream: NatsNames
) -> None:
    """Within the sink's max_packet_size (1 MiB) but over NATS's max_payload (1 MiB) with the
    headers of an event and of a dead letter: not acknowledged, its connection closed; nobody
    else affected. (With 100 bytes less it fits as a dead letter: acknowledged there.)"""
    async with running_sink(tmp_path, pki, backend=nats_backend(nats_jetstream)) as server:
        _, bad_client, good_client = await poison_beside_a_good_event(
            server.port, pki, "t", bytes(1024 * 1024 - 100)
        )
        assert await bad_client.closed_within(5), "the poison event was acknowledged"
        assert isinstance(server.metrics, Counters)
        assert server.metrics.get("forwarded", "refused") == 1
        await still_serving(server.port, pki, server.metrics)
        await good_client.aclose()
    stored = await read_stream(nats_jetstream.url, nats_jetstream.stream, expected=2, timeout=10)
    assert sorted(m.body for m in stored) == [b"fine", b"later"]
