"""A CRL judged before the sink's TLS context takes it (`check_crl`, `load_crl`,
`crl_rollback`): one with which OpenSSL would refuse every device (expired or not valid yet,
another CA's, of a narrower scope, a delta, signed by a CA key without cRLSign) is refused with
its reason, an entry only cryptography cannot read is left to OpenSSL; what OpenSSL loads is the
file that was checked, and the CRL of a CA rotated under the same name is no rollback."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ObjectIdentifier, UnrecognizedExtension
from cryptography.x509.oid import CRLEntryExtensionOID, NameOID

from cloud_sink.tls import TlsError, build_context, check_crl
from mqtt_ingest import crl as crl_module
from mqtt_ingest.crl import crl_rollback, load_crl
from tests.harness.pki import Pki
from tests.harness.sink_tls import crl_config, loaded, own_crl


def test_check_crl_reports_the_reason(tmp_path: Path, pki: Pki) -> None:
    crl = own_crl(tmp_path, pki)
    loaded_crl = check_crl(crl, pki.ca_cert)
    assert loaded_crl.next_update_utc is not None
    # OpenSSL refuses every client certificate against a CRL outside its validity: so do we.
    later = loaded_crl.next_update_utc + dt.timedelta(seconds=1)
    with pytest.raises(TlsError, match=r"expired at .* every device would be refused"):
        check_crl(crl, pki.ca_cert, now=later)
    earlier = loaded_crl.last_update_utc - dt.timedelta(seconds=1)
    with pytest.raises(TlsError, match="not valid before"):
        check_crl(crl, pki.ca_cert, now=earlier)
    os.replace(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
    with pytest.raises(TlsError, match="not signed by the CA"):
        check_crl(crl, pki.ca_cert)
    shutil.copyfile(pki.ca_cert, crl)
    with pytest.raises(TlsError, match="X509 CRL"):
        check_crl(crl, pki.ca_cert)
    with pytest.raises(TlsError, match="cannot read"):
        check_crl(tmp_path / "missing.pem", pki.ca_cert)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """An in-memory TLS handshake: None if it completed, else the error."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [
        client.wrap_bio(client_in, client_out, server_hostname="localhost"),
        server.wrap_bio(server_in, server_out, server_side=True),
    ]
    done: set[int] = set()
    for _ in range(20):
        for index, end in enumerate(ends):
            try:
                if index not in done:
                    end.do_handshake()
                    done.add(index)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return str(exc)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    if len(done) < 2:
        return "no progress"
    try:  # TLS 1.3: the client learns of a refusal at its first read
        ends[0].read(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return str(exc)
    return None


def crl_with(pki: Pki, extension: x509.ExtensionType, critical: bool) -> bytes:
    now = dt.datetime.now(dt.UTC)
    key = pki.ca.key
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.certificate.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=1))
        .add_extension(extension, critical=critical)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


UNKNOWN = UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")


@pytest.mark.parametrize(
    ("extension", "critical", "problem", "openssl_refuses"),
    [
        (UNKNOWN, True, "critical extension OpenSSL cannot handle", True),
        (x509.IssuingDistributionPoint(None, None, False, True, None, False, False), True,
         "limits its scope", True),
        (x509.IssuingDistributionPoint(None, None, False, False, None, False, True), True,
         "limits its scope", True),
        # OpenSSL takes it for a full CRL: it would miss every revocation of the base CRL.
        (x509.DeltaCRLIndicator(1), True, "delta CRL", False),
        (UNKNOWN, False, "", False),
        (x509.IssuingDistributionPoint(None, None, True, False, None, False, False), True, "",
         False),
    ],
    ids=["critical-unknown", "only-ca", "only-attributes", "delta", "non-critical", "only-user"],
)  # fmt: skip
def test_a_crl_openssl_would_refuse_every_device_with_is_refused_first(
    tmp_path: Path,
    pki: Pki,
    extension: x509.ExtensionType,
    critical: bool,
    problem: str,
    openssl_refuses: bool,
) -> None:
    """check_crl let these through, and OpenSSL then refused every device ("unhandled critical
    CRL extension", "different CRL scope"). The handshake shows what OpenSSL does with each."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_with(pki, extension, critical))
    server = pki.server_context()
    server.load_verify_locations(cafile=str(crl))  # as OpenSSL alone would take it
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    device = pki.client_context(pki.device(f"scope-{uuid.uuid4().hex[:6]}"))
    assert (handshake(server, device) is not None) == openssl_refuses
    if problem:
        with pytest.raises(TlsError, match=problem):
            check_crl(crl, pki.ca_cert)
    else:
        check_crl(crl, pki.ca_cert)


def test_the_crl_loaded_is_the_crl_checked(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was read twice, to check it and by OpenSSL: one replaced in between (here by
    another CA's CRL, with which OpenSSL refuses every device) was used unchecked."""
    crl = own_crl(tmp_path, pki)
    checked = crl_module._checked

    def replaced_meanwhile(*args: Any) -> x509.CertificateRevocationList:
        result = checked(*args)
        os.replace(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
        return result

    monkeypatch.setattr(crl_module, "_checked", replaced_meanwhile)
    context = build_context(loaded(crl_config(tmp_path, pki, crl, "5s")).listener)
    device = pki.client_context(pki.device(f"toctou-{uuid.uuid4().hex[:6]}"))
    assert handshake(context, device) is None


def ca_and_crl(
    directory: Path, key: ec.EllipticCurvePrivateKey, number: int, *entries: x509.RevokedCertificate
) -> tuple[Path, x509.CertificateRevocationList]:
    """A CA named "Corp CA" with ``key``, written to ``directory``, and a CRL of it."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(name)
        .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
    )  # fmt: skip
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    crl = builder.sign(key, hashes.SHA256())
    (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem", crl


def test_a_crl_of_a_rotated_ca_is_no_rollback_but_an_older_one_of_its_key_is(
    tmp_path: Path,
) -> None:
    """Found by review: a CA rotated under the same name (new key, CRL numbers from 1 again, as
    `openssl ca` with a fresh crlnumber file does) had its CRLs refused as older than the old
    key's, and with them the whole reload that installed the new CA."""
    old_key, new_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    _, in_use = ca_and_crl(tmp_path / "old", old_key, 57)
    new_ca, rotated = ca_and_crl(tmp_path / "new", new_key, 1)
    assert crl_rollback(rotated, in_use, new_ca) is None
    old_ca, older = ca_and_crl(tmp_path / "older", old_key, 56)
    assert crl_rollback(older, in_use, old_ca) == (
        "its CRL number 56 is below 57, the CRL in use's"
    )


def test_a_crl_entry_cryptography_cannot_read_is_left_to_openssl(tmp_path: Path) -> None:
    """Reason code 7 is unused, and cryptography refuses to read it; OpenSSL does not mind."""
    now = dt.datetime.now(dt.UTC)
    entry = (
        x509.RevokedCertificateBuilder().serial_number(7).revocation_date(now)
        .add_extension(UnrecognizedExtension(CRLEntryExtensionOID.CRL_REASON, b"\x0a\x01\x07"),
                       critical=False)
        .build()
    )  # fmt: skip
    ca, _ = ca_and_crl(tmp_path, ec.generate_private_key(ec.SECP256R1()), 1, entry)
    check_crl(tmp_path / "crl.pem", ca)


def test_a_crl_needs_a_temporary_directory_and_says_so(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL loads the checked bytes from a private copy: without a usable temporary
    directory the error escaped as an OSError (out of the sink's TLS reload task)."""
    crl = own_crl(tmp_path, pki)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    context = pki.server_context()
    with pytest.raises(TlsError, match=r"cannot make the private copy .* \(\$TMPDIR\)"):
        load_crl(context, crl, pki.ca_cert, refused="x")


def test_a_crl_of_a_ca_whose_key_may_not_sign_crls_is_refused(tmp_path: Path) -> None:
    """OpenSSL: "key usage does not include CRL signing" for every device (an external CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enterprise CA")])
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    crl = (
        x509.CertificateRevocationListBuilder().issuer_name(name)
        .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TlsError, match="lacks cRLSign"):
        check_crl(tmp_path / "crl.pem", tmp_path / "ca.pem")
