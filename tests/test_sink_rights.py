"""F18: publishing outside the device's own prefix is refused, never acked-then-dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sink.config import ConfigError, parse_config
from cloud_sink.rights import DevicePrefixRights
from mqtt_ingest import Action, Identity
from tests.harness.pki import Pki
from tests.harness.rawmqtt import RawClient, publish_packet, subscribe_packet
from tests.harness.sink import write_sink_config
from tests.harness.stages import RecordingStage, counters, running_server

ME = Identity("dev-7")


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("devices/dev-7/temp", True),
        ("devices/dev-7/a/b/c", True),
        ("devices/dev-7/../dev-8/x", False),  # no level a consumer could resolve as a path
        ("devices/dev-7/a/..", False),
        ("devices/dev-7/./x", False),
        ("devices/dev-7/.../x", True),  # not a path step anywhere
        ("devices/dev-7/.hidden/x", True),
        # What NFKC (applied by many path and key handlers) turns into '..' or '.': refused.
        ("devices/dev-7/\u2025/dev-8/x", False),  # TWO DOT LEADER
        ("devices/dev-7/\uff0e\uff0e/dev-8/x", False),  # FULLWIDTH FULL STOP x 2
        ("devices/dev-7/\uff0e\uff0fdev-8", False),  # '.' and a FULLWIDTH SOLIDUS: './dev-8'
        ("devices/dev-7/temp\u00e9rature", True),  # other non-ASCII levels are fine
        # A backslash read as a separator (Windows paths), percent-decoding (URLs): refused.
        ("devices/dev-7/..\\dev-8\\x", False),
        ("devices/dev-7/a\\.", False),
        ("devices/dev-7/%2e%2e/dev-8/x", False),
        ("devices/dev-7/a%2F..%2Fdev-8", False),
        ("devices/dev-7/%EF%BC%8E%EF%BC%8E", False),  # two FULLWIDTH FULL STOPs, encoded
        ("devices/dev-7/50%25/x", True),  # '50%'
        ("devices/dev-7/100%/x", True),  # not an escape
        ("devices/dev-7/a\\b", True),
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


@pytest.mark.parametrize(
    ("template", "why"),
    [
        # Passed the check once, then raised KeyError on every publish: an outage.
        ("plant/{site}/{device_id}/", "no other field"),
        ("devices/{device_id}/{device_id}/", "once"),
        ("devices/{device_id!r}/", "no other field"),
        ("devices/x{device_id}/", "whole topic level"),  # 'x' + 'a' = 'xa' + '': ambiguous
        ("devices/{device_id}", "end with '/'"),
        ("devices/{/", "malformed"),
        ("+/{device_id}/", "'+'"),
    ],
)
def test_an_unusable_template_is_a_config_error(
    tmp_path: Path, pki: Pki, template: str, why: str
) -> None:
    base = write_sink_config(tmp_path, pki).read_text()
    with pytest.raises(ConfigError) as info:
        parse_config(base + f"\n[rights]\nprefix = '{template}'\n")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("rights.prefix:")
    assert why in info.value.problems[0]


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
        for qos, topic in ((1, "devices/dev-7/../dev-8/x"), (2, "devices/dev-7/./x")):
            client = await RawClient.connected(server.port, "dev-7")
            await client.send(publish_packet(topic, b"dots", qos=qos, packet_id=4))
            assert await client.closed_within(1), topic
    assert stage.payloads() == [b"mine"]
    assert counters(server).get("security_events", "publish_denied") == 3
    assert counters(server).get("security_events", "subscribe_denied") == 1
