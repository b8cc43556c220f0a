"""The uplink's TLS material as a reload judges it (`DeviceTls.rotation_refusal`) and as the
listener loads it (`listener_tls`), on CA files and chains OpenSSL itself takes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.config import ListenerTls, UplinkConfig
from edge_agent.local import listener_tls
from edge_agent.tls import DeviceTls, TlsMaterial

_NOW = dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    san: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, signer = (
        (_name(subject), key) if issuer is None else (issuer[0].subject, issuer[1])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - dt.timedelta(hours=1))
        .not_valid_after(_NOW + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _uplink(ca: Path, cert: Path, key: Path) -> UplinkConfig:
    return UplinkConfig.model_validate(
        {
            "host": "localhost",
            "tls": {"ca": str(ca), "cert": str(cert), "key": str(key)},
            "token": {"audience": "a"},
        }
    )


def test_a_rotation_to_a_certificate_of_an_intermediate_ca_with_its_chain_is_taken(
    tmp_path: Path,
) -> None:
    """Found in review: the reload's issuer check asked for a certificate signed by a CA of
    ``tls.ca`` directly. A device certificate of an intermediate CA, the intermediate after it in
    the cert file (as OpenSSL sends it, and as the sink verifies chains), was refused when the
    one in use had been signed by the root itself: a rotation that works was refused."""
    root = _issue("Root CA", None, ca=True)
    intermediate = _issue("Issuing CA", root, ca=True)
    first, first_key = _issue("gw-1", root)
    second, second_key = _issue("gw-1", intermediate)
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "device.pem", tmp_path / "device.key"
    ca.write_bytes(_pem(root[0]))
    cert.write_bytes(_pem(first))
    key.write_bytes(_key_pem(first_key))
    config = _uplink(ca, cert, key)
    tls = DeviceTls(config, TlsMaterial.load(config))
    cert.write_bytes(_pem(second, intermediate[0]))
    key.write_bytes(_key_pem(second_key))
    loaded = TlsMaterial.load(config)
    assert tls.rotation_refusal(loaded, config, "gw-1", time.time()) is None
    # One of another PKI, its chain included, is still refused.
    other_root = _issue("Other Root", None, ca=True)
    other_intermediate = _issue("Other Issuing CA", other_root, ca=True)
    foreign, foreign_key = _issue("gw-1", other_intermediate)
    cert.write_bytes(_pem(foreign, other_intermediate[0]))
    key.write_bytes(_key_pem(foreign_key))
    refusal = tls.rotation_refusal(TlsMaterial.load(config), config, "gw-1", time.time())
    assert refusal is not None
    assert "was not issued by a CA in" in refusal


def test_a_ca_file_in_openssl_trusted_certificate_form_still_loads(tmp_path: Path) -> None:
    """Found in review: the uplink's material and the listener's files are now also read by
    ``cryptography``, which cannot read OpenSSL's ``TRUSTED CERTIFICATE`` PEM (``openssl x509
    -addtrust``; Fedora's and RHEL's ``ca-bundle.trust.crt``). OpenSSL loads such a CA file: an
    agent whose link worked was refused at start for good ("unusable TLS files"), and one with
    it as ``[listener.tls] ca`` did not start (exit 2)."""
    root = _issue("Root CA", None, ca=True)
    device, device_key = _issue("gw-1", root)
    server, server_key = _issue(
        "localhost",
        root,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    plain, trusted = tmp_path / "ca.pem", tmp_path / "ca.trust.pem"
    plain.write_bytes(_pem(root[0]))
    subprocess.run(
        ["openssl", "x509", "-in", str(plain), "-addtrust", "clientAuth", "-out", str(trusted)],
        check=True,
    )
    assert trusted.read_text().startswith("-----BEGIN TRUSTED CERTIFICATE-----")
    files = {}
    for name, value in {
        "device.pem": _pem(device), "device.key": _key_pem(device_key),
        "server.pem": _pem(server), "server.key": _key_pem(server_key),
    }.items():  # fmt: skip
        files[name] = tmp_path / name
        files[name].write_bytes(value)
    config = _uplink(trusted, files["device.pem"], files["device.key"])
    material = TlsMaterial.load(config)
    assert (
        DeviceTls(config, material).rotation_refusal(material, config, "gw-1", time.time()) is None
    )
    listener_tls(ListenerTls(ca=trusted, cert=files["server.pem"], key=files["server.key"]))


def test_doctor_takes_a_ca_file_in_openssl_trusted_certificate_form(tmp_path: Path) -> None:
    """The uplink and the listener take a CA file only OpenSSL reads (``TRUSTED CERTIFICATE``)
    since 1bd927f, but doctor's certificate check still read it with ``cryptography`` alone:
    FAIL "is not a PEM certificate" for a CA file the agent connects with, and doctor skipped its
    end-to-end check for it."""
    from edge_agent.doctor import _certificate

    root = _issue("Root CA", None, ca=True)
    device, device_key = _issue("gw-1", root)
    plain, trusted = tmp_path / "ca.pem", tmp_path / "ca.trust.pem"
    plain.write_bytes(_pem(root[0]))
    subprocess.run(
        ["openssl", "x509", "-in", str(plain), "-addtrust", "clientAuth", "-out", str(trusted)],
        check=True,
    )
    cert, key = tmp_path / "device.pem", tmp_path / "device.key"
    cert.write_bytes(_pem(device))
    key.write_bytes(_key_pem(device_key))
    config = _uplink(trusted, cert, key)
    assert TlsMaterial.load(config).issued_by_ca is None  # the agent takes it
    result = _certificate(config)  # raised _Failed("... is not a PEM certificate")
    detail, warning = result if isinstance(result, tuple) else (result, False)
    assert warning, detail
    assert "not checked" in detail, detail
