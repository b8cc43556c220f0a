"""The configuration's rules over several keys or sections, checked whatever else is wrong
(`AgentConfig` runs them): each over the values it needs that are valid, each problem with the
path of a key to change."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
from mqtt_ingest.configuration import Problem, Rule, UnknownValue, valid, written


def _catch_all_last(data: dict[str, Any]) -> Iterator[Problem]:
    topics = data.get("topics")
    if isinstance(topics, list) and topics:
        last = valid(TopicRule, topics[-1], "filter")
        if last != "#":
            yield Problem(
                ("topics", len(topics) - 1, "filter"),
                'the last [[topics]] rule must have filter = "#" so that every topic has a policy',
                written(topics[-1], "filter"),
            )


def _payloads_fit_the_listener(data: dict[str, Any]) -> Iterator[Problem]:
    # A local device could never publish such a payload, and `edge-agent publish` (which goes
    # through the running agent's listener) failed as if the buffer were full.
    listener = written(data, "listener", {})
    if not valid(ListenerConfig, listener, "enabled"):
        return
    size = valid(ListenerConfig, listener, "max_packet_size")
    room = size - PACKET_OVERHEAD
    topics = data.get("topics")
    for index, rule in enumerate(topics if isinstance(topics, list) else []):
        try:
            payload = valid(TopicRule, rule, "max_payload")
        except UnknownValue:
            continue
        if payload > room:
            yield Problem(
                ("topics", index, "max_payload"),
                f"max_payload over what the local listener accepts (listener.max_packet_size"
                f" {size} less {PACKET_OVERHEAD} bytes for the topic and header = {room}):"
                f" topics[{index}] ({written(rule, 'filter')!r}): {payload}",
                written(rule, "max_payload"),
            )


def _ports_apart(data: dict[str, Any]) -> Iterator[Problem]:
    # Both bound at start: the second failed with "address already in use" after the buffer
    # was opened, which check-config had not seen coming.
    listener, metrics = written(data, "listener", {}), written(data, "metrics", {})
    if not valid(ListenerConfig, listener, "enabled"):
        return
    port, host = valid(ListenerConfig, listener, "port"), valid(ListenerConfig, listener, "host")
    metrics_port = valid(MetricsConfig, metrics, "port")
    metrics_host = valid(MetricsConfig, metrics, "host")
    if metrics_port and metrics_port == port and same_address(host, metrics_host):
        yield Problem(
            ("metrics", "port"),
            f"[listener] and [metrics] both listen on port {metrics_port}"
            f" ({host} and {metrics_host})",
            written(metrics, "port"),
        )


def _listener_fails_closed(data: dict[str, Any]) -> Iterator[Problem]:
    listener = written(data, "listener", {})
    host = valid(ListenerConfig, listener, "host")
    if (
        valid(ListenerConfig, listener, "enabled")
        and written(listener, "tls") is None
        and not is_loopback(host)
    ):
        yield Problem(
            ("listener", "host"),
            f"listening on {host!r} without authentication would let anyone on that network"
            " write into the buffer: bind 127.0.0.1/::1 or configure [listener.tls]",
            host,
        )


def _token_is_complete(data: dict[str, Any]) -> Iterator[Problem]:
    token = written(written(data, "uplink"), "token")
    if token is None:
        return  # no [uplink], or no [uplink.token]: reported as missing
    mode = valid(UplinkToken, token, "mode")
    if mode == "device-signed" and not valid(UplinkToken, token, "audience"):
        yield Problem(
            ("uplink", "token", "audience"),
            "device-signed tokens need an audience (the sink's [auth] audience)",
            written(token, "audience", token),
        )
    if mode == "token-file" and valid(UplinkToken, token, "file") is None:
        yield Problem(
            ("uplink", "token", "file"),
            "token-file mode needs file = the path of the token",
            token,  # missing
        )


def _token_renewed_before_expiry(data: dict[str, Any]) -> Iterator[Problem]:
    token = written(written(data, "uplink"), "token")
    if token is None or valid(UplinkToken, token, "mode") != "device-signed":
        return
    if valid(UplinkToken, token, "renew_before") >= valid(UplinkToken, token, "lifetime"):
        yield Problem(
            ("uplink", "token", "renew_before"),
            "renew_before must be shorter than the token lifetime",
            written(token, "renew_before", token),
        )


def _backoffs_ordered(first: str, most: str) -> Rule:
    def check(data: dict[str, Any]) -> Iterator[Problem]:
        uplink = written(data, "uplink")
        if uplink is None:
            return
        if valid(UplinkConfig, uplink, first) > valid(UplinkConfig, uplink, most):
            yield Problem(
                ("uplink", first),
                f"{first} must not be more than {most}",
                written(uplink, first, uplink),
            )

    return check


RULES: tuple[Rule, ...] = (
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
