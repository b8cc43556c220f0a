"""The Prometheus endpoint both wings serve: ``GET /metrics`` on a small asyncio HTTP server.

It runs on the service's own event loop (no thread that could outlive the service) and exposes one
`prometheus_client.CollectorRegistry` that its owner built; nothing is registered in
prometheus-client's global default registry, so several agents or sinks can share a process.

Before each scrape the optional ``refresh`` coroutine runs (the agent reads its buffer there,
through the buffer's own thread); concurrent scrapes share one refresh. A refresh that fails or
takes longer than ``REFRESH_TIMEOUT`` does not fail the scrape: the collectors serve what they
have, and the failure is logged once until a refresh succeeds again.

The HTTP side is `mqtt_ingest.http` (bounded requests, ``GET``/``HEAD``, at most
``MAX_CLIENTS`` at a time). The text format 0.0.4 unless the ``Accept`` header asks for
OpenMetrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder

from mqtt_ingest.http import MAX_CLIENTS, HttpEndpoint, Request, Response

__all__ = ["MAX_CLIENTS", "REFRESH_TIMEOUT", "MetricsServer"]

log = logging.getLogger(__name__)

REFRESH_TIMEOUT = 10.0


class MetricsServer(HttpEndpoint):
    """``async with MetricsServer(host, port, registry, refresh=...)``; ``port`` is the bound
    port (0 picks a free one), logged as ``<name>: metrics at http://HOST:PORT/metrics``."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        name: str = "metrics",
    ) -> None:
        self._registry = registry
        self._refresh = refresh
        self._name = name
        self._refresh_lock = asyncio.Lock()
        self._refresh_failing = False
        super().__init__(
            host, port, {b"/metrics": self._metrics}, announce=f"{name}: metrics at {{url}}/metrics"
        )

    async def _metrics(self, request: Request) -> Response:
        await self._refreshed()
        accept = request.headers.get(b"accept", b"").decode("latin-1")
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # e.g. "text/plain; version=x.y": the default format
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
        return Response(200, encoder(self._registry), content_type)

    async def _refreshed(self) -> None:
        """Run ``refresh`` (one at a time); never raises but cancellation."""
        if self._refresh is None:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT), self._refresh_lock:
                await self._refresh()
        except Exception as exc:
            if not self._refresh_failing:
                log.warning(
                    "%s: refreshing metrics failed, serving older figures: %r", self._name, exc
                )
            self._refresh_failing = True
            return
        if self._refresh_failing:
            log.info("%s: refreshing metrics works again", self._name)
            self._refresh_failing = False
