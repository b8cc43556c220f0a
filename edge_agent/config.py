"""The agent's configuration: one TOML file, validated at start (SPEC §5, STYLE 4).

Every problem is reported at once, each with its path (``topics[2].qos``), the value and why;
unknown keys are errors, so a typo never silently falls back to a default. Durations are written
``"250ms"``, ``"30s"``, ``"5m"``, ``"12h"``, ``"7d"`` (or a number of seconds) and sizes
``"64KiB"``, ``"512MiB"``, ``"2GB"`` (or a number of bytes). Paths are absolute: every command
(``run``, ``publish``, ``status``) must find the same files, wherever it is run from.

Example::

    [agent]
    device_id = "dev-42"
    data_dir = "/var/lib/edge-agent"

    [buffer]
    durability = "full"        # or "normal": see docs/buffer.md for what it can lose
    max_bytes = "512MiB"
    max_events = 1_000_000

    [listener]
    host = "127.0.0.1"
    port = 1883

    [metrics]                  # optional: Prometheus text on http://127.0.0.1:9101/metrics
    port = 9101

    [uplink]                   # optional: without it the agent only buffers
    host = "sink.example.com"
    port = 8883
    format = "batch-v1"        # or "raw" for any standard broker

    [uplink.tls]
    ca = "/etc/edge-agent/ca.pem"
    cert = "/etc/edge-agent/device.pem"
    key = "/etc/edge-agent/device.key"

    [uplink.token]
    mode = "device-signed"     # or "token-file", or "none" (a broker that checks certificates only)
    audience = "sink.example.com"
    lifetime = "1h"

    [[topics]]                 # first match wins; the last rule must be "#"
    filter = "alarms/#"
    qos = 2
    priority = 9
    on_full = "reject"

    [[topics]]
    filter = "#"
    qos = 1
    ttl = "7d"
    on_full = "drop-oldest"
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from edge_agent.buffer.model import DISK_RESERVE
from mqtt_ingest.configuration import (
    AbsolutePath,
    Bytes,
    ConfigError,
    Delay,
    Interval,
    Room,
    Seconds,
    load_model,
    parse_model,
)
from mqtt_ingest.envelope import MAX_EVENTS
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id
from mqtt_ingest.limits import MQTT_MAX_PACKET
from mqtt_ingest.topics import topic_problem

__all__ = [
    "AgentConfig",
    "AgentSection",
    "BufferConfig",
    "ConfigError",
    "ListenerConfig",
    "ListenerTls",
    "MetricsConfig",
    "TopicRule",
    "UplinkBatch",
    "UplinkConfig",
    "UplinkTls",
    "UplinkToken",
    "load_config",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class AgentSection(_Strict):
    device_id: str
    data_dir: AbsolutePath

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except InvalidIdentifier as exc:
            raise ValueError(exc.reason) from None


class BufferConfig(_Strict):
    durability: Literal["full", "normal"] = "full"
    """``full``: every group commit is fsynced (survives power loss). ``normal``: survives a
    crash of the agent, but a power loss can roll back the last commits (docs/buffer.md)."""
    max_bytes: Bytes = 512 * 1024**2
    max_events: Annotated[int, Field(gt=0)] = 1_000_000
    commit_linger: Annotated[Delay, Field(le=1.0)] = 0.005
    """How long a group commit waits for more events after the first one. At most 1 s:
    producers wait for it, and the local listener gives a commit 30 s before it closes the
    connection unacknowledged (the event then committed anyway: a duplicate)."""
    commit_max_events: Annotated[int, Field(gt=0)] = 1000
    ttl_sweep_interval: Interval = 60.0
    disk_reserve: Room = DISK_RESERVE
    """Free space on the data directory's filesystem that new events never take: the drain's
    deletes and SQLite's checkpoints need it (on a disk full to the last byte the buffer can no
    longer delete what it delivered). Events that would cut into it are handled by their topic's
    ``on_full``. 0 turns the check off."""


class ListenerTls(_Strict):
    """Mutual TLS on the local listener: clients need a certificate from ``ca``."""

    ca: AbsolutePath
    cert: AbsolutePath
    key: AbsolutePath


class ListenerConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 1883
    tls: ListenerTls | None = None
    max_connections: Annotated[int, Field(gt=0)] = 1000
    max_inflight: Annotated[int, Field(gt=0)] = 256
    max_packet_size: Annotated[Bytes, Field(le=MQTT_MAX_PACKET)] = 1024**2
    """At most MQTT's own limit, 256 MB."""
    connect_timeout: Seconds = 5.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_address(one: str, other: str) -> bool:
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


class TopicRule(_Strict):
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


class UplinkTls(_Strict):
    """Mutual TLS to the sink: the server is verified against ``ca`` and its host name."""

    ca: AbsolutePath
    cert: AbsolutePath
    key: AbsolutePath
    crl: AbsolutePath | None = None
    """A CRL of ``ca`` (``bridge-certs crl``): a sink whose server certificate it lists is
    refused. Read again when the file changes, before the next connection attempt."""


MAX_TOKEN_LIFETIME = 366 * 86400.0


class UplinkToken(_Strict):
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


class UplinkBatch(_Strict):
    """Batch envelopes (format = "batch-v1"): consecutive events of one topic per message."""

    max_events: Annotated[int, Field(gt=0, le=MAX_EVENTS)] = 500
    """Events per envelope, at most the envelope's own limit (1,000, the sink's too)."""
    max_bytes: Bytes = 64 * 1024
    """The PUBLISH packet of an envelope at most (uncompressed, topic and header included): at
    most the sink's ``max_packet_size``. A single larger event goes alone."""
    linger: Delay = 0.005
    """How long a part-full batch waits for more events before it is sent."""
    zstd_level: Annotated[int, Field(ge=1, le=22)] | None = None


class UplinkConfig(_Strict):
    host: str
    port: Annotated[int, Field(gt=0, le=65535)] = 8883
    tls: UplinkTls
    token: UplinkToken
    format: Literal["batch-v1", "raw"] = "batch-v1"
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


class MetricsConfig(_Strict):
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


class AgentConfig(_Strict):
    agent: AgentSection
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    uplink: UplinkConfig | None = None
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    topics: list[TopicRule] = Field(min_length=1)

    @model_validator(mode="wrap")
    @classmethod
    def _cross_section_rules(
        cls, data: Any, handler: ModelWrapValidatorHandler[AgentConfig]
    ) -> AgentConfig:
        """The rules over several keys or sections, checked whatever else is wrong: each over the
        values it needs that are valid, each problem with the path of a key to change. (As
        model validators they ran only once every field was valid, and stopped at the first
        failure: a file with 7 mistakes took 6 rounds of edit and check-config.)"""
        crossed = [
            InitErrorDetails(
                type="value_error", loc=problem.loc, input=problem.value,
                ctx={"error": ValueError(problem.message)},
            )
            for problem in _cross_section_problems(data)
        ]  # fmt: skip
        try:
            config = handler(data)
        except ValidationError as exc:
            if not crossed:
                raise
            raise ValidationError.from_exception_data(
                exc.title, [*map(_reraised, exc.errors()), *crossed]
            ) from None
        if crossed:
            raise ValidationError.from_exception_data(cls.__name__, crossed)
        return config

    def rule_for(self, topic: str) -> TopicRule:
        """The first rule whose filter matches ``topic``, else the catch-all (the last rule).

        The catch-all is the default policy of every topic, ``$`` ones included: MQTT keeps
        ``#`` from matching ``$SYS/...`` for subscribers, not for this. (A ``$aws/...`` event
        raised AssertionError here, and failed the listener's whole stage batch with it.)
        """
        for rule in self.topics:
            if topic_matches(rule.filter, topic):
                return rule
        return self.topics[-1]


def _reraised(error: ErrorDetails) -> InitErrorDetails:
    """``error`` as it was (type, path, message, value), to raise again with others."""
    return InitErrorDetails(
        type=PydanticCustomError(error["type"], error["msg"]),
        loc=error["loc"],
        input=error["input"],
    )


class _Problem(NamedTuple):
    """A broken rule over several keys: ``loc`` is the key to change, ``value`` its value."""

    loc: tuple[str | int, ...]
    message: str
    value: object


def _cross_section_problems(data: object) -> list[_Problem]:
    """Every broken rule over several keys or sections of ``data`` (a configuration not yet
    validated: the TOML's dict). A rule is skipped when a value it needs is missing or invalid:
    that value's own problem is reported instead."""
    if not isinstance(data, dict):
        return []  # a model instance: validated already
    found: list[_Problem] = []
    for check in _CHECKS:
        with contextlib.suppress(_Unknown):
            found.extend(check(data))
    return found


class _Unknown(Exception):
    """A value a rule needs is missing or invalid."""


def _part(section: object, key: str, default: object = None) -> object:
    """``section[key]`` as written (a dict, a list or a value), else ``default``."""
    if isinstance(section, BaseModel):
        return getattr(section, key, default)
    return section.get(key, default) if isinstance(section, dict) else default


def _value(model: type[BaseModel], section: object, key: str) -> Any:
    """``section[key]`` validated as ``model``'s field ``key`` (its default when absent);
    `_Unknown` if it is not valid (its field validators aside: no rule reads such a field)."""
    if isinstance(section, BaseModel):
        return getattr(section, key)
    field = model.model_fields[key]
    if not isinstance(section, dict) or (key not in section and field.is_required()):
        raise _Unknown
    if key not in section:
        return field.get_default(call_default_factory=True)
    try:
        return _adapter(model, key).validate_python(section[key])
    except ValidationError:
        raise _Unknown from None


@functools.cache
def _adapter(model: type[BaseModel], key: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[key].rebuild_annotation())


_Check = Callable[[dict[str, Any]], Iterator[_Problem]]


def _catch_all_last(data: dict[str, Any]) -> Iterator[_Problem]:
    topics = data.get("topics")
    if isinstance(topics, list) and topics:
        last = _value(TopicRule, topics[-1], "filter")
        if last != "#":
            yield _Problem(
                ("topics", len(topics) - 1, "filter"),
                'the last [[topics]] rule must have filter = "#" so that every topic has a policy',
                _part(topics[-1], "filter"),
            )


def _payloads_fit_the_listener(data: dict[str, Any]) -> Iterator[_Problem]:
    # A local device could never publish such a payload, and `edge-agent publish` (which goes
    # through the running agent's listener) failed as if the buffer were full.
    listener = _part(data, "listener", {})
    if not _value(ListenerConfig, listener, "enabled"):
        return
    size = _value(ListenerConfig, listener, "max_packet_size")
    room = size - PACKET_OVERHEAD
    topics = data.get("topics")
    for index, rule in enumerate(topics if isinstance(topics, list) else []):
        try:
            payload = _value(TopicRule, rule, "max_payload")
        except _Unknown:
            continue
        if payload > room:
            yield _Problem(
                ("topics", index, "max_payload"),
                f"max_payload over what the local listener accepts (listener.max_packet_size"
                f" {size} less {PACKET_OVERHEAD} bytes for the topic and header = {room}):"
                f" topics[{index}] ({_part(rule, 'filter')!r}): {payload}",
                _part(rule, "max_payload"),
            )


def _ports_apart(data: dict[str, Any]) -> Iterator[_Problem]:
    # Both bound at start: the second failed with "address already in use" after the buffer
    # was opened, which check-config had not seen coming.
    listener, metrics = _part(data, "listener", {}), _part(data, "metrics", {})
    if not _value(ListenerConfig, listener, "enabled"):
        return
    port, host = _value(ListenerConfig, listener, "port"), _value(ListenerConfig, listener, "host")
    metrics_port = _value(MetricsConfig, metrics, "port")
    metrics_host = _value(MetricsConfig, metrics, "host")
    if metrics_port and metrics_port == port and _same_address(host, metrics_host):
        yield _Problem(
            ("metrics", "port"),
            f"[listener] and [metrics] both listen on port {metrics_port}"
            f" ({host} and {metrics_host})",
            _part(metrics, "port"),
        )


def _listener_fails_closed(data: dict[str, Any]) -> Iterator[_Problem]:
    listener = _part(data, "listener", {})
    host = _value(ListenerConfig, listener, "host")
    if (
        _value(ListenerConfig, listener, "enabled")
        and _part(listener, "tls") is None
        and not _is_loopback(host)
    ):
        yield _Problem(
            ("listener", "host"),
            f"listening on {host!r} without authentication would let anyone on that network"
            " write into the buffer: bind 127.0.0.1/::1 or configure [listener.tls]",
            host,
        )


def _token_is_complete(data: dict[str, Any]) -> Iterator[_Problem]:
    token = _part(_part(data, "uplink"), "token")
    if token is None:
        return  # no [uplink], or no [uplink.token]: reported as missing
    mode = _value(UplinkToken, token, "mode")
    if mode == "device-signed" and not _value(UplinkToken, token, "audience"):
        yield _Problem(
            ("uplink", "token", "audience"),
            "device-signed tokens need an audience (the sink's [auth] audience)",
            _part(token, "audience", token),
        )
    if mode == "token-file" and _value(UplinkToken, token, "file") is None:
        yield _Problem(
            ("uplink", "token", "file"),
            "token-file mode needs file = the path of the token",
            token,  # missing
        )


def _token_renewed_before_expiry(data: dict[str, Any]) -> Iterator[_Problem]:
    token = _part(_part(data, "uplink"), "token")
    if token is None or _value(UplinkToken, token, "mode") != "device-signed":
        return
    if _value(UplinkToken, token, "renew_before") >= _value(UplinkToken, token, "lifetime"):
        yield _Problem(
            ("uplink", "token", "renew_before"),
            "renew_before must be shorter than the token lifetime",
            _part(token, "renew_before", token),
        )


def _backoffs_ordered(first: str, most: str) -> _Check:
    def check(data: dict[str, Any]) -> Iterator[_Problem]:
        uplink = _part(data, "uplink")
        if uplink is None:
            return
        if _value(UplinkConfig, uplink, first) > _value(UplinkConfig, uplink, most):
            yield _Problem(
                ("uplink", first),
                f"{first} must not be more than {most}",
                _part(uplink, first, uplink),
            )

    return check


_CHECKS: tuple[_Check, ...] = (
    _listener_fails_closed,
    _token_is_complete,
    _token_renewed_before_expiry,
    _backoffs_ordered("backoff_initial", "backoff_max"),
    _backoffs_ordered("refused_backoff_initial", "refused_backoff_max"),
    _catch_all_last,
    _payloads_fit_the_listener,
    _ports_apart,
)
"""In the order of the sections they concern. The listener's and the token's rules are here too:
as model validators of their sections they ran only once every key of the section was valid."""


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


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Parse and validate TOML text; raise `ConfigError` listing every problem."""
    return parse_model(AgentConfig, text, source)


def load_config(path: Path) -> AgentConfig:
    return load_model(AgentConfig, path)
