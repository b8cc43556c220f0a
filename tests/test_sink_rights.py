"""F18: publishing outside the device's own prefix is refused, never acked-then-dropped."""

from __future__ import annotations

import pytest

from cloud_sink.rights import DevicePrefixRights
from mqtt_ingest import Action, Identity
from tests.harness.rawmqtt import RawClient, publish_packet, subscribe_packet
from tests.harness.stages import RecordingStage, counters, running_server

ME = Identity("dev-7")


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("devices/dev-7/temp", True),
        ("devices/dev-7/a/b/c", True),
        ("devices/dev-7/../dev-8/x", True),  # a literal level named "..", still under the prefix
        ("devices/dev-7/", False),
        ("devices/dev-7", False),
        ("devices/dev-8/temp", False),
        ("devices/dev-77/temp", False),
        ("devices/dev-", False),
        ("$SYS/broker", False),
        ("other/devices/dev-7/x", False),
    ],
)
def test_publish_only_under_the_own_prefix(topic: str, allowed: bool) -> None:
    assert DevicePrefixRights().allowed(ME, topic, Action.PUBLISH) is allowed


def test_no_subscriptions_and_a_custom_template() -> None:
    rights = DevicePrefixRights("plant-1/{device_id}/up/")
    assert not rights.allowed(ME, "plant-1/dev-7/up/#", Action.SUBSCRIBE)
    assert rights.allowed(ME, "plant-1/dev-7/up/x", Action.PUBLISH)
    with pytest.raises(ValueError, match="device_id"):
        DevicePrefixRights("devices/")


async def test_violations_close_without_ack_through_the_server() -> None:
    stage = RecordingStage()
    async with running_server(stage, rights=DevicePrefixRights()) as server:
        # Anonymous test authentication: the identity is the client id.
        client = await RawClient.connected(server.port, "dev-7")
        await client.send(subscribe_packet(1, ("#", 1)))
        suback = await client.read()
        assert suback is not None
        assert suback.body[2:] == b"\x80"
        await client.send(publish_packet("devices/dev-7/ok", b"mine", qos=1, packet_id=2))
        ack = await client.read()
        assert ack is not None
        assert ack.kind == 4
        await client.send(publish_packet("devices/dev-8/x", b"theirs", qos=1, packet_id=3))
        assert await client.closed_within(1)
    assert stage.payloads() == [b"mine"]
    assert counters(server).get("security_events", "publish_denied") == 1
    assert counters(server).get("security_events", "subscribe_denied") == 1
