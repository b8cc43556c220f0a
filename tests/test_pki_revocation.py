"""bridge-certs (SPEC §8) revoking: `revoke` and `crl` write a CRL that OpenSSL reads and that
refuses the revoked certificate only, numbered above every CRL the CA issued before and keeping its
validity unless told; a revocation whose CRL or index cannot be written errs towards revoked and can
be retried, and "revoked already" is said only when the CRL lists it. Also the certificates and CRL
of a CA made elsewhere (its SKI as their authority key identifier)."""

from __future__ import annotations

import datetime as dt
import errno
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import CertificateAuthority
from certs import crls as crls_module
from certs import pki as pki_module
from certs.cli import main
from mqtt_ingest.crl import crl_number, crl_rollback
from tests.harness.bridge_certs import openssl, run, tree


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
