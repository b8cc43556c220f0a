"""The sink's configuration: one TOML file, validated at start (STYLE 4, 6).

Example::

    [listener]
    host = "0.0.0.0"
    port = 8883
    ca = "/etc/cloud-sink/ca.pem"          # the platform CA: client certificates must chain to it
    cert = "/etc/cloud-sink/server.pem"
    key = "/etc/cloud-sink/server.key"
    crl = "/etc/cloud-sink/crl.pem"        # optional

    [auth]
    mode = "device-signed"                 # or "issuer-signed"
    audience = "sink.example.com"
    max_lifetime = "1h"
    leeway = "30s"
    identity = "cn"                        # or "san-uri"
    deny = ["dev-13"]

    [backend]
    type = "sqlite"
    path = "/var/lib/cloud-sink/core.db"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mqtt_ingest.configuration import Bytes, ConfigError, Seconds, load_model, parse_model

__all__ = [
    "AmqpBackendConfig",
    "ConfigError",
    "NatsBackendConfig",
    "SinkConfig",
    "SqliteBackendConfig",
    "load_config",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Strict):
    host: str = "0.0.0.0"  # noqa: S104  # the sink serves devices on the network, over mTLS only
    port: Annotated[int, Field(ge=0, le=65535)] = 8883
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None
    max_connections: Annotated[int, Field(gt=0)] = 10_000
    max_inflight: Annotated[int, Field(gt=0)] = 256
    max_packet_size: Bytes = 1024**2
    connect_timeout: Seconds = 5.0


class AuthConfig(_Strict):
    mode: Literal["device-signed", "issuer-signed"] = "device-signed"
    audience: str = Field(min_length=1)
    issuer: str | None = None
    issuer_keys: list[Path] = Field(default_factory=list)
    """PEM public keys of the issuer; each key's ``kid`` is its file name without extension."""
    leeway: Seconds = 30.0
    max_lifetime: Seconds = 3600.0
    identity: Literal["cn", "san-uri"] = "cn"
    deny: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _issuer_mode(self) -> AuthConfig:
        if self.mode == "issuer-signed" and (not self.issuer or not self.issuer_keys):
            raise ValueError('mode = "issuer-signed" needs issuer and issuer_keys')
        return self


class RightsConfig(_Strict):
    prefix: str = "devices/{device_id}/"


class SqliteBackendConfig(_Strict):
    type: Literal["sqlite"] = "sqlite"
    path: Path


class AmqpBackendConfig(_Strict):
    """RabbitMQ (extra ``amqp``): durable topic exchange, confirms, mandatory publishes."""

    type: Literal["amqp"]
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "mqtt-bridge.events"
    queue: str | None = "mqtt-bridge.events"
    queue_type: Literal["classic", "quorum"] = "classic"
    dead_letter_exchange: str = "mqtt-bridge.dead-letters"
    dead_letter_queue: str = "mqtt-bridge.dead-letters"
    timeout: Seconds = 10.0


class NatsBackendConfig(_Strict):
    """NATS JetStream (extra ``nats``): Nats-Msg-Id dedupe within the duplicate window."""

    type: Literal["nats"]
    url: str = "nats://127.0.0.1:4222"
    stream: str = "MQTT_BRIDGE"
    subject_prefix: str = "bridge.events"
    dead_letter_stream: str = "MQTT_BRIDGE_DEAD"
    dead_letter_subject_prefix: str = "bridge.dead"
    duplicate_window: Seconds = 120.0
    timeout: Seconds = 10.0


BackendConfig = Annotated[
    SqliteBackendConfig | AmqpBackendConfig | NatsBackendConfig, Field(discriminator="type")
]


class SinkConfig(_Strict):
    listener: ListenerConfig
    auth: AuthConfig
    rights: RightsConfig = Field(default_factory=RightsConfig)
    backend: BackendConfig


def parse_config(text: str, source: str = "<config>") -> SinkConfig:
    return parse_model(SinkConfig, text, source)


def load_config(path: Path) -> SinkConfig:
    return load_model(SinkConfig, path)
