"""Uplink test material shared by the uplink tests: the topic rules they use, a fresh device and
its agent config against a sink, a token issuer and its tokens, a buffer filled beforehand, what
reached the sink's core queue, the link's state, the losses counted against a poison suspect, and
an agent whose acknowledgements are held."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sink.auth import thumbprint
from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.config import AgentConfig
from edge_agent.link import LinkState, read_link_status
from edge_agent.uplink import Uplink
from tests.harness.agent import uplink_section, write_config
from tests.harness.chaos import ChaosProxy, ChaosProxyFactory, Direction
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.report import until
from tests.harness.sink import AUD, CLOUD_SINK
from tests.harness.sink import running_sink as sink

__all__ = [
    "TOPICS",
    "acks_held",
    "agent_config",
    "configure",
    "counted_losses",
    "issue_token",
    "issuer_key",
    "issuer_signed_auth",
    "link",
    "new_device",
    "preload",
    "stored_payloads",
]


def new_device(pki: Pki, prefix: str) -> DeviceCreds:
    return pki.device(f"{prefix}-{uuid.uuid4().hex[:6]}")


def configure(
    tmp_path: Path,
    pki: Pki,
    device: DeviceCreds,
    port: int,
    *,
    extra: str = "",
    token: str = "",
    host: str = "localhost",
) -> Path:
    kwargs = {"token": token} if token else {}
    return write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, host=host, extra=extra, **kwargs),
        topics=TOPICS,
    )


async def preload(
    config: AgentConfig, count: int, topics: tuple[str, ...] = ("sensors/t",), size: int = 0
) -> None:
    """``count`` events in the buffer, committed by an agent without its uplink; payload = the
    number, padded with spaces to ``size`` bytes (`stored_payloads` reads it back)."""
    async with Agent(config.model_copy(update={"uplink": None})) as agent:
        for i in range(count):
            await agent.publish(topics[i % len(topics)], f"{i}".encode().ljust(size))


def stored_payloads(core: Path) -> list[int]:
    return [int(m.payload) for _, m in read_messages(core)]


def link(config: AgentConfig) -> LinkState | None:
    status = read_link_status(config.agent.data_dir)
    return None if status is None else status.state


def counted_losses(data_dir: Path, seq: int) -> int:
    """The losses the buffer keeps against event ``seq`` as poison (read-only, beside the agent)."""
    db = sqlite3.connect((data_dir / "buffer.db").resolve().as_uri() + "?mode=ro", uri=True)
    try:
        row = db.execute("SELECT losses FROM suspects WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    return 0 if row is None else int(row[0])


@contextlib.asynccontextmanager
async def acks_held(
    tmp_path: Path, pki: Pki, proxies: ChaosProxyFactory, prefix: str, extra: str
) -> AsyncIterator[tuple[Agent, Uplink, ChaosProxy]]:
    """A sink, the chaos proxy in front of it and an agent connected through the proxy (uplink
    settings ``extra``), which then holds whatever the sink sends: PUBACKs, PINGRESPs."""
    device = new_device(pki, prefix)
    async with sink(tmp_path, pki) as server:
        proxy = await proxies("127.0.0.1", server.port)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole(direction=Direction.DOWNSTREAM)
            yield agent, uplink, proxy


TOPICS = """
[[topics]]
filter = "alarms/#"
qos = 2
priority = 9

[[topics]]
filter = "bulk/#"
qos = 0

[[topics]]
filter = "#"
qos = 1
"""


def agent_config(
    tmp_path: Path, pki: Pki, device: DeviceCreds, port: int, *, extra: str = "", token: str = ""
) -> Path:
    kwargs = {"token": token} if token else {}
    return write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, extra=extra, **kwargs),
        topics=TOPICS,
    )


def issuer_signed_auth(public: Path) -> str:
    """The sink's [auth] lines for tokens signed by the issuer whose public key is ``public``."""
    return f'mode = "issuer-signed"\nissuer = "https://issuer.test"\nissuer_keys = ["{public}"]'


def issuer_key(tmp_path: Path) -> tuple[Path, Path]:
    """(private key, public key) PEM files of a token issuer; the public one named k1.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    tmp_path.mkdir(parents=True, exist_ok=True)
    private = tmp_path / "issuer.key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "k1.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def issue_token(device: DeviceCreds, issuer: Path, ttl: int) -> str:
    """A token from `cloud-sink issue-token`; with ``ttl`` <= 0 (which the command refuses), the
    same claims minted here, already expired."""
    if ttl <= 0:
        key = serialization.load_pem_private_key(issuer.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(device.cert.read_bytes())
        now = int(time.time())
        claims = {
            "sub": device.device_id, "aud": AUD, "iss": "https://issuer.test",
            "iat": now + ttl - 60, "exp": now + ttl,
            "cnf": {"x5t#S256": thumbprint(certificate.public_bytes(serialization.Encoding.DER))},
        }  # fmt: skip
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})  # type: ignore[arg-type]
    done = subprocess.run(
        [CLOUD_SINK, "issue-token", "--device", device.device_id, "--cert", str(device.cert),
         "--key", str(issuer), "--kid", "k1", "--issuer", "https://issuer.test",
         "--audience", AUD, "--ttl", str(ttl)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()
