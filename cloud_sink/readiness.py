"""The readiness endpoint for load balancers and probes (SPEC §7), on `mqtt_ingest.http`.

- ``GET /healthz``: 200 ``ok`` while the process serves HTTP at all (liveness).
- ``GET /readyz``: 200 ``ready`` only while the MQTT listener is up and the core queue is up;
  otherwise 503 with a one-line reason (``starting``, ``core queue down: ...``, ``draining``,
  ``CRL ... expired at ...``: every TLS handshake fails then).
  A load balancer takes an instance out of rotation on 503, e.g. during an outage of its core
  queue or while SIGTERM drains it.
"""

from __future__ import annotations

from collections.abc import Callable

from mqtt_ingest.http import HttpEndpoint, Request, Response

__all__ = ["ReadinessServer"]


class ReadinessServer(HttpEndpoint):
    """``async with ReadinessServer(host, port, not_ready)``; ``not_ready()`` returns None when
    ready, else the reason. ``port`` is the bound port (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, not_ready: Callable[[], str | None]) -> None:
        self._not_ready = not_ready
        super().__init__(
            host,
            port,
            {b"/healthz": self._healthz, b"/readyz": self._readyz},
            announce="readiness endpoint at {url}/readyz",
        )

    async def _healthz(self, request: Request) -> Response:
        return Response(200, b"ok\n")

    async def _readyz(self, request: Request) -> Response:
        reason = self._not_ready()
        if reason is None:
            return Response(200, b"ready\n")
        return Response(503, f"not ready: {reason}\n".encode())
