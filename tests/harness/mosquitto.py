"""A private Mosquitto per test, with a plain and a mutual-TLS listener on free loopback ports.

Mosquitto cannot bind port 0 (``listener 0`` means a Unix socket to it), so the fixture asks the
kernel for free ports, writes them into its own config and retries with new ports if another
process took one in between.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.pki import Pki
from tests.harness.process import ManagedProcess, ProcessError, ProcessFactory

__all__ = ["MosquittoBroker", "MosquittoFactory", "free_port", "mosquitto_factory"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
_START_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (for programs that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class MosquittoBroker:
    """A running Mosquitto: ``port`` is plain MQTT, ``tls_port`` requires a client certificate."""

    process: ManagedProcess
    host: str
    port: int
    tls_port: int | None
    config_path: Path

    def log(self) -> str:
        return self.process.output()


class MosquittoFactory:
    def __init__(self, processes: ProcessFactory, directory: Path, pki: Pki) -> None:
        self._processes = processes
        self._directory = directory
        self._pki = pki
        self._count = 0

    def __call__(self, *, tls: bool = True, crl: Path | None = None) -> MosquittoBroker:
        """Start a broker; with ``tls``, a listener that requires a certificate from our CA.

        ``crl`` adds a CRL check to the TLS listener (pass ``pki.crl`` after revoking).
        """
        self._count += 1
        directory = self._directory / f"mosquitto-{self._count}"
        directory.mkdir(parents=True)
        last_error: ProcessError | None = None
        for _ in range(_START_ATTEMPTS):
            port = free_port()
            tls_port = free_port() if tls else None
            config = directory / "mosquitto.conf"
            config.write_text(self._config(port, tls_port, crl))
            process = self._processes(
                [MOSQUITTO, "-c", str(config)],
                ready=r"mosquitto version \S+ running",
                name=f"mosquitto-{self._count}",
                start=False,
            )
            try:
                process.start()
            except ProcessError as exc:
                # Most likely a port taken between free_port() and bind(): try new ports.
                last_error = exc
                continue
            return MosquittoBroker(process, "127.0.0.1", port, tls_port, config)
        raise ProcessError(f"mosquitto did not start in {_START_ATTEMPTS} attempts: {last_error}")

    def _config(self, port: int, tls_port: int | None, crl: Path | None) -> str:
        lines = [
            # Running as root in CI: stay root, or Mosquitto drops to "mosquitto" and cannot read
            # the 0600 keys our PKI writes.
            "user root",
            "per_listener_settings true",
            "persistence false",
            "log_dest stderr",  # unbuffered: the readiness line arrives at once
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
        ]
        if tls_port is not None:
            lines += [
                f"listener {tls_port} 127.0.0.1",
                "allow_anonymous true",
                f"cafile {self._pki.ca_cert}",
                f"certfile {self._pki.server_cert}",
                f"keyfile {self._pki.server_key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
            if crl is not None:
                lines.append(f"crlfile {crl}")
        return "\n".join(lines) + "\n"


@pytest.fixture
def mosquitto_factory(
    process_factory: ProcessFactory, pki: Pki, tmp_path: Path
) -> MosquittoFactory:
    return MosquittoFactory(process_factory, tmp_path / "brokers", pki)
