"""Test PKI built with our own ``certs`` code (STYLE 22), so every test run exercises the tool.

The session fixture `pki` holds a CA, a server certificate for ``localhost``/``127.0.0.1``, device
certificates of each key type, and one call each for the bad variants the fault tests need:
expired, not yet valid, issued by another CA, revoked. `pki_dir` is a fresh PKI directory made by
the ``bridge-certs`` console script, for the tests of the tool's command line.
"""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from certs import CertificateAuthority, Issued, KeyType
from tests.harness.process import console_script

__all__ = ["DeviceCreds", "Pki", "pki", "pki_dir"]


@dataclass(frozen=True)
class DeviceCreds:
    """A device's certificate and key files."""

    device_id: str
    cert: Path
    key: Path
    serial: int


def _creds(device_id: str, issued: Issued) -> DeviceCreds:
    return DeviceCreds(device_id, issued.cert_path, issued.key_path, issued.serial)


class Pki:
    """A CA in ``directory`` plus a second, unrelated CA for "other CA" cases."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority.create(directory / "main", common_name="Bridge Test CA")
        self.other_ca = CertificateAuthority.create(directory / "other", common_name="Foreign CA")
        server = self.ca.issue_server(["localhost"], ["127.0.0.1", "::1"])
        self.server_cert = server.cert_path
        self.server_key = server.key_path
        self.crl = self.ca.write_crl()

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert_path

    # One call each (STYLE 22). Names must be unique per session: files are never overwritten.

    def device(self, device_id: str, key_type: KeyType = KeyType.EC_P256) -> DeviceCreds:
        return _creds(device_id, self.ca.issue_device(device_id, key_type=key_type))

    def expired_device(self, device_id: str) -> DeviceCreds:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        return _creds(device_id, self.ca.issue_device(device_id, not_before=start, days=1))

    def future_device(self, device_id: str) -> DeviceCreds:
        start = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
        return _creds(device_id, self.ca.issue_device(device_id, not_before=start, days=365))

    def foreign_device(self, device_id: str) -> DeviceCreds:
        return _creds(device_id, self.other_ca.issue_device(device_id))

    def revoked_device(self, device_id: str) -> DeviceCreds:
        """A device certificate listed in ``self.crl`` (the CRL file is rewritten)."""
        creds = self.device(device_id)
        self.ca.revoke(device_id)
        return creds

    def server(
        self,
        name: str,
        dns: Sequence[str],
        ips: Sequence[str] = (),
        *,
        days: float = 30,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """Another server certificate (wrong SAN, expired, ... for the agent-side tests)."""
        return self.ca.issue_server(dns, ips, name=name, days=days, not_before=not_before)

    # TLS contexts as a device and as the sink would build them.

    def client_context(self, creds: DeviceCreds) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        context.load_cert_chain(str(creds.cert), str(creds.key))
        return context

    def server_context(self, *, check_crl: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        if check_crl:
            context.load_verify_locations(cafile=str(self.crl))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    command = [console_script("bridge-certs"), "--dir", str(directory), "init-ca"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return directory
