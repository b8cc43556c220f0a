"""bench.drain's TLS material and configuration files: the PKI (from our ``certs`` package) and
the TOML of the agent and the sink, the Mosquitto config."""

from __future__ import annotations

import argparse
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUDIENCE",
    "DEVICE",
    "HOST",
    "Pki",
    "agent_toml",
    "batch_format",
    "make_pki",
    "mosquitto_conf",
    "sink_toml",
    "write_agent_config",
]

HOST = "127.0.0.1"
DEVICE = "bench-dev"
AUDIENCE = "bench-sink"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path
    device_key: Path

    def client_context(self) -> ssl.SSLContext:
        """As the agent builds it (`edge_agent.tls.client_context`)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.device_cert), str(self.device_key))
        return context


def make_pki(directory: Path) -> Pki:
    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    device = ca.issue_device(DEVICE)
    return Pki(ca.cert_path, server.cert_path, server.key_path, device.cert_path, device.key_path)


def batch_format(args: argparse.Namespace | None) -> str:
    """The batch envelope format of (b)-(d): ``--format``, else the agent's default."""
    from edge_agent.config import UplinkConfig

    if args is not None and args.format is not None:
        return str(args.format)
    return str(UplinkConfig.model_fields["format"].default)


def agent_toml(
    data_dir: Path,
    pki: Pki,
    port: int,
    *,
    raw: bool,
    window: int,
    durability: str,
    args: argparse.Namespace | None = None,
) -> str:
    """One catch-all rule (QoS 1, priority 0); raw: no password (Mosquitto checks the
    certificate), batch: device-signed tokens for the sink. The lingers are the agent's defaults
    unless ``--commit-linger`` / ``--batch-linger`` set them."""
    token = 'mode = "none"' if raw else f'audience = "{AUDIENCE}"'
    buffer_extra = uplink_batch = ""
    if args is not None and args.commit_linger is not None:
        buffer_extra = f'commit_linger = "{args.commit_linger:g}ms"\n'
    if args is not None and args.batch_linger is not None:
        uplink_batch = f'[uplink.batch]\nlinger = "{args.batch_linger:g}ms"\n\n'
    return (
        f'[agent]\ndevice_id = "{DEVICE}"\ndata_dir = {json.dumps(str(data_dir))}\n\n'
        f'[buffer]\ndurability = "{durability}"\nmax_events = 100_000_000\nmax_bytes = "64GiB"\n'
        f"{buffer_extra}\n"
        "[listener]\nport = 0\n\n"
        f'[uplink]\nhost = "localhost"\nport = {port}\n'
        f'format = "{"raw" if raw else batch_format(args)}"\nwindow = {window}\n\n'
        f"{uplink_batch}"
        f'[uplink.tls]\nca = "{pki.ca}"\ncert = "{pki.device_cert}"\nkey = "{pki.device_key}"\n\n'
        f"[uplink.token]\n{token}\n\n"
        '[[topics]]\nfilter = "#"\nqos = 1\n'
    )


def write_agent_config(
    root: Path,
    data_dir: Path,
    pki: Pki,
    port: int,
    args: argparse.Namespace,
    *,
    raw: bool,
    durability: str | None = None,
) -> Path:
    """``root/agent.toml`` with the run's window, lingers and durability (unless overridden)."""
    config = root / "agent.toml"
    config.write_text(
        agent_toml(
            data_dir,
            pki,
            port,
            raw=raw,
            window=args.window,
            durability=durability or args.durability,
            args=args,
        )
    )
    return config


def sink_toml(pki: Pki, core: Path, linger_ms: float | None) -> str:
    """The sink's defaults, but for ``[listener] batch_linger`` when ``--sink-linger`` sets it."""
    linger = "" if linger_ms is None else f'batch_linger = "{linger_ms:g}ms"\n'
    return (
        f'[listener]\nhost = "127.0.0.1"\nport = 0\nca = "{pki.ca}"\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n{linger}\n'
        f'[auth]\naudience = "{AUDIENCE}"\n\n'
        f'[backend]\ntype = "sqlite"\npath = {json.dumps(str(core))}\n'
    )


def mosquitto_conf(port: int, pki: Pki) -> str:
    return "\n".join(
        [
            "user root",  # run as root: stay root so that the 0600 keys stay readable
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",  # the readiness line
            "connection_messages false",
            "set_tcp_nodelay true",
            f"listener {port} {HOST}",
            "allow_anonymous true",
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    )
