"""bridge-certs (SPEC §8) and the CA's directory: `init-ca` and what a failed or losing one leaves
(nothing that refuses the next), the CA opened from its files (missing, unreadable or another CA's
key said in one line), index.json (concurrent runs lose no change, a damaged one issues nothing, an
earlier CA's is not adopted, `list` reads it without the CA key) and directory modes that no umask
makes writable by others."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from certs import CertificateAuthority, OutputExists
from certs import crls as crls_module
from certs import pki as pki_module
from certs.cli import main
from tests.harness.bridge_certs import BRIDGE_CERTS, run, tree


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


def test_nothing_is_issued_that_the_index_cannot_record(pki_dir: Path) -> None:
    """A damaged index: the certificate and key were written anyway, then the command failed;
    no record, so neither the device id nor the serial could ever revoke it."""
    (pki_dir / "index.json").write_text('[{"serial":"1"}')
    failed = run("--dir", str(pki_dir), "device", "dev4")
    assert failed.returncode == 2
    assert "index.json is damaged" in failed.stderr
    assert not (pki_dir / "devices").exists()


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
