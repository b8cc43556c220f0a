"""``cloud-sink``: run the sink, check its configuration, read the embedded core queue, mint
issuer tokens.

Exit status: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from cloud_sink.auth import algorithm_for, thumbprint
from cloud_sink.backends import BackendError, read_messages
from cloud_sink.config import ConfigError, SinkConfig, SqliteBackendConfig, load_config, shown
from cloud_sink.service import Sink, StartAbandoned, preflight
from cloud_sink.systemd import LAYOUT, status
from cloud_sink.tls import TlsError
from mqtt_ingest.configuration import port_argument
from mqtt_ingest.identity import certificate_identities
from mqtt_ingest.install import add_install_command, install_command
from mqtt_ingest.lifecycle import reader_gone, stop_on_signals
from mqtt_ingest.systemd import Notifier, Supervisor

__all__ = ["main"]

DEFAULT_CONFIG = os.environ.get("CLOUD_SINK_CONFIG", "/etc/cloud-sink/sink.toml")
log = logging.getLogger("cloud_sink")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-sink",
        description="Terminates mutual-TLS MQTT from edge agents, checks certificate-bound JWTs "
        "and topic rights, and acknowledges an event only once the core queue confirmed it.",
    )
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve until SIGTERM/SIGINT (then drain and exit 0); SIGHUP reloads [auth] and"
        " the TLS files (CA, certificate, key, CRL) and judges open connections again",
    )
    run.add_argument(
        "--listen-port", type=port_argument, metavar="PORT", help="override [listener] port"
    )
    commands.add_parser(
        "check-config",
        help="validate the configuration and the files it names, then print it in full",
    )
    tail = commands.add_parser("tail", help="print the events in the sqlite core queue")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    token = commands.add_parser("issue-token", help="mint an issuer-signed device token")
    token.add_argument("--device", required=True)
    token.add_argument("--cert", type=Path, required=True, help="the device's certificate (PEM)")
    token.add_argument("--key", type=Path, required=True, help="the issuer's private key (PEM)")
    token.add_argument("--kid", required=True, help="key id (the sink's issuer key file stem)")
    token.add_argument("--issuer", required=True)
    token.add_argument("--audience", required=True)
    token.add_argument(
        "--ttl",
        type=_positive_seconds,
        default=3600.0,
        help="seconds (default 3600; the sink refuses tokens over its [auth] max_lifetime)",
    )
    add_install_command(commands, LAYOUT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "issue-token":
        return _issue_token(args)
    if args.command == "install":
        return install_command(args, LAYOUT)
    try:
        config = load_config(args.config)
        if args.command in ("check-config", "run"):
            problems = preflight(config)
            if problems:
                raise ConfigError(str(args.config), problems)
    except ConfigError as exc:
        print(f"cloud-sink: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "check-config":
            print(json.dumps(shown(config), indent=2))
            return 0
        if args.command == "tail":
            return _tail(config, args.follow, args.json)
        if args.listen_port is not None:
            listener = config.listener.model_copy(update={"port": args.listen_port})
            config = config.model_copy(update={"listener": listener})
        return asyncio.run(_run(config, args.config, args.listen_port))
    except (BackendError, TlsError, OSError, ValueError) as exc:
        print(f"cloud-sink: {exc}", file=sys.stderr)
        return 1


async def _run(config: SinkConfig, path: Path, listen_port: int | None) -> int:
    stop = stop_on_signals()
    # A stop while the core queue is connected (up to its timeout) gives the start up: it used
    # to wait for it, then exit 1 and leave the unit "failed".
    sink = Sink(config, abandon_on=stop)
    # The supervisor outlives the sink: watchdog pings go on while the sink drains.
    async with Supervisor(Notifier.from_environment()) as systemd:
        # Registered before the sink starts: SIGHUP's default action would end the process.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: _reload(sink, path, systemd, listen_port)
        )
        try:
            async with sink:
                log.info(
                    "cloud-sink ready: listening on %s:%d, core queue %s",
                    config.listener.host, sink.port, config.backend.type,
                )  # fmt: skip
                systemd.ready(lambda: status(sink))
                await stop.wait()
                systemd.stopping("stopping: draining in-flight publishes")
                log.info("stopping on signal: draining in-flight publishes")
                # A reload now would tell systemd RELOADING and READY after STOPPING.
                asyncio.get_running_loop().add_signal_handler(
                    signal.SIGHUP, lambda: log.warning("SIGHUP while stopping: ignored")
                )
        except StartAbandoned:  # raised by the start only
            systemd.stopping("stopped while starting")  # no READY=1 was sent
            log.info("cloud-sink stopped while starting")
            return 0
    log.info("cloud-sink stopped")
    return 0


def _reload(sink: Sink, path: Path, systemd: Supervisor, listen_port: int | None) -> None:
    """SIGHUP: read the configuration again; a file with problems changes nothing.
    ``listen_port``: `run --listen-port`, which overrides the file's port."""
    if not sink.running:
        log.warning("SIGHUP while starting: ignored; send it again once ready")
        return
    systemd.reload(lambda: _apply(sink, path, listen_port))


def _apply(sink: Sink, path: Path, listen_port: int | None) -> None:
    try:
        config = load_config(path)
        problems = preflight(config)
        if problems:
            raise ConfigError(str(path), problems)
        if listen_port is not None:
            # Compare like with like. Only then: a port changed in the file needs a restart,
            # which the reload must say.
            listener = config.listener.model_copy(update={"port": listen_port})
            config = config.model_copy(update={"listener": listener})
        restart = sink.reload(config)
    except (ConfigError, ValueError) as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    except Exception:
        # A bug, or a library error nobody translated: out of a signal callback it would only
        # be asyncio's "Exception in callback" traceback, not a refused reload.
        log.exception("reload refused, keeping the running configuration")
        return
    log.info("reloaded %s: auth settings and TLS context", path)
    if restart:
        log.warning("changed but only applied after a restart: %s", ", ".join(restart))


def _tail(config: SinkConfig, follow: bool, as_json: bool) -> int:
    if not isinstance(config.backend, SqliteBackendConfig):
        raise ValueError(f"tail reads the sqlite core queue; this sink uses {config.backend.type}")
    path = config.backend.path
    last = 0
    inode = None
    try:
        while True:
            if follow and path.exists() and path.stat().st_ino != inode:
                # A new file (restored, replaced): its positions start over.
                inode, last = path.stat().st_ino, 0
            last = _print_after(path, last, as_json)
            if not follow:
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C ends --follow: no traceback
        return 0
    except BrokenPipeError:  # `tail | head`
        return reader_gone()


def _print_after(path: Path, last: int, as_json: bool) -> int:
    """Print the messages after position ``last``; the last position printed."""
    for position, message in read_messages(path, after=last):
        last = position
        if as_json:
            record = {
                "position": position,
                "event_id": message.event_id,
                "device_id": message.device_id,
                "topic": message.topic,
                "seq": message.seq,
                "event_time_ms": message.event_time_ms,
                "received_at_ms": message.received_at_ms,
                "qos": message.qos,
                "payload": message.payload.decode("utf-8", errors="replace"),
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            text = message.payload[:80].decode("utf-8", errors="replace")
            print(f"{message.event_id}  {message.topic}  {text}", flush=True)
    return last


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (1 <= value < 10 * 365 * 86400):
        # JWT times are whole seconds: under 1 s, exp would equal iat.
        raise argparse.ArgumentTypeError(f"{text!r}: a lifetime is 1 s at least (and finite)")
    return value


def _issue_token(args: argparse.Namespace) -> int:
    try:
        certificate = x509.load_pem_x509_certificate(args.cert.read_bytes())
        key = load_pem_private_key(args.key.read_bytes(), password=None)
    except TypeError:  # cryptography's word for a key that needs a password
        print(f"cloud-sink: {args.key} is encrypted: give the key without a passphrase",
              file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, ValueError) as exc:
        print(f"cloud-sink: {exc}", file=sys.stderr)
        return 1
    names = certificate_identities(certificate)
    if args.device not in names:
        # The sink would refuse it (sub must equal the certificate's identity, its CN or its
        # device SAN URI depending on [auth] identity): say so now.
        shown = " / ".join(sorted(names)) or "no single CN nor device SAN URI"
        print(f"cloud-sink: {args.cert} is the certificate of {shown}, not of {args.device!r}",
              file=sys.stderr)  # fmt: skip
        return 1
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        print(f"cloud-sink: {args.key}: unsupported key type", file=sys.stderr)
        return 1
    try:
        algorithm = algorithm_for(key.public_key())
    except ValueError as exc:
        print(f"cloud-sink: {args.key}: {exc}", file=sys.stderr)
        return 1
    now = int(time.time())
    claims = {
        "sub": args.device,
        "aud": args.audience,
        "iss": args.issuer,
        "iat": now,
        "exp": now + int(args.ttl),
        "cnf": {"x5t#S256": thumbprint(certificate.public_bytes(Encoding.DER))},
    }
    print(jwt.encode(claims, key, algorithm=algorithm, headers={"kid": args.kid}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
