"""The ground floor both wings stand on: the strict MQTT 3.1.1 ingest server, its plug points,
device identifiers, failpoints and the clock seam (SPEC §4).

Neither ``edge_agent`` nor ``cloud_sink`` imports the other; both import this package.
"""

from mqtt_ingest.batching import StageFailed
from mqtt_ingest.clock import Clock, FakeClock, SystemClock
from mqtt_ingest.codec import ConnackCode, MalformedPacket, PacketTooLarge
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id
from mqtt_ingest.limits import Limits
from mqtt_ingest.metrics import Counters
from mqtt_ingest.ports import (
    Action,
    AllowAll,
    Anonymous,
    Authenticator,
    Availability,
    ConnectRequest,
    DurableStage,
    Identity,
    IngestEvent,
    Metrics,
    Refusal,
    StageRefused,
    TopicRights,
)
from mqtt_ingest.server import IngestServer

__all__ = [
    "Action",
    "AllowAll",
    "Anonymous",
    "Authenticator",
    "Availability",
    "Clock",
    "ConnackCode",
    "ConnectRequest",
    "Counters",
    "DurableStage",
    "FakeClock",
    "Identity",
    "IngestEvent",
    "IngestServer",
    "InvalidIdentifier",
    "Limits",
    "MalformedPacket",
    "Metrics",
    "PacketTooLarge",
    "Refusal",
    "StageFailed",
    "StageRefused",
    "SystemClock",
    "TopicRights",
    "validate_device_id",
]
