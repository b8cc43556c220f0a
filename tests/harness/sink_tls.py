"""A sink with a CRL of its own, for the sink's TLS tests: its configuration (`crl_config`,
`own_crl`, `loaded`), whether a device gets through the handshake, CONNECT and one publish
(`connects`), an open connection of a device (`connected`), and waiting for a reload (`until`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from cloud_sink.config import SinkConfig, parse_config
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.rawmqtt import RawClient, connect_packet
from tests.harness.sink import device_token, write_sink_config

__all__ = ["connected", "connects", "crl_config", "loaded", "own_crl", "until"]


def crl_config(tmp_path: Path, pki: Pki, crl: Path, interval: str) -> Path:
    path = write_sink_config(tmp_path, pki)
    path.write_text(
        path.read_text().replace(
            "[auth]", f'crl = "{crl}"\ncrl_check_interval = "{interval}"\n\n[auth]'
        )
    )
    return path


def own_crl(tmp_path: Path, pki: Pki) -> Path:
    """A copy of the CA's current CRL that only this test replaces."""
    crl = tmp_path / "crl.pem"
    pki.ca.write_crl(crl)
    return crl


async def connects(port: int, device: DeviceCreds, pki: Pki) -> bool:
    """Whether ``device`` gets through the handshake and CONNECT and one QoS 1 publish."""
    try:
        async with aiomqtt.Client(
            "localhost", port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device), timeout=3,
        ) as client:  # fmt: skip
            await client.publish(f"devices/{device.device_id}/t", b"x", qos=1, timeout=5)
    except aiomqtt.MqttError:
        return False
    return True


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  # polling a counter
            await asyncio.sleep(0.05)


def loaded(config: Path) -> SinkConfig:
    return parse_config(config.read_text())


async def connected(
    port: int, device: DeviceCreds, pki: Pki, token: str | None = None
) -> RawClient:
    """An open MQTT connection of ``device`` (CONNACK accepted), with ``token`` if given."""
    client = await RawClient.open(port, ssl_context=pki.client_context(device))
    password = (token or device_token(device)).encode()
    name = device.device_id
    await client.send(connect_packet(name, username=name, password=password))
    connack = await client.read()
    assert connack is not None
    assert connack.body == b"\x00\x00"
    return client
