"""The running agent: owns the buffer, the local listener and the background tasks.

Python API::

    async with Agent(load_config(path)) as agent:
        event_id = await agent.publish("sensors/t1", b"21.5")   # returns once committed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from edge_agent.accept import Acceptor, InvalidEvent
from edge_agent.buffer import Buffer, BufferFull
from edge_agent.config import AgentConfig
from edge_agent.local import (
    LISTENER_FILE,
    ListenerTlsError,
    build_listener,
    listener_tls,
    remove_listener_file,
    write_listener_file,
)
from edge_agent.uplink import Uplink
from mqtt_ingest import IngestServer
from mqtt_ingest.clock import Clock, SystemClock
from mqtt_ingest.configuration import model_problems
from mqtt_ingest.lifecycle import cancel_until_done

if TYPE_CHECKING:
    # Imported when [metrics] is on: prometheus-client and its HTTP modules cost an agent
    # without metrics about 2 MB of RSS.
    from edge_agent.metrics import AgentMetrics
    from mqtt_ingest.exposition import MetricsServer

__all__ = ["Agent", "StartError"]

log = logging.getLogger(__name__)

STOP_GRACE = 3.0  # seconds the uplink gets on stop to see its in-flight messages acknowledged


_RESTART_ONLY = ("agent", "buffer", "listener", "metrics")
"""Config sections a SIGHUP does not apply (`Agent.reload` reports a change to them)."""


_Server = TypeVar("_Server", bound=contextlib.AbstractAsyncContextManager[Any])


class StartError(Exception):
    """The agent could not start: one line for the operator.

    ``exit_status`` is what ``edge-agent run`` exits with: 1 for what a restart may cure (a port
    in use: systemd restarts the agent), 2 for what only the operator can (``[listener.tls]``
    files missing or unusable), as an invalid configuration: the unit's
    ``RestartPreventExitStatus=2`` stops there instead of restarting in a loop.
    """

    def __init__(self, message: str, *, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Agent:
    def __init__(self, config: AgentConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._stack = contextlib.AsyncExitStack()
        self._buffer: Buffer | None = None
        self._acceptor: Acceptor | None = None
        self._listener: IngestServer | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._uplink: Uplink | None = None
        self._uplink_task: asyncio.Task[None] | None = None
        self._id_prefix = ""
        self._metrics: AgentMetrics | None = None
        self._metrics_server: MetricsServer | None = None

    @property
    def buffer(self) -> Buffer:
        if self._buffer is None:
            raise RuntimeError("the agent is not running")
        return self._buffer

    @property
    def running(self) -> bool:
        return self._acceptor is not None

    @property
    def uplink(self) -> Uplink | None:
        return self._uplink

    @property
    def listener_port(self) -> int | None:
        return self._listener.port if self._listener is not None else None

    @property
    def metrics(self) -> AgentMetrics:
        if self._metrics is None:
            raise RuntimeError("the agent is not running with [metrics] port set")
        return self._metrics

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus endpoint's port, None when ``[metrics] port`` is not set."""
        return self._metrics_server.port if self._metrics_server is not None else None

    def event_id(self, seq: int) -> str:
        return f"{self.config.agent.device_id}/{self.buffer.epoch}/{seq}"

    async def __aenter__(self) -> Agent:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        listener_context: ssl.SSLContext | None = None
        if self.config.listener.enabled and self.config.listener.tls is not None:
            # Before the buffer opens (an integrity check may take minutes): OpenSSL's own
            # error for a missing file is a traceback naming no file.
            try:
                listener_context, _ = listener_tls(self.config.listener.tls)
            except ListenerTlsError as exc:
                raise StartError(str(exc), exit_status=2) from None
        settings = self.config.buffer
        self._buffer = await Buffer.open(
            self.config.agent.data_dir,
            durability=settings.durability,
            max_events=settings.max_events,
            max_bytes=settings.max_bytes,
            commit_linger=settings.commit_linger,
            commit_max_events=settings.commit_max_events,
            clock=self.clock,
            disk_reserve=settings.disk_reserve,
            run_files=(LISTENER_FILE,),
        )
        self._stack.push_async_callback(self._buffer.aclose)
        if self.config.uplink is not None:
            self._uplink = Uplink(self.config, self._buffer, self.clock)
            self._buffer.on_commit = self._uplink.committed
        self._id_prefix = f"{self.config.agent.device_id}/{self._buffer.epoch}/"
        await self._reprioritize(self.config)  # the rules may have changed since the last run
        self._acceptor = Acceptor(self.config, self._buffer, self.clock)
        self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.push_async_callback(self._cancel_tasks)
        self._sweeper = self._tasks.create_task(self._sweep_loop(), name="edge_agent.ttl_sweep")
        if self._uplink is not None:
            self._uplink_task = self._tasks.create_task(
                self._uplink.run(), name="edge_agent.uplink"
            )
            self._stack.push_async_callback(self._stop_uplink)
        metrics_port = self.config.metrics.port
        if metrics_port is not None:  # entered before the listener: stops after it
            from edge_agent.metrics import AgentMetrics
            from mqtt_ingest.exposition import MetricsServer

            self._metrics = AgentMetrics(
                self.config,
                self._buffer,
                self.clock,
                uplink=self._uplink,
                listener=self._get_listener,
            )
            self._stack.push_async_callback(self._metrics.aclose)  # after the server stops
            metrics = self.config.metrics
            self._metrics_server = await self._listen(
                "[metrics]",
                metrics.host,
                metrics_port,
                MetricsServer(
                    metrics.host,
                    metrics_port,
                    self._metrics.registry,
                    refresh=self._metrics.refresh,
                    name="edge-agent",
                ),
            )
        if self.config.listener.enabled:
            listener = self.config.listener
            self._listener = await self._listen(
                "[listener]",
                listener.host,
                listener.port,
                build_listener(listener, self._acceptor, listener_context),
            )
            write_listener_file(
                self.config.agent.data_dir,
                listener.host,
                self._listener.port,
                listener.tls is not None,
            )
            self._stack.callback(remove_listener_file, self.config.agent.data_dir)
        log.info(
            "edge-agent %s ready: buffer %s (epoch %s, %d events)%s",
            self.config.agent.device_id,
            self.config.agent.data_dir,
            self._buffer.epoch,
            (await self._buffer.stats()).events,
            f", listener on {self.config.listener.host}:{self.listener_port}"
            if self._listener is not None
            else "",
        )

    async def _listen(self, section: str, host: str, port: int, server: _Server) -> _Server:
        """Enter ``server``; a port that cannot be bound is a one-line `StartError`."""
        try:
            await self._stack.enter_async_context(server)
        except OSError as exc:
            # asyncio's bind error has a long strerror; a host name that does not resolve
            # (socket.gaierror) has a negative errno.
            errno = exc.errno or 0
            reason = os.strerror(errno) if errno > 0 else (exc.strerror or str(exc))
            raise StartError(f"cannot listen on {host}:{port} ({section}): {reason}") from None
        return server

    async def _reprioritize(self, config: AgentConfig) -> None:
        """Buffered events take their topic's priority under ``config``'s rules: one topic's
        events at two priorities would be drained out of seq order (SPEC P3), the newer first.
        A failure is logged: the events keep their old priority, nothing else changes."""
        assert self._buffer is not None
        try:
            changed = await self._buffer.reprioritize(lambda topic: config.rule_for(topic).priority)
        except Exception:
            log.exception("buffer: could not give buffered events their new topic priorities")
            return
        if changed:
            log.info("buffer: %d buffered events took their topic's new priority", changed)
            if self._uplink is not None:
                self._uplink.priorities_changed()

    def _get_listener(self) -> IngestServer | None:
        return self._listener

    async def _cancel_tasks(self) -> None:
        # Again only after a few seconds: the uplink's clean-up after its cancellation (closing
        # the connection, the last delete of acknowledged rows) is not cut short by the next.
        tasks = [t for t in (self._sweeper, self._uplink_task) if t is not None]
        await cancel_until_done(tasks, again_every=STOP_GRACE)

    async def _stop_uplink(self) -> None:
        """Let the uplink finish what is in flight for a moment, then cut it."""
        assert self._uplink is not None
        assert self._uplink_task is not None
        self._uplink.stop(grace=STOP_GRACE)
        done, _ = await asyncio.wait({self._uplink_task}, timeout=STOP_GRACE + 2)
        if not done:
            log.warning("uplink: still busy after %ss; cutting it", STOP_GRACE + 2)
            self._uplink_task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The API first: a publish now would be committed after the uplink stopped (or fail on
        # a closed buffer); `running` says False. The listener keeps its own reference.
        self._acceptor = None
        # Listener first (stops accepting, acks what is in flight), then tasks, then the buffer.
        await self._stack.aclose()
        log.info("edge-agent %s stopped", self.config.agent.device_id)

    async def publish(self, topic: str, payload: bytes) -> str:
        """Accept one event; return its id once it is committed.

        Raises `edge_agent.InvalidEvent` (bad topic, payload over the rule's ``max_payload``),
        `TypeError` (a payload that is not bytes) or `edge_agent.BufferFull` (the rule says
        ``reject`` and the buffer is full).
        """
        if self._acceptor is None:
            raise RuntimeError("the agent is not running")
        return self._id_prefix + str(await self._acceptor.accept(topic, payload))

    async def publish_many(self, events: Iterable[tuple[str, bytes]]) -> list[str | BufferFull]:
        """Accept several events, committed together; return, in their order, each one's id or
        the `edge_agent.BufferFull` that refused it (a ``reject`` rule and a full buffer; the
        others are committed all the same).

        For a producer that has many events at once (a poll of many sensors): one wait for one
        commit, instead of one per event. Raises `edge_agent.InvalidEvent` naming the first bad
        event (its index in ``reason``); then none of them is stored.
        """
        if self._acceptor is None:
            raise RuntimeError("the agent is not running")
        acceptor = self._acceptor
        prepared = []
        for index, (topic, payload) in enumerate(events):
            try:
                prepared.append(acceptor.prepare(topic, payload))
            except InvalidEvent as exc:
                raise InvalidEvent(exc.topic, f"event {index}: {exc.reason}") from None
        if not prepared:
            return []
        prefix = self._id_prefix
        return [
            outcome if isinstance(outcome, BufferFull) else prefix + str(outcome)
            for outcome in await acceptor.accept_many(prepared)
        ]

    def reload(self, config: AgentConfig) -> list[str]:
        """Apply a new configuration to the running agent (SIGHUP): the topic rules at once, the
        uplink's settings, certificates, key and token from a new connection started at once.

        Raise ValueError if the new uplink material is unusable: nothing is applied then. Returns
        the sections that changed but only take effect after a restart.
        """
        if self._acceptor is None:
            raise RuntimeError("the agent is not running")
        old = self.config
        restart = [name for name in _RESTART_ONLY if getattr(old, name) != getattr(config, name)]
        # What runs is what `config` says: the sections only a restart applies stay as they were.
        kept: dict[str, object] = {name: getattr(old, name) for name in _RESTART_ONLY}
        if (old.uplink is None) != (config.uplink is None):
            restart.append("uplink (added or removed)")
            kept["uplink"] = old.uplink  # the running uplink's (or none): a later reload compares
        running = config.model_copy(update=kept)
        # The new rules must hold with the sections that keep running: a max_payload that fits
        # only the new file's [listener] would have been applied with the old one.
        problems = model_problems(running)
        if problems:
            raise ValueError(
                "with the sections only a restart changes kept as they run: " + "; ".join(problems)
            )
        if "uplink" not in kept and self._uplink is not None and config.uplink is not None:
            # Even with the same settings: the files behind the same paths may have changed.
            self._uplink.reload(config.uplink)
        self._acceptor.config = running
        if config.topics != old.topics and self._tasks is not None:
            self._tasks.create_task(self._reprioritize(running), name="edge_agent.reprioritize")
        self.config = running
        return restart

    async def _sweep_loop(self) -> None:
        interval = self.config.buffer.ttl_sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.buffer.sweep_expired()
            except Exception:
                log.exception("buffer: TTL sweep failed; retrying in %ss", interval)
