"""What the ingest server's fault tests share: the canary, a well-behaved client whose QoS 1
event must still be stored and acknowledged after a fault, and the PUBACK packet type the raw
clients' answers are compared with."""

from __future__ import annotations

import aiomqtt

from mqtt_ingest import IngestServer
from tests.harness.stages import RecordingStage

__all__ = ["PUBACK", "canary_publishes"]


PUBACK = 4


async def canary_publishes(server: IngestServer, stage: RecordingStage, tag: str) -> None:
    """A well-behaved client still gets its QoS 1 event stored and acknowledged."""
    async with aiomqtt.Client("127.0.0.1", server.port, identifier=f"canary-{tag}") as client:
        await client.publish("canary", tag.encode(), qos=1, timeout=5)
    assert tag.encode() in stage.payloads("canary")
