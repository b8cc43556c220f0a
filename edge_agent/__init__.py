"""The edge agent: accept local device events, commit them to SQLite, forward over mTLS MQTT."""

from edge_agent.accept import InvalidEvent
from edge_agent.buffer import Buffer, BufferError, BufferFull, BufferLocked
from edge_agent.config import AgentConfig, ConfigError, load_config, parse_config
from edge_agent.service import Agent

__all__ = [
    "Agent",
    "AgentConfig",
    "Buffer",
    "BufferError",
    "BufferFull",
    "BufferLocked",
    "ConfigError",
    "InvalidEvent",
    "load_config",
    "parse_config",
]
