"""bridge-certs (SPEC §8): what it writes is accepted by OpenSSL, bad input is refused cleanly."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import CertificateAuthority, KeyType, OutputExists, PkiError, device_uri
from certs import crls as crls_module
from certs import pki as pki_module
from certs.cli import main, parse_when
from mqtt_ingest.crl import crl_number, crl_rollback
from tests.harness.process import console_script

BRIDGE_CERTS = console_script("bridge-certs")


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BRIDGE_CERTS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


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


def test_revoked_serial_is_in_crl_as_openssl_reads_it(pki_dir: Path) -> None:
    assert run("--dir", str(pki_dir), "device", "dev-bad").returncode == 0
    assert run("--dir", str(pki_dir), "device", "dev-good").returncode == 0
    revoked = run("--dir", str(pki_dir), "revoke", "dev-bad")
    assert revoked.returncode == 0, revoked.stderr
    bad = x509.load_pem_x509_certificate((pki_dir / "devices/dev-bad.pem").read_bytes())

    crl_text = openssl("crl", "-in", str(pki_dir / "crl.pem"), "-noout", "-text")
    assert crl_text.returncode == 0, crl_text.stderr
    assert f"Serial Number: {bad.serial_number:040X}" in crl_text.stdout
    assert crl_text.stdout.count("Serial Number:") == 1
    signed = openssl(
        "crl", "-in", str(pki_dir / "crl.pem"), "-noout", "-CAfile", str(pki_dir / "ca.pem")
    )
    assert "verify OK" in signed.stdout + signed.stderr

    ca, crl = str(pki_dir / "ca.pem"), str(pki_dir / "crl.pem")
    refused = openssl(
        "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, str(pki_dir / "devices/dev-bad.pem")
    )
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr
    accepted = openssl(
        "verify",
        "-crl_check",
        "-CAfile",
        ca,
        "-CRLfile",
        crl,
        str(pki_dir / "devices/dev-good.pem"),
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def test_revoke_by_serial_and_list(pki_dir: Path) -> None:
    assert run("--dir", str(pki_dir), "device", "dev-a").returncode == 0
    cert = x509.load_pem_x509_certificate((pki_dir / "devices/dev-a.pem").read_bytes())
    assert run("--dir", str(pki_dir), "revoke", f"0x{cert.serial_number:x}").returncode == 0
    listing = run("--dir", str(pki_dir), "list")
    table = {line.split()[-1]: line.split() for line in listing.stdout.splitlines()}
    assert table["dev-a"][2] == "revoked"
    rows = {
        row["name"]: row
        for row in map(json.loads, run("--dir", str(pki_dir), "list", "--json").stdout.splitlines())
    }
    assert rows["Edge Bridge CA"]["kind"] == "ca"
    assert rows["dev-a"]["serial"] == f"0x{cert.serial_number:x}"
    assert rows["dev-a"]["revoked_at"] is not None
    again = run("--dir", str(pki_dir), "revoke", "dev-a")
    assert again.returncode == 2
    assert "revoked already" in again.stderr


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


def test_concurrent_runs_neither_lose_an_issued_certificate_nor_undo_a_revocation(
    pki_dir: Path,
) -> None:
    """A provisioning line issuing while an operator revokes: every change reaches the index
    (it used to be read, changed and written back by each process unlocked)."""
    assert run("--dir", str(pki_dir), "device", "victim").returncode == 0
    argvs = [[BRIDGE_CERTS, "--dir", str(pki_dir), "device", f"dev-{i}"] for i in range(10)]
    argvs.insert(5, [BRIDGE_CERTS, "--dir", str(pki_dir), "revoke", "victim"])
    runs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argvs]
    errors = [r.communicate(timeout=60)[1] for r in runs]
    assert [r.returncode for r in runs] == [0] * len(runs), errors
    records = {r.name: r for r in CertificateAuthority.open(pki_dir).records()}
    assert {f"dev-{i}" for i in range(10)} <= records.keys()
    assert records["victim"].revoked_at is not None
    assert run("--dir", str(pki_dir), "crl").returncode == 0
    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    assert [r.serial_number for r in crl] == [records["victim"].serial]


def test_crl_replaces_only_a_crl_of_its_own_ca_and_numbers_increase(
    tmp_path: Path, pki_dir: Path
) -> None:
    key = (pki_dir / "ca.key").read_bytes()
    refused = run("--dir", str(pki_dir), "crl", "--out", str(pki_dir / "ca.key"))
    assert refused.returncode == 2
    assert "exists already; refusing to overwrite" in refused.stderr
    assert (pki_dir / "ca.key").read_bytes() == key
    other = tmp_path / "other"
    assert run("--dir", str(other), "init-ca").returncode == 0
    assert run("--dir", str(other), "crl").returncode == 0
    foreign = run("--dir", str(pki_dir), "crl", "--out", str(other / "crl.pem"))
    assert foreign.returncode == 2
    numbers = []
    for _ in range(3):  # within one second: the number still goes up
        assert run("--dir", str(pki_dir), "crl", "--out", str(tmp_path / "crl.pem")).returncode == 0
        crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    assert numbers == sorted(set(numbers))


def test_revoke_and_crl_keep_the_crl_validity_unless_told(pki_dir: Path) -> None:
    def period() -> dt.timedelta:
        crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
        assert crl.next_update_utc is not None
        # The last update is backdated 5 minutes (for verifiers whose clock is a little behind).
        return crl.next_update_utc - crl.last_update_utc - dt.timedelta(minutes=5)

    for name in ("a", "b", "c"):
        assert run("--dir", str(pki_dir), "device", name).returncode == 0
    assert run("--dir", str(pki_dir), "revoke", "a").returncode == 0
    assert period() == dt.timedelta(days=7)  # the default, with no CRL before
    assert run("--dir", str(pki_dir), "crl", "--days", "30").returncode == 0
    assert run("--dir", str(pki_dir), "revoke", "b").returncode == 0
    assert period() == dt.timedelta(days=30)
    # A scheduled rewrite does not shorten it either (it fell back to 7 days).
    assert run("--dir", str(pki_dir), "crl").returncode == 0
    assert period() == dt.timedelta(days=30)
    assert run("--dir", str(pki_dir), "revoke", "c", "--days", "2").returncode == 0
    assert period() == dt.timedelta(days=2)


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


def test_missing_ca_is_reported(tmp_path: Path) -> None:
    result = run("--dir", str(tmp_path / "empty"), "device", "dev-1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"bridge-certs: error: no CA in {tmp_path / 'empty'} (ca.pem and ca.key); "
        "run 'bridge-certs init-ca'"
    )
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"not a key at all\n", "not a PEM private key"),
        (b"", "not a PEM private key"),
    ],
)
def test_unreadable_ca_key_is_reported(pki_dir: Path, content: bytes, why: str) -> None:
    (pki_dir / "ca.key").write_bytes(content)
    before = tree(pki_dir)
    result = run("--dir", str(pki_dir), "device", "dev-9")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"bridge-certs: error: cannot read private key {pki_dir / 'ca.key'}: {why}"
    )
    assert tree(pki_dir) == before


def test_ca_key_of_another_ca_is_refused(tmp_path: Path, pki_dir: Path) -> None:
    other = CertificateAuthority.create(tmp_path / "other")
    (pki_dir / "ca.key").write_bytes(other.key_path.read_bytes())
    result = run("--dir", str(pki_dir), "device", "dev-9")
    assert result.returncode == 2
    assert "does not match the certificate" in result.stderr


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


def test_a_revocation_whose_crl_cannot_be_made_is_not_recorded(pki_dir: Path) -> None:
    """Found by review: the index said "revoked" before the CRL was made; with a --days that
    cannot be used the CRL never listed the certificate, and revoking again said "revoked
    already". Nothing is written now."""
    assert run("--dir", str(pki_dir), "device", "dev2").returncode == 0
    before = tree(pki_dir)
    failed = run("--dir", str(pki_dir), "revoke", "dev2", "--days", "3000000")
    assert (failed.returncode, failed.stderr.count("\n")) == (2, 1), failed.stderr
    assert "out of range" in failed.stderr
    assert tree(pki_dir) == before
    assert run("--dir", str(pki_dir), "revoke", "dev2").returncode == 0
    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    records = {r.name: r for r in CertificateAuthority.open(pki_dir).records()}
    assert [r.serial_number for r in crl] == [records["dev2"].serial]


def test_nothing_is_issued_that_the_index_cannot_record(pki_dir: Path) -> None:
    """A damaged index: the certificate and key were written anyway, then the command failed;
    no record, so neither the device id nor the serial could ever revoke it."""
    (pki_dir / "index.json").write_text('[{"serial":"1"}')
    failed = run("--dir", str(pki_dir), "device", "dev4")
    assert failed.returncode == 2
    assert "index.json is damaged" in failed.stderr
    assert not (pki_dir / "devices").exists()


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


def test_init_ca_does_not_adopt_an_earlier_ca_s_index(pki_dir: Path) -> None:
    """After ca.pem and ca.key were deleted, a new CA listed the old one's certificates as its
    own (and revoking them put foreign serials on its CRL)."""
    assert run("--dir", str(pki_dir), "device", "old-device").returncode == 0
    (pki_dir / "ca.pem").unlink()
    (pki_dir / "ca.key").unlink()
    again = run("--dir", str(pki_dir), "init-ca")
    assert again.returncode == 2
    assert "index.json exists already" in again.stderr
    assert not (pki_dir / "ca.key").exists()


def test_an_init_ca_that_loses_a_race_removes_only_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the loser of two init-ca at once deleted the winner's ca.key and the
    whole index.json on its way out."""
    directory = tmp_path / "pki"
    write_new = pki_module.write_new

    def racing(path: Path, data: bytes, mode: int) -> None:
        if path.name == "ca.key" and not path.exists():
            write_new(path, b"the winner's key", 0o600)  # another init-ca got there first
        write_new(path, data, mode)

    monkeypatch.setattr(pki_module, "write_new", racing)
    with pytest.raises(OutputExists):
        CertificateAuthority.create(directory)
    assert (directory / "ca.key").read_bytes() == b"the winner's key"
    assert not (directory / "index.json").exists()  # its own record only: none written


@pytest.mark.parametrize("failing", ["ca.key", "ca.pem", "index.json"])
def test_a_failed_init_ca_leaves_nothing_that_refuses_the_next(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing: str,
) -> None:
    """Found by review: the CA was recorded in index.json before its files were written, and a
    failure rewrote the index as ``[]`` instead of removing it: every later init-ca refused the
    directory ("index.json exists already")."""
    directory = tmp_path / "pki"
    write_new, replace = pki_module.write_new, pki_module.replace_file

    def full(path: Path) -> None:
        if path.name == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def failing_write_new(path: Path, data: bytes, mode: int) -> None:
        full(path)
        write_new(path, data, mode)

    def failing_replace(path: Path, data: bytes, mode: int = 0o644) -> None:
        full(path)
        replace(path, data, mode)

    monkeypatch.setattr(pki_module, "write_new", failing_write_new)
    for module in (pki_module, crls_module):  # the CA's files, and its index and CRLs
        monkeypatch.setattr(module, "replace_file", failing_replace)
    assert main(["--dir", str(directory), "init-ca"]) == 2
    err = capsys.readouterr().err
    assert err == f"bridge-certs: error: {directory / failing}: No space left on device\n"
    assert sorted(p.name for p in directory.iterdir()) == [".lock"]
    monkeypatch.undo()
    assert main(["--dir", str(directory), "init-ca"]) == 0
    records = CertificateAuthority.open(directory).records()
    assert [(r.kind, r.name) for r in records] == [("ca", "Edge Bridge CA")]


def _fail_replacing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `_replace` of a file called ``name`` fail as a full disk does (no file name)."""
    replace = pki_module.replace_file

    def failing(path: Path, data: bytes, mode: int = 0o644) -> None:
        if path.name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(path, data, mode)

    for module in (pki_module, crls_module):  # the CA's files, and its index and CRLs
        monkeypatch.setattr(module, "replace_file", failing)


def _crl_serials(pki_dir: Path) -> list[int]:
    return [r.serial_number for r in x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())]


def _refused_by_crl(pki_dir: Path, cert: Path) -> bool:
    ca, crl = str(pki_dir / "ca.pem"), str(pki_dir / "crl.pem")
    verified = openssl("verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, str(cert))
    return verified.returncode != 0 and "certificate revoked" in verified.stdout + verified.stderr


def test_a_revoke_whose_crl_cannot_be_written_can_be_retried(
    pki_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: the index was saved before the CRL was written; with the disk full at
    the CRL the index said revoked, the CRL did not list it (the device still accepted), and
    revoking again said "revoked already"."""
    assert main(["--dir", str(pki_dir), "device", "dev-1"]) == 0
    assert main(["--dir", str(pki_dir), "crl"]) == 0
    _fail_replacing(monkeypatch, "crl.pem")
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 2
    monkeypatch.undo()
    assert _crl_serials(pki_dir) == []
    capsys.readouterr()
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 0, capsys.readouterr().err
    (record,) = [r for r in CertificateAuthority.open(pki_dir).records() if r.name == "dev-1"]
    assert record.revoked_at is not None
    assert _crl_serials(pki_dir) == [record.serial]
    assert _refused_by_crl(pki_dir, pki_dir / "devices/dev-1.pem")


def test_a_revoke_whose_index_cannot_be_saved_is_on_the_crl_and_stays_there(
    pki_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CRL is written first: a failure after it errs towards revoked, a scheduled `crl`
    does not take the revocation back, and revoking again records it in the index."""
    assert main(["--dir", str(pki_dir), "device", "dev-1"]) == 0
    serial = x509.load_pem_x509_certificate(
        (pki_dir / "devices/dev-1.pem").read_bytes()
    ).serial_number
    _fail_replacing(monkeypatch, "index.json")
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 2
    monkeypatch.undo()
    assert _crl_serials(pki_dir) == [serial]
    assert main(["--dir", str(pki_dir), "crl"]) == 0  # the index does not say revoked
    assert _crl_serials(pki_dir) == [serial]
    assert _refused_by_crl(pki_dir, pki_dir / "devices/dev-1.pem")
    capsys.readouterr()
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 0, capsys.readouterr().err
    records = {r.name: r for r in CertificateAuthority.open(pki_dir).records()}
    assert records["dev-1"].revoked_at is not None
    assert _crl_serials(pki_dir) == [serial]  # listed once


def test_revoking_again_remakes_a_crl_that_lost_the_revocation(
    pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The index says revoked, crl.pem does not list it (lost, or left by the version that
    saved the index first): "revoked already" would leave the device accepted."""
    assert main(["--dir", str(pki_dir), "device", "dev-1"]) == 0
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 0
    (pki_dir / "crl.pem").unlink()
    capsys.readouterr()
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 0, capsys.readouterr().err
    assert _refused_by_crl(pki_dir, pki_dir / "devices/dev-1.pem")
    assert main(["--dir", str(pki_dir), "revoke", "dev-1"]) == 2
    assert capsys.readouterr().err == "bridge-certs: error: 'dev-1' is revoked already\n"


def test_revoked_already_looks_only_at_what_the_target_names(
    pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: "revoked already" was judged over every record whose name or serial
    matched, of any kind: a server sharing a revoked device's name hid it, and a revoked server
    named like a missing device made that device "revoked already"."""
    d = str(pki_dir)
    assert main(["--dir", d, "device", "dev-1"]) == 0
    assert main(["--dir", d, "server", "--dns", "x.example", "--name", "dev-1"]) == 0
    assert main(["--dir", d, "server", "--dns", "cafe"]) == 0
    assert main(["--dir", d, "revoke", "dev-1"]) == 0
    cafe = x509.load_pem_x509_certificate((pki_dir / "servers/cafe.pem").read_bytes())
    assert main(["--dir", d, "revoke", f"0x{cafe.serial_number:x}"]) == 0
    capsys.readouterr()
    assert main(["--dir", d, "revoke", "dev-1"]) == 2
    assert capsys.readouterr().err == "bridge-certs: error: 'dev-1' is revoked already\n"
    assert main(["--dir", d, "revoke", "cafe"]) == 2  # no device cafe, no serial 0xcafe
    assert capsys.readouterr().err == (
        "bridge-certs: error: no certificate issued by this CA matches 'cafe'\n"
    )


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


@pytest.mark.parametrize("ski", [b"\x5a" * 8, None], ids=["8-byte-ski", "no-ski"])
def test_what_a_ca_made_elsewhere_signs_is_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ski: bytes | None
) -> None:
    """Found by review: the authority key identifier was computed from the CA's key instead of
    copied from its certificate's SKI; with a CA made elsewhere (another SKI method, here an
    8-byte one) every certificate and CRL it signed failed verification."""
    directory = tmp_path / "pki"
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Elsewhere CA")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ski is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    ca_cert = builder.sign(key, hashes.SHA256())
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    d = str(directory)
    assert main(["--dir", d, "device", "dev-1"]) == 0
    assert main(["--dir", d, "device", "dev-2"]) == 0
    assert main(["--dir", d, "server", "--dns", "localhost"]) == 0
    assert main(["--dir", d, "revoke", "dev-2"]) == 0, capsys.readouterr().err
    ca, crl = str(directory / "ca.pem"), str(directory / "crl.pem")
    for cert in ["devices/dev-1.pem", "servers/localhost.pem"]:
        verified = openssl(
            "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, str(directory / cert)
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert _refused_by_crl(directory, directory / "devices/dev-2.pem")


def test_a_file_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    """Found by review: a failed write names no file, and the error read
    'bridge-certs: error: : No space left on device'. A real one: a file size limit."""
    directory = tmp_path / "pki"
    repo = Path(__file__).resolve().parents[1]
    limited = subprocess.run(
        [
            "sh", "-c", 'ulimit -f 1 && exec "$@"', "sh",
            BRIDGE_CERTS, "--dir", str(directory), "init-ca", "--key-type", "rsa-3072",
        ],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(repo)},  # this checkout's code, as pytest imports
    )  # fmt: skip
    assert limited.returncode == 2
    assert limited.stderr == f"bridge-certs: error: {directory / 'ca.key'}: File too large\n"
    assert not (directory / "index.json").exists()
    assert run("--dir", str(directory), "init-ca").returncode == 0


def test_an_os_error_naming_no_file_prints_no_empty_name(
    pki_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever raises an OSError without a file name, the line has no empty ': ' in it."""
    _fail_replacing(monkeypatch, "crl.pem")
    assert main(["--dir", str(pki_dir), "crl"]) == 2
    assert capsys.readouterr().err == "bridge-certs: error: No space left on device\n"


def test_every_crl_of_the_ca_has_a_number_above_all_it_issued_before(tmp_path: Path) -> None:
    """CRL numbers run ahead of the clock when CRLs are written faster than one a second; a
    `revoke` looked only at crl.pem, so after a few `crl --out DEPLOYED` its CRL was numbered
    below the deployed one, and a sink refused it as a rollback: the revocation never applied."""
    ca = CertificateAuthority.create(tmp_path / "pki")
    ca.issue_device("victim")
    deployed = tmp_path / "deployed-crl.pem"
    for _ in range(3):
        ca.write_crl(deployed)  # bridge-certs crl --out DEPLOYED, within one second
    ca.revoke("victim")
    in_use = x509.load_pem_x509_crl(deployed.read_bytes())
    new = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl_rollback(new, in_use, ca.cert_path) is None
    assert crl_number(new) > crl_number(in_use)  # type: ignore[operator]


def test_list_reads_the_index_without_the_ca_key(pki_dir: Path) -> None:
    """`list` reads index.json only: it needs no CA private key (kept offline, or readable by
    the CA's owner only), and said "no CA ... run 'bridge-certs init-ca'" without one."""
    assert run("--dir", str(pki_dir), "device", "dev-1").returncode == 0
    (pki_dir / "ca.key").rename(pki_dir.parent / "offline.key")
    listing = run("--dir", str(pki_dir), "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [(r["kind"], r["name"]) for r in rows] == [("ca", "Edge Bridge CA"), ("device", "dev-1")]
    missing = run("--dir", str(pki_dir.parent / "nothing"), "list")
    assert missing.returncode == 2
    assert "no CA in" in missing.stderr


@pytest.mark.parametrize(("umask", "expected"), [("000", 0o755), ("077", 0o700)])
def test_directories_are_not_writable_by_others_and_keep_a_strict_umask(
    tmp_path: Path, umask: str, expected: int
) -> None:
    """Found by review: with ``umask 000`` the PKI directory and devices/ were world-writable,
    and anyone could rename a CA certificate and key of their own over the PKI's (open() only
    checks that the two match): later certificates would be signed by their key. The first fix
    set them all to 0755, loosening ``umask 077`` (0700: the device list and certificates
    private): only the group/other write bits are taken off."""
    done = subprocess.run(
        ["sh", "-c", f'umask {umask} && "$0" --dir "$1" init-ca && "$0" --dir "$1" device dev-1',
         BRIDGE_CERTS, str(tmp_path / "a" / "pki")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for directory in (tmp_path / "a", tmp_path / "a" / "pki", tmp_path / "a" / "pki" / "devices"):
        assert stat.S_IMODE(directory.stat().st_mode) == expected, directory
