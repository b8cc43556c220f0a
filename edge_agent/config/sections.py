"""The sections of the agent's configuration, each a typed, frozen model of its keys (the
rules over several keys or sections are in `edge_agent.config.rules`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from edge_agent.buffer.model import DISK_RESERVE
from mqtt_ingest.configuration import (
    AbsolutePath,
    Bytes,
    Delay,
    Interval,
    Room,
    Seconds,
)
from mqtt_ingest.envelope import BATCH_FORMATS, MAX_EVENTS, format_username
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id
from mqtt_ingest.limits import MQTT_MAX_PACKET
from mqtt_ingest.topics import topic_problem


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class AgentSection(Strict):
    device_id: str
    data_dir: AbsolutePath

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except InvalidIdentifier as exc:
            raise ValueError(exc.reason) from None


class BufferConfig(Strict):
    durability: Literal["full", "normal"] = "full"
    """``full``: every group commit is fsynced (survives power loss). ``normal``: survives a
    crash of the agent, but a power loss can roll back the last commits (docs/buffer.md)."""
    max_bytes: Bytes = 512 * 1024**2
    max_events: Annotated[int, Field(gt=0)] = 1_000_000
    commit_linger: Annotated[Delay, Field(le=1.0)] = 0.005
    """How long a group commit waits for more events after the first one. At most 1 s:
    producers wait for it, and the local listener gives a commit 30 s before it closes the
    connection unacknowledged (an event whose commit had not begun is left out; one being
    committed is stored all the same: a duplicate once its producer sends it again)."""
    commit_max_events: Annotated[int, Field(gt=0)] = 1000
    ttl_sweep_interval: Interval = 60.0
    disk_reserve: Room = DISK_RESERVE
    """Free space on the data directory's filesystem that new events never take: the drain's
    deletes and SQLite's checkpoints need it (on a disk full to the last byte the buffer can no
    longer delete what it delivered). Events that would cut into it are handled by their topic's
    ``on_full``. 0 turns the check off."""


class ListenerTls(Strict):
    """Mutual TLS on the local listener: clients need a certificate from ``ca``."""

    ca: AbsolutePath
    cert: AbsolutePath
    key: AbsolutePath


class ListenerConfig(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 1883
    tls: ListenerTls | None = None
    max_connections: Annotated[int, Field(gt=0)] = 1000
    max_inflight: Annotated[int, Field(gt=0)] = 256
    max_packet_size: Annotated[Bytes, Field(le=MQTT_MAX_PACKET)] = 1024**2
    """At most MQTT's own limit, 256 MB."""
    connect_timeout: Seconds = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_address(one: str, other: str) -> bool:
    """Whether binding both hosts on one port surely collides: the same address, or a wildcard
    and an address of its family ("" and "localhost" stand for both families; asyncio binds
    "::" IPv6 only). A host name is compared as written."""
    mine, theirs = _bound(one), _bound(other)
    return any(
        a == b or (a in _WILDCARDS and _family(b) == _family(a))
        or (b in _WILDCARDS and _family(a) == _family(b))
        for a in mine
        for b in theirs
    )  # fmt: skip


_WILDCARDS = ("0.0.0.0", "::")  # noqa: S104 (compared, not bound)


def _bound(host: str) -> tuple[str, ...]:
    if host == "":
        return _WILDCARDS
    if host == "localhost":
        return ("127.0.0.1", "::1")
    return (host,)


def _family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


MAX_TTL = 100 * 365.25 * 86400


class TopicRule(Strict):
    filter: str
    qos: Literal[0, 1, 2] = 1
    priority: Annotated[int, Field(ge=0, le=9)] = 0
    """Higher drains first."""
    ttl: Annotated[Seconds, Field(le=MAX_TTL)] | None = None
    """At most 100 years: the expiry is stored in milliseconds as a 64-bit integer."""
    on_full: Literal["reject", "drop-oldest"] = "reject"
    max_payload: Bytes = 256 * 1024

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        problem = topic_filter_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class UplinkTls(Strict):
    """Mutual TLS to the sink: the server is verified against ``ca`` and its host name."""

    ca: AbsolutePath
    cert: AbsolutePath
    key: AbsolutePath
    crl: AbsolutePath | None = None
    """A CRL of ``ca`` (``bridge-certs crl``): a sink whose server certificate it lists is
    refused. Read again when the file changes, before the next connection attempt."""


MAX_TOKEN_LIFETIME = 366 * 86400.0


class UplinkToken(Strict):
    """The JWT sent as the MQTT password (SPEC §6)."""

    mode: Literal["device-signed", "token-file", "none"] = "device-signed"
    """``device-signed``: minted per connection with the device key. ``token-file``: an
    issuer-signed token read from ``file`` (re-read when it changes). ``none``: no password, for
    a standard broker that authenticates by certificate only."""
    audience: str | None = None
    lifetime: Annotated[Seconds, Field(ge=2, le=MAX_TOKEN_LIFETIME)] = 3600.0
    """2 s to a year: JWT times are whole seconds (a lifetime under one minted tokens already
    expired), and the sink refuses any longer than its ``[auth] max_lifetime`` anyway."""
    renew_before: Seconds = 300.0
    """Reconnect with a fresh token this long before the current one expires."""
    file: AbsolutePath | None = None


class UplinkBatch(Strict):
    """Batch envelopes (format = "batch-v2" or "batch-v1"): consecutive events of one topic per
    message."""

    max_events: Annotated[int, Field(gt=0, le=MAX_EVENTS)] = 500
    """Events per envelope, at most the envelope's own limit (1,000, the sink's too)."""
    max_bytes: Bytes = 64 * 1024
    """The PUBLISH packet of an envelope at most (uncompressed, topic and header included): at
    most the sink's ``max_packet_size``. A single larger event goes alone."""
    linger: Delay = 0.005
    """How long a part-full batch waits for more events before it is sent."""
    zstd_level: Annotated[int, Field(ge=1, le=22)] | None = None


class UplinkConfig(Strict):
    host: str
    port: Annotated[int, Field(gt=0, le=65535)] = 8883
    tls: UplinkTls
    token: UplinkToken
    format: Literal["batch-v2", "batch-v1", "raw"] = "batch-v2"
    """How events travel: batch envelopes (docs/envelope.md; v1 for sinks older than v2) or
    ``raw``, one event per message, for any standard broker."""
    topic_template: str = "devices/{device_id}/{topic}"
    keepalive: Annotated[int, Field(ge=2, le=65535)] = 30
    """Seconds; paho pings after this much silence from the server and drops the link when
    another keep-alive passes without an answer."""
    window: Annotated[int, Field(gt=0, le=65535)] = 100
    """MQTT messages in flight (sent, not yet acknowledged)."""
    window_bytes: Bytes = 1024**2
    """Payload bytes in flight or queued for sending: no message is queued once this many are
    (so the last one may go over it; one message always goes, however large). Bounds the memory
    a drain of batch envelopes holds."""
    connect_timeout: Seconds = 10.0
    publish_timeout: Seconds = 60.0
    """No acknowledgement within this long: the link is treated as dead and the window resent."""
    backoff_initial: Interval = 0.5
    backoff_max: Interval = 60.0
    refused_backoff_initial: Interval = 30.0
    refused_backoff_max: Interval = 900.0
    """Credentials or certificates refused: retry slowly (they rarely fix themselves)."""
    stable_after: Seconds = 30.0
    """A connection up this long resets the backoff."""
    max_attempts: Annotated[int, Field(ge=2)] = 5
    """An event on which the connection is lost this many times while it is alone in flight,
    other events getting through in between, goes to the dead-letter table. At least 2: the
    first such loss only sets the event aside (one lost connection never blames an event)."""
    batch: UplinkBatch = Field(default_factory=UplinkBatch)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return value
        if not value:
            raise ValueError("the host is empty")
        try:
            value.encode("idna")  # what the socket module does with a name
        except UnicodeError as exc:
            raise ValueError(f"{value!r} is not a valid host name ({exc})") from None
        return value

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{topic}" not in value:
            raise ValueError("the topic template must contain {topic}")
        try:
            sample = value.format(device_id="d", topic="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"only {{device_id}} and {{topic}} can be used in the template ({exc})"
            ) from None
        # Every event's uplink topic would be invalid (a wildcard, an empty level): the link
        # would fail on each, for ever.
        problem = topic_problem(sample)
        if problem is not None:
            raise ValueError(f"the template makes topics such as {sample!r}: {problem}")
        return value

    def uplink_topic(self, device_id: str, topic: str) -> str:
        return self.topic_template.format(device_id=device_id, topic=topic)

    @property
    def envelope_version(self) -> int | None:
        """The batch envelope version of ``format``; None in ``raw``."""
        return BATCH_FORMATS.get(self.format)

    def username(self, device_id: str) -> str:
        """The CONNECT user name: the device id, with the envelope format it announces."""
        if self.envelope_version is None:
            return device_id
        return format_username(device_id, format=self.format)


class MetricsConfig(Strict):
    """The Prometheus endpoint (docs/metrics.md); off unless ``port`` is set (0: any free port).
    Unauthenticated and read-only: keep it on loopback or a management network."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    backlog_refresh: Seconds = 5.0
    """The per-topic backlog figures come from a scan of the buffer: at most this often."""
    max_topics: Annotated[int, Field(gt=0, le=10_000)] = 100
    """Topics with a series of their own (the largest backlogs); the rest are summed up."""


PACKET_OVERHEAD = 1024
"""Bytes of a PUBLISH besides its payload that `max_payload` leaves room for: the fixed header,
packet id and a topic of up to about 1,000 bytes."""


def topic_filter_problem(value: str) -> str | None:
    """Why ``value`` is not a valid MQTT topic filter, or None."""
    if not value:
        return "a topic filter cannot be empty"
    if "\x00" in value:
        return "a topic filter cannot contain NUL"
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_matches(topic_filter: str, topic: str, *, dollar: bool = False) -> bool:
    """MQTT 3.1.1 §4.7 matching; topics starting with '$' do not match wildcards at level one,
    unless ``dollar``: an operator's selection of buffered events (``buffer purge|export|peek
    --topic '#'``), which must cover the ``$aws/...`` events the catch-all rule buffers."""
    if topic.startswith("$") and topic_filter[:1] in ("#", "+") and not dollar:
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
