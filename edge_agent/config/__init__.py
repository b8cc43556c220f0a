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
    format = "batch-v2"        # or "raw" for any standard broker

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

from pathlib import Path
from typing import Any

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from edge_agent.config.rules import RULES
from edge_agent.config.sections import (
    AgentSection,
    BufferConfig,
    ListenerConfig,
    ListenerTls,
    MetricsConfig,
    Strict,
    TopicRule,
    UplinkBatch,
    UplinkConfig,
    UplinkTls,
    UplinkToken,
    topic_filter_problem,
    topic_matches,
)
from mqtt_ingest.configuration import ConfigError, load_model, parse_model, validated_with_rules

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
    "topic_filter_problem",
    "topic_matches",
]


class AgentConfig(Strict):
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
        """The rules over several keys or sections (`edge_agent.config.rules`), checked
        whatever else is wrong: each over the values it needs that are valid, each problem with
        the path of a key to change. (As model validators they ran only once every field was
        valid, and stopped at the first failure: a file with 7 mistakes took 6 rounds of edit
        and check-config.)"""
        return validated_with_rules(cls, data, handler, RULES)

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


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Parse and validate TOML text; raise `ConfigError` listing every problem."""
    return parse_model(AgentConfig, text, source)


def load_config(path: Path) -> AgentConfig:
    return load_model(AgentConfig, path)
