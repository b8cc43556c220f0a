"""The ground floor both wings stand on: identifiers, failpoints and the clock seam.

The strict MQTT 3.1.1 ingest server (SPEC §4) lands here too; neither ``edge_agent`` nor
``cloud_sink`` imports the other, both import this package.
"""

from mqtt_ingest.clock import Clock, FakeClock, SystemClock
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id

__all__ = [
    "Clock",
    "FakeClock",
    "InvalidIdentifier",
    "SystemClock",
    "validate_device_id",
]
