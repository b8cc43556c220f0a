"""The sink's configuration: one TOML file, validated at start (STYLE 4, 6). Paths are absolute.

Example::

    [listener]
    host = "0.0.0.0"
    port = 8883
    ca = "/etc/cloud-sink/ca.pem"          # the platform CA: client certificates must chain to it
    cert = "/etc/cloud-sink/server.pem"
    key = "/etc/cloud-sink/server.key"
    crl = "/etc/cloud-sink/crl.pem"        # optional; reloaded on SIGHUP and when it changes
    crl_check_interval = "5s"              # how often the CRL file's mtime/size/inode is looked at

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

    [backend.reconnect]                    # after a core-queue failure: probe with backoff,
    initial = "0.5s"                       # full jitter: attempt n waits
    max = "30s"                            # uniform(0, min(max, initial * 2**n))

    [health]                               # optional: GET /healthz, GET /readyz
    host = "127.0.0.1"
    port = 9883

    [metrics]                              # optional: GET /metrics (Prometheus)
    host = "127.0.0.1"
    port = 9884
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cloud_sink.backends.base import redacted_url, subject_prefix_problem, subject_prefixes_overlap
from cloud_sink.backends.sqlite import DISK_RESERVE
from cloud_sink.rights import check_template
from mqtt_ingest.configuration import (
    SECRET_VALUE,
    AbsolutePath,
    Bytes,
    ConfigError,
    Delay,
    Interval,
    Problem,
    Room,
    Rule,
    Seconds,
    UnknownValue,
    load_model,
    parse_model,
    valid,
    validated_with_rules,
    written,
)
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id
from mqtt_ingest.limits import MQTT_MAX_PACKET

__all__ = [
    "AmqpBackendConfig",
    "ConfigError",
    "MetricsConfig",
    "NatsBackendConfig",
    "SinkConfig",
    "SqliteBackendConfig",
    "check_files",
    "load_config",
    "parse_config",
    "shown",
]


MAX_BACKEND_TIMEOUT = 12.0
BackendTimeout = Annotated[Seconds, Field(le=MAX_BACKEND_TIMEOUT)]
"""A core-queue call's deadline. A batch (at most 20,000 events, `cloud_sink.forward`) may need
two calls (its events, then its dead letters), and both must end within the ingest server's 30 s
stage timeout: a call cut off by that one
instead would not count as a core-queue failure, and a dead backend would never be treated as an
outage (the sink kept accepting CONNECTs and reporting ready)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Strict):
    host: str = "0.0.0.0"  # noqa: S104  # the sink serves devices on the network, over mTLS only
    port: Annotated[int, Field(ge=0, le=65535)] = 8883
    ca: AbsolutePath
    cert: AbsolutePath
    key: AbsolutePath
    crl: AbsolutePath | None = None
    crl_check_interval: Interval = 5.0
    max_connections: Annotated[int, Field(gt=0)] = 10_000
    max_inflight: Annotated[int, Field(gt=0)] = 256
    max_packet_size: Annotated[Bytes, Field(le=MQTT_MAX_PACKET)] = 1024**2
    """At most MQTT's own limit, 256 MB."""
    connect_timeout: Seconds = 5.0
    batch_linger: Annotated[Delay, Field(le=1.0)] = 0.0
    """How long the first event of an idle core queue waits for others before it is forwarded.
    0 (the default): at once; events that arrive while the core queue confirms one batch form
    the next one anyway, so batches grow with the load without adding latency at low load."""
    tls_read_buffer: Annotated[Bytes, Field(ge=16 * 1024, le=1024**2)] = 64 * 1024
    """asyncio's TLS read buffer per connection (its default, 256 KiB, allocated and zeroed for
    every connection, was 2.5 GB at max_connections = 10000); a TLS record is at most 16 KiB."""


MAX_LEEWAY = 600.0


class AuthConfig(_Strict):
    mode: Literal["device-signed", "issuer-signed"] = "device-signed"
    """``issuer-signed`` needs ``issuer`` and ``issuer_keys`` (`SinkConfig`'s rules)."""
    audience: str = Field(min_length=1)
    issuer: str | None = None
    issuer_keys: list[AbsolutePath] = Field(default_factory=list)
    """PEM public keys of the issuer; each key's ``kid`` is its file name without extension."""
    leeway: Annotated[Seconds, Field(le=MAX_LEEWAY)] = 30.0
    """Clock skew allowed on ``exp``, ``iat`` and ``nbf``; at most 10 minutes: an expired token
    stays usable this long (and so does a connection past its ``exp``)."""
    max_lifetime: Seconds = 3600.0
    identity: Literal["cn", "san-uri"] = "cn"
    deny: list[str] = Field(default_factory=list)

    @field_validator("deny")
    @classmethod
    def _deny(cls, value: list[str]) -> list[str]:
        # A typo ("dev-13 ", say) denied nobody, without a word.
        for index, device in enumerate(value):
            try:
                validate_device_id(device, normal=False)
            except InvalidIdentifier as exc:
                raise ValueError(f"deny[{index}] is no device id: {exc.reason}") from None
        return value


class RightsConfig(_Strict):
    prefix: str = "devices/{device_id}/"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_template(value)


class ReconnectConfig(_Strict):
    """Backoff between probes of a core queue that failed (full jitter, capped); ``initial``
    at most ``max`` (`SinkConfig`'s rules)."""

    initial: Interval = 0.5
    max: Interval = 30.0


class _Backend(_Strict):
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)


class SqliteBackendConfig(_Backend):
    type: Literal["sqlite"] = "sqlite"
    path: AbsolutePath
    disk_reserve: Room = DISK_RESERVE
    """Free space kept on the file's filesystem: a write that would cut into it is an outage
    (devices keep their events) until there is room again. 0 turns the check off."""


def _server_url(url: str, schemes: tuple[str, ...]) -> str:
    """Checked at start (and by check-config), not at the first connection attempt. A problem
    is reported without the URL (`SECRET_VALUE`): it may hold a password."""

    def refuse(why: str) -> PydanticCustomError:
        return PydanticCustomError(SECRET_VALUE, why)

    try:
        parts = urlsplit(url)
    except ValueError:
        raise refuse("not a valid URL") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # A password with a '/', '?' or '#' cut the URL there: the host was taken from the
        # password, and the password was shown whole.
        if "amqp" in schemes:
            raise refuse("an '@' after the host: percent-encode the user name and password")
        # nats-py does not percent-decode them: such a password cannot be given in the URL.
        raise refuse("an '@' after the host: NATS takes no '/', '?' or '#' in a URL's password")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is no number or out of range
    except ValueError:
        raise refuse("the port must be a number from 0 to 65535") from None
    if parts.scheme not in schemes:
        raise refuse(f"the scheme must be one of {', '.join(schemes)}, not {parts.scheme!r}")
    if not parts.hostname:
        raise refuse("the URL names no host")
    return url


class AmqpBackendConfig(_Backend):
    """RabbitMQ (extra ``amqp``): durable topic exchange, confirms, mandatory publishes."""

    type: Literal["amqp"]
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """Its password is shown as ``***`` by check-config."""
    exchange: str = "mqtt-bridge.events"
    queue: str | None = "mqtt-bridge.events"
    queue_type: Literal["classic", "quorum"] = "classic"
    dead_letter_exchange: str = "mqtt-bridge.dead-letters"
    dead_letter_queue: str = "mqtt-bridge.dead-letters"
    max_message_size: Annotated[Bytes, Field(gt=0, le=512 * 1024**2)] = 16 * 1024**2
    """RabbitMQ's ``max_message_size``: it closes the channel on a larger body, failing the
    whole batch. The default is RabbitMQ 4's; 3.x's is 128 MiB."""
    timeout: BackendTimeout = 10.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _server_url(value, ("amqp", "amqps"))


def _subject_prefix(value: str) -> str:
    # Unchecked, "x.*" stored events on literal wildcard subjects and "x.>" or "x." failed
    # every publish with an opaque server error.
    problem = subject_prefix_problem(value)
    if problem is not None:
        raise ValueError(f"a NATS subject prefix {problem}")
    return value


SubjectPrefix = Annotated[str, AfterValidator(_subject_prefix)]
"""In the type, not a field validator: `SinkConfig`'s rule that the two prefixes are apart reads
it validated (`mqtt_ingest.configuration.valid`)."""


class NatsBackendConfig(_Backend):
    """NATS JetStream (extra ``nats``): Nats-Msg-Id dedupe within the duplicate window; the two
    subject prefixes apart (`SinkConfig`'s rules)."""

    type: Literal["nats"]
    url: str = "nats://127.0.0.1:4222"
    stream: str = "MQTT_BRIDGE"
    subject_prefix: SubjectPrefix = "bridge.events"
    dead_letter_stream: str = "MQTT_BRIDGE_DEAD"
    dead_letter_subject_prefix: SubjectPrefix = "bridge.dead"
    duplicate_window: Seconds = 120.0
    timeout: BackendTimeout = 10.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _server_url(value, ("nats", "tls", "ws", "wss"))


BackendConfig = Annotated[
    SqliteBackendConfig | AmqpBackendConfig | NatsBackendConfig, Field(discriminator="type")
]


class HealthConfig(_Strict):
    """The readiness endpoint; off unless ``port`` is set (0: any free port)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = None


class MetricsConfig(_Strict):
    """The Prometheus endpoint (docs/metrics.md); off unless ``port`` is set (0: any free port).
    Unauthenticated and read-only: keep it on loopback or a management network."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = None


def _issuer_named(data: dict[str, Any]) -> Iterator[Problem]:
    auth = written(data, "auth")
    if auth is None or valid(AuthConfig, auth, "mode") != "issuer-signed":
        return  # no [auth]: reported as missing
    for key in ("issuer", "issuer_keys"):
        try:
            given = valid(AuthConfig, auth, key)
        except UnknownValue:
            continue
        if not given:
            yield Problem(
                ("auth", key),
                'mode = "issuer-signed" needs issuer and issuer_keys',
                written(auth, key, auth),
            )


def _reconnect_ordered(data: dict[str, Any]) -> Iterator[Problem]:
    reconnect = written(written(data, "backend"), "reconnect", {})
    if valid(ReconnectConfig, reconnect, "initial") > valid(ReconnectConfig, reconnect, "max"):
        yield Problem(
            ("backend", "reconnect", "initial"),
            "initial must not be more than max",
            written(reconnect, "initial", reconnect),
        )


def _prefixes_apart(data: dict[str, Any]) -> Iterator[Problem]:
    backend = written(data, "backend")
    if written(backend, "type") != "nats":
        return
    events = valid(NatsBackendConfig, backend, "subject_prefix")
    dead = valid(NatsBackendConfig, backend, "dead_letter_subject_prefix")
    if subject_prefixes_overlap(events, dead):
        # At the one written: the other may be its default.
        key = (
            "subject_prefix"
            if written(backend, "subject_prefix") is not None
            else "dead_letter_subject_prefix"
        )
        yield Problem(
            ("backend", key),
            f"subject_prefix {events!r} and dead_letter_subject_prefix {dead!r} overlap: the two"
            " streams would take each other's subjects",
            written(backend, key, backend),
        )


_RULES: tuple[Rule, ...] = (_issuer_named, _reconnect_ordered, _prefixes_apart)
"""In the order of the sections they concern. As model validators of their sections they ran
only once every key of the section was valid, and were reported at the section."""


class SinkConfig(_Strict):
    listener: ListenerConfig
    auth: AuthConfig
    rights: RightsConfig = Field(default_factory=RightsConfig)
    backend: BackendConfig
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="wrap")
    @classmethod
    def _rules(cls, data: Any, handler: ModelWrapValidatorHandler[SinkConfig]) -> SinkConfig:
        """The rules over several keys (`_RULES`), checked whatever else is wrong, each problem
        at the key to change: with pydantic's own, check-config reports every problem at once."""
        return validated_with_rules(cls, data, handler, _RULES)


def check_files(config: SinkConfig) -> list[str]:
    """Every file the configuration names that is missing or unreadable, as ``path: problem``
    (an empty list when all are there)."""
    listener = config.listener
    named: list[tuple[str, Path]] = [
        ("listener.ca", listener.ca),
        ("listener.cert", listener.cert),
        ("listener.key", listener.key),
    ]
    if listener.crl is not None:
        named.append(("listener.crl", listener.crl))
    named += [(f"auth.issuer_keys[{i}]", p) for i, p in enumerate(config.auth.issuer_keys)]
    problems = []
    for where, path in named:
        try:
            # Opening is the real test: os.access() says yes to root whatever the mode.
            with path.open("rb") as file:
                file.read(1)
        except IsADirectoryError:
            problems.append(f"{where}: {path} is a directory, not a file")
        except OSError as exc:
            problems.append(f"{where}: cannot read {path}: {exc.strerror or exc}")
    return problems


def shown(config: SinkConfig) -> dict[str, object]:
    """The configuration as `check-config` prints it: every value, passwords as ``***``."""
    data = config.model_dump(mode="json")
    backend = data["backend"]
    if isinstance(backend, dict) and isinstance(backend.get("url"), str):
        backend["url"] = redacted_url(backend["url"])
    return data


def parse_config(text: str, source: str = "<config>") -> SinkConfig:
    return parse_model(SinkConfig, text, source)


def load_config(path: Path) -> SinkConfig:
    return load_model(SinkConfig, path)
