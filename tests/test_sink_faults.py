"""The sink under faults: kill -9 between confirm and ack (F3), bad client certificates (F12)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from pathlib import Path

import aiomqtt
import pytest

from cloud_sink.backends import read_messages
from cloud_sink.config import parse_config
from cloud_sink.service import Sink
from mqtt_ingest.envelope import EnvelopeEvent, encode, format_username
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory
from tests.harness.sink import CLOUD_SINK, device_token, write_sink_config

pytestmark = [pytest.mark.fault, pytest.mark.integration]

EPOCH = "0011223344556677"


def start_sink(
    processes: ProcessFactory,
    config: Path,
    env: dict[str, str] | None = None,
    *,
    debug: bool = False,
) -> ManagedProcess:
    level = ["--log-level", "DEBUG"] if debug else []
    return processes(
        [CLOUD_SINK, *level, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
        env=env,
    )


def client(port: int, device: DeviceCreds, pki: Pki, **params: str) -> aiomqtt.Client:
    username = format_username(device.device_id, **params)
    return aiomqtt.Client(
        "localhost",
        port,
        identifier=device.device_id,
        username=username,
        password=device_token(device),
        tls_context=pki.client_context(device),
        timeout=5,
    )


async def test_kill9_after_confirm_before_puback_resend_is_deduplicated(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    config = write_sink_config(tmp_path, pki)
    sink = start_sink(process_factory, config, {"BRIDGE_FAILPOINTS": "ingest.before_ack=kill9@1"})
    device = pki.device(f"f3-{uuid.uuid4().hex[:6]}")
    topic = f"devices/{device.device_id}/t"
    envelope = encode(EPOCH, [EnvelopeEvent(1, 10, b"one"), EnvelopeEvent(2, 11, b"two")])
    with contextlib.suppress(aiomqtt.MqttError):
        async with client(sink.port, device, pki, format="batch-v1") as c:
            await c.publish(topic, envelope, qos=1, timeout=5)
            pytest.fail("the PUBACK arrived although the sink was killed before sending it")
    assert await sink.await_exit() == -9
    # Confirmed before the crash: in the core queue once already.
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"one", b"two"]
    # The device never saw the PUBACK and sends the envelope again to a restarted sink.
    sink.env.pop("BRIDGE_FAILPOINTS")
    await sink.arestart()
    async with client(sink.port, device, pki, format="batch-v1") as c:
        await c.publish(topic, envelope, qos=1, timeout=5)
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert [m.event_id for m in stored] == [
        f"{device.device_id}/{EPOCH}/1",
        f"{device.device_id}/{EPOCH}/2",
    ]
    assert await sink.asigterm() == 0


@pytest.mark.parametrize("kind", ["expired", "future", "foreign", "revoked", "none"])
async def test_bad_client_certificates_are_refused_at_the_handshake(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory, kind: str
) -> None:
    name = f"f12-{kind}-{uuid.uuid4().hex[:6]}"
    device = {
        "expired": pki.expired_device,
        "future": pki.future_device,
        "foreign": pki.foreign_device,
        "revoked": pki.revoked_device,
        "none": pki.device,
    }[kind](name)
    config = write_sink_config(tmp_path, pki)
    config.write_text(config.read_text().replace("[auth]", f'crl = "{pki.crl}"\n\n[auth]'))
    sink = start_sink(process_factory, config, debug=True)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    if kind != "none":
        context.load_cert_chain(str(device.cert), str(device.key))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=context, timeout=2,
        ) as c:  # fmt: skip
            await c.publish(f"devices/{device.device_id}/t", b"x", qos=1, timeout=5)
    assert "connected from" not in sink.output()
    # At the handshake itself, not at CONNECT (where a missing or revoked certificate is
    # refused too): nothing of the device's reached MQTT.
    assert "closed before CONNECT completed: TLS handshake failed" in sink.output()
    assert "refused CONNECT" not in sink.output()
    # A good device still gets in.
    good = pki.device(f"f12-good-{uuid.uuid4().hex[:6]}")
    async with client(sink.port, good, pki) as c:
        await c.publish(f"devices/{good.device_id}/t", b"ok", qos=1)
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"ok"]
    assert await sink.asigterm() == 0


async def test_connection_closed_when_the_token_expires_mid_session(
    tmp_path: Path, pki: Pki
) -> None:
    """F11: the sink disconnects at exp + leeway; what was acked before is kept."""
    config = parse_config(
        write_sink_config(tmp_path, pki).read_text().replace("[auth]\n", '[auth]\nleeway = "1s"\n')
    )
    device = pki.device(f"f11-{uuid.uuid4().hex[:6]}")
    async with Sink(config) as sink:
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id,
            username=device.device_id, password=device_token(device, ttl=1),
            tls_context=pki.client_context(device), timeout=5,
        ) as c:  # fmt: skip
            await c.publish(f"devices/{device.device_id}/t", b"before", qos=1)
            await asyncio.sleep(3)  # past exp (1 s) + leeway (1 s)
            with pytest.raises(aiomqtt.MqttError):
                await c.publish(f"devices/{device.device_id}/t", b"after", qos=1, timeout=3)
        assert sink.metrics.get("connections_closed", "expired") == 1
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"before"]
