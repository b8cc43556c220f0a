"""Sink test material shared by the sink tests: core messages, a sink config, device tokens."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization

from cloud_sink.backends import CoreMessage
from cloud_sink.config import parse_config
from cloud_sink.service import build_server
from mqtt_ingest import IngestServer
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import console_script

__all__ = [
    "AUD",
    "CLOUD_SINK",
    "core_message",
    "device_token",
    "running_sink",
    "write_sink_config",
]

CLOUD_SINK = console_script("cloud-sink")
AUD = "sink.test"


def core_message(seq: int, device: str = "dev-1") -> CoreMessage:
    """Event ``seq`` of ``device`` as the forwarder would hand it to a backend."""
    return CoreMessage(
        event_id=f"{device}/00112233aabbccdd/{seq}",
        device_id=device,
        topic=f"devices/{device}/t",
        payload=f"p{seq}".encode(),
        qos=1,
        received_at_ms=1_700_000_000_000 + seq,
        seq=seq,
        event_time_ms=1_699_999_999_000 + seq,
    )


def write_sink_config(tmp_path: Path, pki: Pki, extra_auth: str = "") -> Path:
    """sink.toml: mTLS with the session PKI on a free loopback port, sqlite core queue."""
    path = tmp_path / "sink.toml"
    path.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = 0\nca = "{pki.ca_cert}"\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n\n'
        f'[auth]\naudience = "{AUD}"\n{extra_auth}\n'
        f'[backend]\ntype = "sqlite"\npath = "{tmp_path / "core.db"}"\n'
    )
    return path


def device_token(creds: DeviceCreds, ttl: int = 300) -> str:
    """A device-signed token as the agent will mint it (ES256 with the device's own key)."""
    key = serialization.load_pem_private_key(creds.key.read_bytes(), password=None)
    now = int(time.time())
    claims = {"sub": creds.device_id, "aud": AUD, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, key, algorithm="ES256")  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_sink(
    tmp_path: Path,
    pki: Pki,
    *,
    port: int = 0,
    extra_auth: str = "",
    listener_extra: str = "",
    server_cert: tuple[Path, Path] | None = None,
) -> AsyncIterator[IngestServer]:
    """The sink in this process on ``port``, its core queue in ``tmp_path/core.db``;
    ``listener_extra`` adds keys to [listener], ``server_cert`` replaces (cert, key)."""
    text = write_sink_config(tmp_path, pki, extra_auth).read_text()
    text = text.replace("port = 0", f"port = {port}")
    text = text.replace("[listener]\n", f"[listener]\n{listener_extra}\n")
    if server_cert is not None:
        text = text.replace(str(pki.server_cert), str(server_cert[0]))
        text = text.replace(str(pki.server_key), str(server_cert[1]))
    server, queue = await build_server(parse_config(text))
    try:
        async with server:
            yield server
    finally:
        await queue.aclose()
