"""bridge-certs (SPEC §8) issuing a certificate: what it writes is accepted by OpenSSL for every key
type, carries the identity, names and validity asked for (never past the CA's), and keeps its key
private; bad input on the command line is refused cleanly (one line, exit 2, nothing written).
Revocation and CRLs are in test_pki_revocation.py, the CA's directory and index in
test_pki_directory.py."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import CertificateAuthority, KeyType, OutputExists, PkiError, device_uri
from certs.cli import main, parse_when
from tests.harness.bridge_certs import openssl, run, tree


@pytest.mark.parametrize("key_type", list(KeyType))
def test_openssl_verifies_every_key_type(tmp_path: Path, key_type: KeyType) -> None:
    directory = tmp_path / "pki"
    assert run("--dir", str(directory), "init-ca", "--key-type", key_type).returncode == 0
    device = run("--dir", str(directory), "device", "dev-1", "--key-type", key_type)
    assert device.returncode == 0, device.stderr
    server = run(
        "--dir", str(directory), "server", "--dns", "localhost", "--ip", "127.0.0.1",
        "--key-type", key_type,
    )  # fmt: skip
    assert server.returncode == 0, server.stderr

    ca = str(directory / "ca.pem")
    for cert, purpose in [
        (directory / "devices" / "dev-1.pem", "sslclient"),
        (directory / "servers" / "localhost.pem", "sslserver"),
    ]:
        verified = openssl("verify", "-purpose", purpose, "-CAfile", ca, str(cert))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.strip() == f"{cert}: OK"
    text = openssl("x509", "-in", str(directory / "servers" / "localhost.pem"), "-noout", "-text")
    assert "DNS:localhost" in text.stdout
    assert "IP Address:127.0.0.1" in text.stdout


def test_keys_are_private_and_match_their_type(pki_dir: Path) -> None:
    assert run("--dir", str(pki_dir), "device", "rsa-dev", "--key-type", "rsa-2048").returncode == 0
    assert run("--dir", str(pki_dir), "device", "ed-dev", "--key-type", "ed25519").returncode == 0
    for key in [
        pki_dir / "ca.key",
        pki_dir / "devices/rsa-dev.key",
        pki_dir / "devices/ed-dev.key",
    ]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = CertificateAuthority.open(pki_dir)
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.key.curve.name == "secp256r1"
    rsa_cert = x509.load_pem_x509_certificate((pki_dir / "devices/rsa-dev.pem").read_bytes())
    assert isinstance(rsa_cert.public_key(), rsa.RSAPublicKey)
    ed_cert = x509.load_pem_x509_certificate((pki_dir / "devices/ed-dev.pem").read_bytes())
    assert isinstance(ed_cert.public_key(), ed25519.Ed25519PublicKey)


def test_device_certificate_carries_identity(pki_dir: Path) -> None:
    assert run("--dir", str(pki_dir), "device", "pump-7").returncode == 0
    cert = x509.load_pem_x509_certificate((pki_dir / "devices/pump-7.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "pump-7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device_uri("pump-7")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_non_ascii_device_id_is_issued_with_an_encoded_san_uri(pki_dir: Path) -> None:
    """A SAN URI must be ASCII: 'gerät-1' used to end in a traceback."""
    result = run("--dir", str(pki_dir), "device", "gerät-1")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((pki_dir / "devices/gerät-1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:device:ger%C3%A4t-1"]
    assert device_uri("gerät-1") == "urn:device:ger%C3%A4t-1"


def test_validity_options_make_expired_and_future_certificates(pki_dir: Path) -> None:
    assert (
        run("--dir", str(pki_dir), "device", "old", "--not-before=-10d", "--days", "1").returncode
        == 0
    )
    assert run("--dir", str(pki_dir), "device", "new", "--not-before", "+10d").returncode == 0
    assert (
        run(
            "--dir", str(pki_dir), "device", "iso", "--not-before", "2020-01-01", "--days", "2"
        ).returncode
        == 0
    )
    ca = str(pki_dir / "ca.pem")
    expired = openssl("verify", "-CAfile", ca, str(pki_dir / "devices/old.pem"))
    assert "certificate has expired" in expired.stdout + expired.stderr
    future = openssl("verify", "-CAfile", ca, str(pki_dir / "devices/new.pem"))
    assert "certificate is not yet valid" in future.stdout + future.stderr
    iso = x509.load_pem_x509_certificate((pki_dir / "devices/iso.pem").read_bytes())
    assert iso.not_valid_before_utc == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    assert iso.not_valid_after_utc == dt.datetime(2020, 1, 3, tzinfo=dt.UTC)
    statuses = {
        line.split()[-1]: line.split()[2]
        for line in run("--dir", str(pki_dir), "list").stdout.splitlines()
    }
    assert statuses["old"] == "expired"
    assert statuses["new"] == "not-yet-valid"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["device", "x", "--colour", "red"], "unrecognized arguments: --colour red"),
        (["device", "a/b"], "'/' is the MQTT topic level separator"),
        (["device", "a+b"], "'+' is an MQTT wildcard"),
        (["device", "a#"], "'#' is an MQTT wildcard"),
        (["device", ""], "invalid device id '': it is empty"),
        (["device", "dev-1"], "exists already; refusing to overwrite"),
        (["device", "x", "--days", "0"], "the number of days must be positive"),
        (["device", "x", "--days", "inf"], "the number of days must be positive"),
        (["device", "x", "--not-before=+99999999d"], "'+99999999d' is out of range"),
        (["device", "x", "--days", "1e10"], "days from"),
        (["device", "x", "--not-before", "yesterday"], "'yesterday' is not 'now'"),
        (["server"], "needs at least one --dns name or --ip address"),
        (["server", "--ip", "300.1.1.1"], "'300.1.1.1' is not an IP address"),
        (["server", "--dns", "sink.example.."], "'sink.example..' is not a DNS name"),
        (["server", "--dns", "."], "'.' is not a DNS name"),
        (["revoke", "nobody"], "no certificate issued by this CA matches 'nobody'"),
        (["init-ca"], "ca.pem exists already; refusing to overwrite"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    pki_dir: Path, args: list[str], message: str
) -> None:
    assert run("--dir", str(pki_dir), "device", "dev-1").returncode == 0
    before = tree(pki_dir)
    result = run("--dir", str(pki_dir), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bridge-certs: error: ")
    assert message in lines[0]
    assert tree(pki_dir) == before


def test_a_certificate_does_not_outlive_its_ca(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert run("--dir", str(directory), "init-ca", "--days", "10").returncode == 0
    assert run("--dir", str(directory), "device", "long", "--days", "365").returncode == 0
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((directory / "devices/long.pem").read_bytes())
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
    late = run("--dir", str(directory), "device", "late", "--not-before", "+20d")
    assert late.returncode == 2
    assert "the CA expires at" in late.stderr


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "x\x00y", "a.b", "a b", "é" * 100])
def test_library_refuses_bad_device_ids_including_nul(tmp_path: Path, bad_id: str) -> None:
    # NUL cannot travel through argv (execve strings end at NUL), so the library is the place
    # to show it is refused.
    ca = CertificateAuthority.create(tmp_path / "pki")
    with pytest.raises(PkiError, match="invalid device id"):
        ca.issue_device(bad_id)
    assert not (tmp_path / "pki" / "devices").exists()


def test_library_never_overwrites_even_a_lone_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki")
    key_path = tmp_path / "pki" / "devices" / "dev-1.key"
    key_path.parent.mkdir()
    key_path.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        ca.issue_device("dev-1")
    assert key_path.read_bytes() == b"precious"
    assert not (tmp_path / "pki" / "devices" / "dev-1.pem").exists()


def test_in_process_main_matches_console_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dir", str(tmp_path / "p"), "init-ca", "--key-type", "ed25519"]) == 0
    assert main(["--dir", str(tmp_path / "p"), "device", "d1"]) == 0
    assert main(["--dir", str(tmp_path / "p"), "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"name": "d1"' in out
    assert '"status": "valid"' in out


def test_parse_when() -> None:
    now = dt.datetime.now(dt.UTC)
    assert abs((parse_when("-2d") - (now - dt.timedelta(days=2))).total_seconds()) < 5
    assert abs((parse_when("+1.5h") - (now + dt.timedelta(hours=1.5))).total_seconds()) < 5
    assert parse_when("2030-05-01T12:00:00+02:00") == dt.datetime(2030, 5, 1, 10, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("device", "d" * 65), "does not fit a certificate's common name"),
        (("server", "--dns", "a" * 63 + ".b.example.com"), "pass --name"),
        (("server", "--dns", "a" * 64 + ".example.com"), "is not a DNS name"),
        (("device", "short", "--days", "0.002"), "has ended already"),
        (("device", "short", "--days", "0.000001"), "has ended already"),
    ],
)
def test_names_and_validities_no_certificate_can_carry_are_one_line_errors(
    pki_dir: Path, args: tuple[str, ...], why: str
) -> None:
    """These crashed with a traceback (exit 1), or issued a certificate already expired."""
    before = tree(pki_dir)
    failed = run("--dir", str(pki_dir), *args)
    assert (failed.returncode, failed.stderr.count("\n")) == (2, 1), failed.stderr
    assert why in failed.stderr
    assert tree(pki_dir) == before


def test_a_non_ascii_dns_name_is_issued_as_its_a_labels(pki_dir: Path) -> None:
    """IDNA 2008: Python's own codec (IDNA 2003) made 'straße.de' 'strasse.de', another host."""
    done = run(
        "--dir", str(pki_dir), "server", "--dns", "gerät.example", "--dns", "straße.de",
        "--name", "geraet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((pki_dir / "servers/geraet.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--gert-noa.example", "xn--strae-oqa.de"]


def test_a_dns_name_with_a_trailing_dot_is_issued_without_it(
    pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: 'sink.example.com.' went into the SAN as it was, and clients connecting
    to sink.example.com failed hostname verification."""
    assert main(["--dir", str(pki_dir), "server", "--dns", "sink.example.com."]) == 0
    assert "servers/sink.example.com.pem" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((pki_dir / "servers/sink.example.com.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sink.example.com"]
    checked = openssl(
        "verify", "-CAfile", str(pki_dir / "ca.pem"), "-verify_hostname", "sink.example.com",
        str(pki_dir / "servers/sink.example.com.pem"),
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_an_ip_address_given_as_dns_name_is_refused(
    pki_dir: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    """Found by review: '--dns 127.0.0.1' wrote a DNS SAN, which no connection to 127.0.0.1
    matches."""
    before = tree(pki_dir)
    assert main(["--dir", str(pki_dir), "server", "--dns", address]) == 2
    assert capsys.readouterr().err == (
        f"bridge-certs: error: {address!r} is an IP address, not a DNS name: pass it with --ip\n"
    )
    assert tree(pki_dir) == before
