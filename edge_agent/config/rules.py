"""The configuration's rules over several keys or sections, checked whatever else is wrong
(`AgentConfig` runs them): each over the values it needs that are valid, each problem with the
path of a key to change."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from edge_agent.config.sections import (
    PACKET_OVERHEAD,
    ListenerConfig,
    MetricsConfig,
    TopicRule,
    UplinkConfig,
    UplinkToken,
    is_loopback,
    same_address,
)


def reraised(error: ErrorDetails) -> InitErrorDetails:
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


def cross_section_problems(data: object) -> list[_Problem]:
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
    if metrics_port and metrics_port == port and same_address(host, metrics_host):
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
        and not is_loopback(host)
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
