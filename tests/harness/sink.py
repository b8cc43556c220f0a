"""Sink test material shared by the sink tests: core messages, a sink config, device tokens, a
sink process on a port that survives its restarts, and a device that resends what the sink did
not acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization

from cloud_sink.backends import CoreMessage
from cloud_sink.config import parse_config
from cloud_sink.service import Sink
from mqtt_ingest import IngestServer
from mqtt_ingest.envelope import FORMAT_BATCH_V1, EnvelopeEvent, encode, format_username
from tests.harness.brokers import NatsNames, RabbitNames
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory, console_script
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet

__all__ = [
    "AUD",
    "CLOUD_SINK",
    "ResendingDevice",
    "amqp_backend",
    "core_message",
    "device_token",
    "http_get",
    "nats_backend",
    "running_sink",
    "sink_cli",
    "sink_on_a_port",
    "write_sink_config",
]

CLOUD_SINK = console_script("cloud-sink")
AUD = "sink.test"


def sink_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cloud-sink --config CONFIG ARGS...`` run to its end (within 60 s), output captured."""
    return subprocess.run(
        [CLOUD_SINK, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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
    backend: str | None = None,
) -> AsyncIterator[IngestServer]:
    """The sink in this process on ``port``, its core queue in ``tmp_path/core.db``;
    ``listener_extra`` adds keys to [listener], ``server_cert`` replaces (cert, key),
    ``backend`` replaces the [backend] section."""
    text = write_sink_config(tmp_path, pki, extra_auth).read_text()
    if backend is not None:
        text = text[: text.index("[backend]")] + backend
    text = text.replace("port = 0", f"port = {port}")
    text = text.replace("[listener]\n", f"[listener]\n{listener_extra}\n")
    if server_cert is not None:
        text = text.replace(str(pki.server_cert), str(server_cert[0]))
        text = text.replace(str(pki.server_key), str(server_cert[1]))
    async with Sink(parse_config(text)) as sink:
        yield sink.server


def sink_on_a_port(
    tmp_path: Path, pki: Pki, processes: ProcessFactory
) -> tuple[int, ManagedProcess]:
    """A sink process (not started) on a port of its own that stays the same across restarts."""
    port = free_port()
    config_path = write_sink_config(tmp_path, pki)
    config_path.write_text(config_path.read_text().replace("port = 0", f"port = {port}"))
    sink_process = processes(
        [CLOUD_SINK, "--config", str(config_path), "run"],
        ready=r"listening on",
        name="cloud-sink",
        start=False,
    )
    return port, sink_process


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """(status, body) of a request to ``http://127.0.0.1:port/path`` (blocking: run it in a
    thread); error statuses are returned, not raised."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        # S310: the URL is always http on loopback, built right here.
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


CONNACK, PUBACK = 2, 4


@dataclass
class ResendingDevice:
    """A device as the agent behaves towards the sink, on a raw MQTT connection (mTLS + JWT).

    It produces event ``seq`` 1..``total`` (one batch-v1 envelope each, epoch ``epoch``), one
    every ``interval`` seconds, publishes them at QoS 1 with up to ``window`` unacknowledged, and
    after any failure (connection closed, CONNACK refused, no PUBACK within ``ack_timeout``)
    reconnects and sends every unacknowledged event again. ``acked`` is what the sink
    acknowledged; the counters say what went wrong on the way.
    """

    port: int
    creds: DeviceCreds
    pki: Pki
    total: int
    epoch: str = "00ff00ff00ff00ff"
    interval: float = 0.01
    window: int = 10
    ack_timeout: float = 5.0
    retry_wait: float = 0.2
    acked: set[int] = field(default_factory=set)
    refusals: dict[int, int] = field(default_factory=dict)  # CONNACK code -> count
    connections: int = 0
    lost_connections: int = 0
    sent: int = 0

    @property
    def topic(self) -> str:
        return f"devices/{self.creds.device_id}/t"

    def event_id(self, seq: int) -> str:
        return f"{self.creds.device_id}/{self.epoch}/{seq}"

    async def run(self) -> None:
        """Until every event is acknowledged (bound it with a timeout)."""
        started = time.monotonic()
        while len(self.acked) < self.total:
            client = await self._connect()
            if client is None:
                await asyncio.sleep(self.retry_wait)
                continue
            try:
                await self._publish(client, started)
            except (TimeoutError, OSError, AssertionError):
                self.lost_connections += 1
            finally:
                await client.aclose()
            if len(self.acked) < self.total:
                await asyncio.sleep(self.retry_wait)

    async def _connect(self) -> RawClient | None:
        try:
            client = await RawClient.open(
                self.port, ssl_context=self.pki.client_context(self.creds)
            )
        except OSError:
            return None
        device = self.creds.device_id
        try:
            await client.send(
                connect_packet(
                    device,
                    username=format_username(device, format=FORMAT_BATCH_V1),
                    password=device_token(self.creds).encode(),
                )
            )
            connack = await client.read(self.ack_timeout)
        except (TimeoutError, OSError):
            connack = None
        if connack is None or connack.kind != CONNACK or connack.body[1:2] != b"\x00":
            code = connack.body[1] if connack is not None and len(connack.body) == 2 else -1
            self.refusals[code] = self.refusals.get(code, 0) + 1
            await client.aclose()
            return None
        self.connections += 1
        return client

    async def _publish(self, client: RawClient, started: float) -> None:
        while len(self.acked) < self.total:
            produced = min(self.total, int((time.monotonic() - started) / self.interval) + 1)
            due = [s for s in range(1, produced + 1) if s not in self.acked][: self.window]
            if not due:
                await asyncio.sleep(self.interval)
                continue
            burst = b"".join(
                publish_packet(
                    self.topic,
                    encode(self.epoch, [EnvelopeEvent(seq, seq, f"e{seq}".encode())]),
                    qos=1,
                    packet_id=seq % 65535 + 1,
                )
                for seq in due
            )
            await client.send(burst)
            self.sent += len(due)
            for seq in due:  # acks come in the order of the publishes
                ack = await client.read(self.ack_timeout)
                assert ack is not None, "connection closed"
                assert (ack.kind, ack.packet_id) == (PUBACK, seq % 65535 + 1), ack
                self.acked.add(seq)


def amqp_backend(names: RabbitNames) -> str:
    """A [backend] section for the test's RabbitMQ exchange and queues."""
    return (
        f'[backend]\ntype = "amqp"\nurl = "{names.url}"\nexchange = "{names.exchange}"\n'
        f'queue = "{names.queue}"\ndead_letter_exchange = "{names.dead_letter_exchange}"\n'
        f'dead_letter_queue = "{names.dead_letter_queue}"\n'
    )


def nats_backend(names: NatsNames) -> str:
    """A [backend] section for the test's JetStream streams."""
    return (
        f'[backend]\ntype = "nats"\nurl = "{names.url}"\nstream = "{names.stream}"\n'
        f'subject_prefix = "{names.subject_prefix}"\n'
        f'dead_letter_stream = "{names.dead_letter_stream}"\n'
        f'dead_letter_subject_prefix = "{names.dead_letter_subject_prefix}"\n'
    )
