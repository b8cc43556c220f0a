"""The servers under test in ``bench.ingest``: ours (`IngestServer` with a no-op durable stage)
and amqtt, each run in this script's ``serve`` mode, Mosquitto's configuration, and the PKI
they all use when TLS is on."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import shutil
import signal
import ssl
from collections.abc import Sequence
from pathlib import Path

from bench.drain_config import HOST, Pki
from bench.report import out

SERVERS = ("ours", "mosquitto", "amqtt")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# -- the servers under test (``serve`` mode for ours and amqtt) ---------------------------------


class _NoopStage:
    async def store(self, events: Sequence[object]) -> None:
        return None


def _server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    return context


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def _serve_ours(args: argparse.Namespace) -> None:
    from mqtt_ingest import Anonymous, IngestServer, Limits

    context = _server_context(args.ca, args.cert, args.key) if args.ca else None
    server = IngestServer(
        stage=_NoopStage(),
        authenticator=Anonymous(),
        host=HOST,
        port=args.port,
        ssl_context=context,
        limits=Limits(stop_deadline=1.0),
    )
    async with server:
        out(f"port {server.port}")
        await _until_sigterm()


async def _serve_amqtt(args: argparse.Namespace) -> None:
    from amqtt.broker import Broker

    listener: dict[str, object] = {"type": "tcp", "bind": f"{HOST}:{args.port}"}
    if args.ca:
        # amqtt's listener asks for a client certificate (CERT_OPTIONAL) and verifies it
        # against cafile; our clients always present one.
        listener |= {"ssl": True, "cafile": args.ca, "certfile": args.cert, "keyfile": args.key}
    config = {
        "listeners": {"default": listener},
        # Only what a broker needs to accept anonymous clients: no packet/event logging
        # plugins and no $SYS publisher, so amqtt is measured at its leanest.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    out(f"port {args.port}")
    try:
        await _until_sigterm()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 5)


def serve_main(args: argparse.Namespace) -> None:
    """Run a server until SIGTERM. With ``--profile``, cProfile runs between SIGUSR1 and SIGUSR2
    (the orchestrator sends them around the measured window) and its stats go to that file."""
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
        signal.signal(signal.SIGUSR2, lambda *_: profile.disable())
    try:
        asyncio.run(_serve_ours(args) if args.kind == "ours" else _serve_amqtt(args))
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)


# -- TLS material and the Mosquitto configuration -----------------------------------------------


def make_pki(directory: Path) -> Pki:
    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    device = ca.issue_device("bench-device")
    return Pki(ca.cert_path, server.cert_path, server.key_path, device.cert_path, device.key_path)


def mosquitto_config(port: int, pki: Pki | None, nodelay: bool) -> str:
    lines = [
        "user root",  # we run as root: stay root so the 0600 keys stay readable
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        f"set_tcp_nodelay {'true' if nodelay else 'false'}",
        f"listener {port} {HOST}",
        "allow_anonymous true",
    ]
    if pki is not None:
        lines += [
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
        ]
    return "\n".join(lines) + "\n"
