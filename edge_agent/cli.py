"""``edge-agent``: run the agent, publish from scripts, inspect and manage the buffer.

Exit status: 0 success, 1 the operation failed (event not committed, buffer locked, ...),
2 bad usage or configuration (also `run` refused for ``[listener.tls]`` files it cannot use:
systemd's ``RestartPreventExitStatus=2`` does not restart it in a loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiomqtt

from edge_agent.accept import Acceptor, InvalidEvent, check_event
from edge_agent.buffer import (
    DB_NAME,
    Buffer,
    BufferError,
    BufferFull,
    BufferLocked,
    DeadLetter,
    StoredEvent,
    agent_pid,
    inspect,
    read_dead_letters,
    read_epoch,
    read_events,
)
from edge_agent.config import (
    AgentConfig,
    ConfigError,
    load_config,
    topic_filter_problem,
    topic_matches,
)
from edge_agent.doctor import Check, run_checks
from edge_agent.local import read_listener_file
from edge_agent.memory import tune_malloc
from edge_agent.service import Agent, StartError
from edge_agent.status import disk_room, link_text, read_link, status_json, status_text
from edge_agent.systemd import LAYOUT, status
from edge_agent.token import TokenUnavailable, token_source
from mqtt_ingest.clock import SystemClock
from mqtt_ingest.configuration import port_argument
from mqtt_ingest.install import add_install_command, install_command
from mqtt_ingest.lifecycle import reader_gone, stop_on_signals
from mqtt_ingest.systemd import Notifier, Supervisor

__all__ = ["main"]

DEFAULT_CONFIG = os.environ.get("EDGE_AGENT_CONFIG", "/etc/edge-agent/agent.toml")
log = logging.getLogger("edge_agent")


class _Failed(Exception):
    """A one-line error for the user, exit status 1."""


_TOPIC_HELP = (
    "only topics matching this MQTT filter; '#' and '+' at the first level match '$' topics"
    " too (the catch-all rule buffers them)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Store-and-forward MQTT agent: every event is committed to SQLite before it "
        "is acknowledged.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG),
        help="TOML configuration (default $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent until SIGTERM or SIGINT")
    run.add_argument(
        "--listen-port",
        type=port_argument,
        metavar="PORT",
        help="override [listener] port (0: any free port, printed in the ready line)",
    )
    commands.add_parser("check-config", help="validate the configuration and print it in full")
    publish = commands.add_parser(
        "publish", help="commit one event; exit 0 only once it is in the buffer"
    )
    publish.add_argument("topic")
    publish.add_argument("payload", nargs="?", default="-", help="the payload, or - for stdin")
    publish.add_argument(
        "--qos",
        type=int,
        choices=[1, 2],
        default=1,
        help="QoS of the hop to the running agent's listener (the uplink QoS comes from the "
        "topic rules)",
    )
    status = commands.add_parser("status", help="backlog, drops, dead letters (read-only)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    buffer = commands.add_parser("buffer", help="look into or empty the buffer")
    actions = buffer.add_subparsers(dest="action", required=True, metavar="ACTION")
    peek = actions.add_parser("peek", help="show the next events in drain order")
    peek.add_argument("-n", type=_positive, default=10, help="how many (default 10)")
    peek.add_argument("--topic", type=_topic_filter, help=_TOPIC_HELP)
    export = actions.add_parser("export", help="every buffered event as JSON lines")
    export.add_argument("--topic", type=_topic_filter, help=_TOPIC_HELP)
    export.add_argument("--output", type=Path, help="file to write (default stdout)")
    purge = actions.add_parser("purge", help="delete buffered events (the agent must be stopped)")
    purge.add_argument("--topic", type=_topic_filter, help=_TOPIC_HELP)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dead = actions.add_parser("dead", help="the dead letters, with why each was set aside")
    dead.add_argument("-n", type=_positive, help="how many (default all)")
    actions.add_parser(
        "requeue-dead",
        help="move every dead letter back into the buffer to be sent again (agent stopped)",
    )
    commands.add_parser(
        "token", help="print the JWT the uplink would send on its next connection (debugging)"
    )
    commands.add_parser(
        "doctor",
        help="check config, files, clock, certificate, key, DNS, TCP, TLS and one real CONNECT",
    )
    add_install_command(commands, LAYOUT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "install":  # before there is a configuration to load
        return install_command(args, LAYOUT)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if args.command == "doctor":  # its first check, failed: nothing later can run
            print(Check("config", False, str(exc), "correct each item listed").line())
            return 1
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            tune_malloc()
            if args.listen_port is not None:
                listener = config.listener.model_copy(update={"port": args.listen_port})
                config = config.model_copy(update={"listener": listener})
            return asyncio.run(_run(config, args.config, args.listen_port))
        if args.command == "check-config":
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        if args.command == "publish":
            # fsencode: the argument's bytes as given, whatever the locale (not UTF-8 text).
            payload = sys.stdin.buffer.read() if args.payload == "-" else os.fsencode(args.payload)
            return asyncio.run(_publish(config, args.topic, payload, args.qos))
        if args.command == "status":
            stats = inspect(config.agent.data_dir)
            link = read_link(config)
            disk = disk_room(config)
            if args.json:
                print(json.dumps(status_json(stats) | {"disk": disk, "uplink": link}))
            else:
                print(status_text(stats, config, disk) + "\n" + link_text(link))
            return 0
        if args.command == "doctor":
            failed = 0
            for check in run_checks(config, args.config):
                print(check.line(), flush=True)
                failed += not check.ok
            return 1 if failed else 0
        if args.command == "token":
            if config.uplink is None:
                raise _Failed("no [uplink] configured")
            token = token_source(config.uplink, config.agent.device_id, SystemClock()).current()
            if token.value is None:
                raise _Failed('[uplink.token] mode = "none": the uplink sends no token')
            print(token.value)
            return 0
        return _buffer_command(config, args)
    except StartError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return exc.exit_status
    except (_Failed, BufferError, InvalidEvent, TokenUnavailable) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `check-config | head`, `status | head`
        return reader_gone()


async def _run(config: AgentConfig, path: Path, listen_port: int | None) -> int:
    stop = stop_on_signals()
    agent = Agent(config)
    # The supervisor outlives the agent: watchdog pings go on while the agent drains.
    async with Supervisor(Notifier.from_environment()) as systemd:
        # Registered before the agent starts: SIGHUP's default action would end the process.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: _reload(agent, path, systemd, listen_port)
        )
        async with agent:
            # A damaged database (no check saw it at the open), a committer stopped by a bug:
            # stop, exit 1, and let systemd restart the agent (whose open quarantines a damaged
            # database); staying up failed every commit.
            agent.buffer.on_failure = lambda _: stop.set()
            if agent.buffer.failure is not None:  # while the agent started, before the hook
                stop.set()
            systemd.ready(lambda: status(agent))
            await stop.wait()
            systemd.stopping()
            if agent.buffer.failure is not None:
                log.error(
                    "stopping: the buffer failed (%r); exiting 1 to be restarted",
                    agent.buffer.failure,
                )
            else:
                log.info("stopping on signal")
            # A reload now would start the uplink on a new connection while it settles its
            # in-flight messages for the stop.
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: log.warning("SIGHUP while stopping: ignored")
            )
    # Also a failure during the stop (the last commits, the close).
    return 1 if agent.buffer.failure is not None else 0


def _reload(agent: Agent, path: Path, systemd: Supervisor, listen_port: int | None) -> None:
    """SIGHUP: read the configuration file again; a file with problems changes nothing.
    ``listen_port``: `run --listen-port`, which overrides the file's port."""
    if not agent.running:
        log.warning("SIGHUP while starting: ignored; send it again once ready")
        return
    systemd.reload(lambda: _apply(agent, path, listen_port))


def _apply(agent: Agent, path: Path, listen_port: int | None) -> None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    if listen_port is not None:
        # Compare like with like. Only then: a port changed in the file needs a restart, which
        # the reload must say.
        config = config.model_copy(
            update={"listener": config.listener.model_copy(update={"port": listen_port})}
        )
    try:
        restart = agent.reload(config)
    except (ValueError, RuntimeError) as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    log.info("reloaded %s", path)
    if restart:
        log.warning("changed but only applied after a restart: %s", ", ".join(restart))


async def _publish(config: AgentConfig, topic: str, payload: bytes, qos: int) -> int:
    """Through the running agent's listener if an agent runs; else straight into the buffer.

    Only the listener of the process that holds the buffer's lock is trusted: a PUBACK from
    whatever else answers on the configured port (a Mosquitto on 1883) stores nothing here.
    """
    check_event(config, topic, payload)  # a clear error before anything is sent
    directory = config.agent.data_dir
    pid = agent_pid(directory)
    listener = None if pid is None else read_listener_file(directory)
    if pid is not None and listener is not None:
        if listener.pid != pid or listener.tls:
            raise _Failed(
                f"the agent (pid {pid}) holds {directory} and has no plain local listener"
                " to take the event: nothing was stored"
            )
        host = "127.0.0.1" if listener.host in ("0.0.0.0", "::", "") else listener.host  # noqa: S104
        size = _publish_size(topic, payload, qos)
        if config.listener.max_packet_size < size:
            # A long topic: max_payload leaves room for about 1,000 bytes of it. The listener
            # would close the connection on the packet, which said nothing about why.
            raise _Failed(
                f"the PUBLISH would be {size} bytes, over the listener's max_packet_size"
                f" ({config.listener.max_packet_size}): nothing was stored"
            )
        try:
            identifier = f"edge-agent-publish-{os.getpid()}"
            async with aiomqtt.Client(
                host, listener.port, identifier=identifier, timeout=10
            ) as client:
                await _publish_until_closed(client, topic, payload, qos)
        except* aiomqtt.MqttError as group:
            exc = group.exceptions[0]
            raise _Failed(f"the agent's listener did not confirm the event: {exc}") from None
        return 0
    # No agent, or a holder without a listener: most often another `edge-agent publish` with
    # the agent stopped, which holds the lock while it commits (half of eight run at once
    # failed, told an agent held the directory). The open waits for the lock a moment.
    try:
        buffer = await _open_buffer(config)
    except BufferLocked:
        raise _Failed(
            f"the agent (pid {agent_pid(directory)}) holds {directory} and has no plain local"
            " listener to take the event: nothing was stored"
        ) from None
    except BufferError as exc:
        raise _Failed(str(exc)) from None
    async with buffer:
        acceptor = Acceptor(config, buffer, SystemClock())
        try:
            seq = await acceptor.accept(topic, payload)
        except BufferFull as exc:
            raise _Failed(str(exc)) from None
    print(f"{config.agent.device_id}/{buffer.epoch}/{seq}")
    return 0


def _publish_size(topic: str, payload: bytes, qos: int) -> int:
    """The whole PUBLISH packet's size, as the listener measures it."""
    remaining = 2 + len(topic.encode("utf-8", "surrogatepass")) + (2 if qos else 0) + len(payload)
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining


async def _publish_until_closed(
    client: aiomqtt.Client, topic: str, payload: bytes, qos: int
) -> None:
    """Publish and wait for the PUBACK / PUBCOMP, failing as soon as the listener closes the
    connection: that is how it refuses an event (a full buffer with ``reject``), and aiomqtt's
    publish alone would only notice at its timeout."""

    async def closed() -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for _ in client.messages:
                pass  # we subscribe to nothing: the iteration ends when the connection does
        raise aiomqtt.MqttError(
            "the agent closed the connection instead: it refused the event (a full buffer"
            " with on_full = reject, say: see `edge-agent status` and the agent's log)"
        )

    async with asyncio.TaskGroup() as tasks:
        watch = tasks.create_task(closed(), name="edge_agent.cli.publish_watch")
        await client.publish(topic, payload, qos=qos, timeout=30)
        watch.cancel()


def _topic_filter(text: str) -> str:
    problem = topic_filter_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)  # it would match nothing, silently
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return min(value, 2**63 - 1)  # SQLite's largest integer: "all" for any buffer


def _event_json(event: StoredEvent, id_prefix: str) -> str:
    record: dict[str, object] = {
        "id": f"{id_prefix}{event.seq}",
        "seq": event.seq,
        "topic": event.topic,
        "qos": event.qos,
        "priority": event.priority,
        "event_time_ms": event.event_time_ms,
        "attempts": event.attempts,
    }
    return _with_payload(record, event.payload)


def _dead_json(letter: DeadLetter, id_prefix: str) -> str:
    record: dict[str, object] = {
        "id": f"{id_prefix}{letter.seq}",
        "seq": letter.seq,
        "topic": letter.topic,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "dead_at_ms": letter.dead_at_ms,
    }
    return _with_payload(record, letter.payload)


def _with_payload(record: dict[str, object], payload: bytes) -> str:
    try:
        record["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_hex"] = payload.hex()
    return json.dumps(record, ensure_ascii=False)


def _buffer_command(config: AgentConfig, args: argparse.Namespace) -> int:
    directory = config.agent.data_dir
    pattern: str | None = getattr(args, "topic", None)
    matcher = (lambda topic: topic_matches(pattern, topic, dollar=True)) if pattern else None
    if args.action in ("peek", "export", "dead"):
        try:
            prefix = f"{config.agent.device_id}/{read_epoch(directory)}/"
            return _read_out(directory, args, matcher, prefix)
        except BrokenPipeError:  # `export | head`
            return reader_gone()
    if not (directory / DB_NAME).exists():
        # Opening would create an empty buffer there (a typo in data_dir, say).
        raise _Failed(f"no buffer at {directory / DB_NAME}")
    if args.action == "requeue-dead":
        return asyncio.run(_requeue_dead(config))
    epoch, seqs = asyncio.run(_matching(config, pattern))
    what = f"{len(seqs)} events" + (f" on {pattern!r}" if pattern else "")
    if not seqs:
        print("nothing to purge", file=sys.stderr)
        return 0
    if not args.yes:
        # Asked with the buffer closed: the agent may start while the operator thinks.
        if not sys.stdin.isatty():
            raise _Failed(f"purge would delete {what}: confirm with --yes")
        try:
            answer = input(f"delete {what} from {directory}? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
            print(file=sys.stderr)
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    removed = asyncio.run(_purge(config, epoch, seqs))
    print(f"purged {removed} events", file=sys.stderr)
    return 0


def _read_out(
    directory: Path,
    args: argparse.Namespace,
    matcher: Callable[[str], bool] | None,
    id_prefix: str,
) -> int:
    if args.action == "dead":
        for letter in read_dead_letters(directory, limit=args.n or -1):
            print(_dead_json(letter, id_prefix))
        return 0
    if args.action == "peek":
        for event in read_events(directory, limit=args.n, topic_filter=matcher):
            print(_event_json(event, id_prefix))
        return 0
    try:
        target = open(args.output, "w", encoding="utf-8") if args.output else None  # noqa: SIM115
    except OSError as exc:
        raise _Failed(f"cannot write {args.output}: {exc.strerror}") from None
    with target or contextlib.nullcontext(sys.stdout) as out:
        count = 0
        for event in read_events(directory, topic_filter=matcher):
            out.write(_event_json(event, id_prefix) + "\n")
            count += 1
    print(f"exported {count} events", file=sys.stderr)
    return 0


def _open_buffer(config: AgentConfig) -> Awaitable[Buffer]:
    """The buffer with the configured limits, for the commands that change it (the agent
    stopped: they take its lock)."""
    return Buffer.open(
        config.agent.data_dir,
        durability=config.buffer.durability,
        commit_linger=0,
        max_events=config.buffer.max_events,
        max_bytes=config.buffer.max_bytes,
        disk_reserve=config.buffer.disk_reserve,
    )


async def _requeue_dead(config: AgentConfig) -> int:
    async with await _open_buffer(config) as buffer:
        moved = await buffer.requeue_dead(lambda topic: config.rule_for(topic).ttl)
    print(f"requeued {moved} dead letters", file=sys.stderr)
    return 0


async def _matching(config: AgentConfig, pattern: str | None) -> tuple[str, list[int]]:
    """The buffer's epoch and the seqs of the events ``pattern`` matches (all with None)."""
    async with await _open_buffer(config) as buffer:
        seqs: list[int] = []
        after = None
        while batch := await buffer.next_events(1000, after):
            seqs += [
                e.seq
                for e in batch
                if pattern is None or topic_matches(pattern, e.topic, dollar=True)
            ]
            after = (batch[-1].priority, batch[-1].seq)
    return buffer.epoch, seqs


async def _purge(config: AgentConfig, epoch: str, seqs: list[int]) -> int:
    async with await _open_buffer(config) as buffer:
        if buffer.epoch != epoch:
            # Quarantined and started afresh while the operator was asked: the same seqs now
            # name other events.
            raise _Failed("the buffer was replaced since it was listed: nothing deleted")
        return await buffer.delete(seqs, drop_reason="purged")


if __name__ == "__main__":
    sys.exit(main())
