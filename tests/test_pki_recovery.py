"""bridge-certs where things go wrong around it: an offline CA on read-only media, a run killed
between its writes, a command run from another directory. Real files, real subprocesses, a real
read-only mount (or, not as root, a directory without write permission), SIGKILL at failpoints."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from certs import CertificateAuthority
from mqtt_ingest import failpoints
from mqtt_ingest.crl import crl_number
from tests.harness.bridge_certs import openssl, run, tree

pytestmark = pytest.mark.integration


def listing(directory: Path, cwd: Path | None = None) -> list[dict[str, str]]:
    result = run("--dir", str(directory), "list", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- 1. an offline CA on read-only media -----------------------------------------------------


@contextlib.contextmanager
def read_only(directory: Path, mountpoint: Path) -> Iterator[Path]:
    """``directory`` seen read-only: a read-only bind mount at ``mountpoint`` (as root, whom
    file modes do not stop), else the directory itself with its write bits taken off."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (directory, *directory.rglob("*")) if p.is_dir()}
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)
        try:
            yield directory
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    mountpoint.mkdir()
    bound = subprocess.run(["mount", "--bind", str(directory), str(mountpoint)], check=False)
    if bound.returncode != 0:
        pytest.skip("root without CAP_SYS_ADMIN: no read-only bind mount to test on")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(mountpoint)]
        assert subprocess.run(remount, check=False).returncode == 0
        probe = mountpoint / "probe"
        with pytest.raises(OSError, match="Read-only file system"):
            probe.write_bytes(b"")
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def crl_file_number(path: Path) -> int:
    number = crl_number(x509.load_pem_x509_crl(path.read_bytes()))
    assert number is not None
    return number


def test_an_offline_ca_on_read_only_media_lists_and_writes_crls_elsewhere(
    tmp_path: Path, pki_dir: Path
) -> None:
    """`crl --out FILE` opened DIR/.lock read-write and failed on read-only media. It works now,
    numbered above every CRL before it although crlnumber cannot be recorded; every command
    that must write the directory is refused in one line; nothing in it changes."""
    assert run("--dir", str(pki_dir), "device", "lost").returncode == 0
    assert run("--dir", str(pki_dir), "revoke", "lost").returncode == 0
    serial = int(listing(pki_dir)[1]["serial"], 16)
    # CRL numbers ahead of the clock, as after several CRLs within a second.
    recorded = int(time.time()) + 2
    (pki_dir / "crlnumber").write_text(f"{recorded}\n")
    before = tree(pki_dir)
    out = tmp_path / "deployed-crl.pem"
    with read_only(pki_dir, tmp_path / "media") as media:
        rows = listing(media)
        assert [(r["name"], r["status"]) for r in rows] == [
            ("Edge Bridge CA", "valid"),
            ("lost", "revoked"),
        ]
        numbers = []
        for _ in range(2):
            written = run("--dir", str(media), "crl", "--out", str(out))
            assert written.returncode == 0, written.stderr
            assert written.stdout == f"wrote {out}\n"
            assert "is read-only: this CRL's number is not recorded" in written.stderr
            numbers.append(crl_file_number(out))
            assert time.time() >= numbers[-1] + 1  # the clock has passed it when it returns
        crl = x509.load_pem_x509_crl(out.read_bytes())
        assert [entry.serial_number for entry in crl] == [serial]
        signed = openssl("crl", "-in", str(out), "-noout", "-CAfile", str(media / "ca.pem"))
        assert "verify OK" in signed.stdout + signed.stderr
        for args, action in [
            (("device", "new"), "issue a certificate"),
            (("server", "--dns", "sink.example"), "issue a certificate"),
            (("revoke", "lost"), "revoke"),
            (("crl",), "write crl.pem"),
            (("crl", "--out", f"{media}/../{media.name}/crl.pem"), "write crl.pem"),  # respelled
        ]:
            refused = run("--dir", str(media), *args)
            assert refused.returncode == 2
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert refused.stderr.startswith(
                f"bridge-certs: error: cannot {action}: the PKI directory {media} is not writable"
            ), refused.stderr
        assert tree(pki_dir) == before
    assert recorded < numbers[0] < numbers[1]
    # Writable again: the next CRL, to anywhere, is numbered above those never recorded.
    assert run("--dir", str(pki_dir), "crl").returncode == 0
    assert crl_file_number(pki_dir / "crl.pem") > numbers[1]


def test_a_crl_numbered_far_behind_its_records_is_refused_on_read_only_media(
    tmp_path: Path, pki_dir: Path
) -> None:
    """The clock numbers an unrecorded CRL: if the recorded numbers are far ahead of it (a
    clock set back), waiting them out is no answer, and a lower number would be a rollback."""
    (pki_dir / "crlnumber").write_text(f"{int(time.time()) + 3600}\n")
    out = tmp_path / "crl.pem"
    with read_only(pki_dir, tmp_path / "media") as media:
        refused = run("--dir", str(media), "crl", "--out", str(out))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "s ahead of the clock" in refused.stderr
    assert not out.exists()


def test_init_ca_for_a_missing_directory_on_read_only_media_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """init-ca for a PKI directory that does not exist on read-only media failed with the raw
    mkdir error (``DIR: Read-only file system``), unlike every other refusal there. It says now
    which PKI directory cannot be created, and why."""
    empty = tmp_path / "empty"
    empty.mkdir()
    why = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    with read_only(empty, tmp_path / "media") as media:
        for directory, created in [(media / "pki", media / "pki"), (media / "a/pki", media / "a")]:
            refused = run("--dir", str(directory), "init-ca")
            assert refused.returncode == 2
            assert refused.stderr == (
                f"bridge-certs: error: cannot create a CA: the PKI directory {directory} does"
                f" not exist and cannot be created ({created}: {why})\n"
            ), refused.stderr
    assert list(empty.iterdir()) == []


# -- 2. a run killed between its writes ------------------------------------------------------


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.fault
@pytest.mark.parametrize("failpoint", ["after_key", "after_cert"])
def test_an_issuance_killed_before_its_key_is_in_place_is_settled_by_a_retry(
    pki_dir: Path, failpoint: str
) -> None:
    """A `device` killed between its writes left the key without its certificate and a 'valid'
    record for a certificate no file held; the retry refused ("dev-1.key exists already"). Now
    the key reaches its name only after its certificate, and a retry settles the leftovers."""
    killed = run(
        "--dir", str(pki_dir), "device", "dev-1",
        env={"BRIDGE_FAILPOINTS": f"certs.issue.{failpoint}=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    devices = pki_dir / "devices"
    left = {"after_key": [".dev-1.key.pending"], "after_cert": [".dev-1.key.pending", "dev-1.pem"]}
    assert _files(devices) == left[failpoint]  # never a key at its name without its certificate
    interrupted = listing(pki_dir)[1]
    assert (interrupted["name"], interrupted["status"]) == ("dev-1", "interrupted")

    retried = run("--dir", str(pki_dir), "device", "dev-1")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(
        f"settled an interrupted issuance of device dev-1 serial {interrupted['serial']}: its key"
        " never reached its name: its leftover files removed, marked abandoned\n"
    ), retried.stdout
    assert _files(devices) == ["dev-1.key", "dev-1.pem"]
    verified = openssl(
        "verify", "-purpose", "sslclient", "-CAfile", str(pki_dir / "ca.pem"),
        str(devices / "dev-1.pem"),
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    matched = openssl("x509", "-in", str(devices / "dev-1.pem"), "-noout", "-pubkey")
    derived = openssl("pkey", "-in", str(devices / "dev-1.key"), "-pubout")
    assert matched.stdout == derived.stdout
    rows = listing(pki_dir)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("Edge Bridge CA", "valid"),
        ("dev-1", "abandoned"),
        ("dev-1", "valid"),
    ]
    assert rows[1]["serial"] == interrupted["serial"]
    cert = x509.load_pem_x509_certificate((devices / "dev-1.pem").read_bytes())
    assert int(rows[2]["serial"], 16) == cert.serial_number


@pytest.mark.fault
def test_an_issuance_killed_after_its_files_are_in_place_is_marked_complete(
    pki_dir: Path,
) -> None:
    """Killed after the key was linked to its name, before the record said so: the pair is
    whole and is never touched; the record becomes valid, and the retry says so as every settle
    does, and that the files it refuses to overwrite are that interrupted run's."""
    killed = run(
        "--dir", str(pki_dir), "server", "--dns", "sink.example",
        env={"BRIDGE_FAILPOINTS": "certs.issue.after_link=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9
    servers = pki_dir / "servers"
    pair = {
        name: (servers / name).read_bytes() for name in ("sink.example.key", "sink.example.pem")
    }
    interrupted = listing(pki_dir)[1]["serial"]
    retried = run("--dir", str(pki_dir), "server", "--dns", "sink.example")
    assert retried.returncode == 2
    assert retried.stdout == (
        f"settled an interrupted issuance of server sink.example serial {interrupted}: it had"
        " finished: marked complete\n"
    )
    assert retried.stderr == (
        f"bridge-certs: error: {servers / 'sink.example.pem'} exists already: an earlier run,"
        f" interrupted, had completed its issuance (serial {interrupted}, now marked complete);"
        " refusing to overwrite it\n"
    ), retried.stderr
    assert _files(servers) == sorted(pair)  # the pending link is gone, the pair as it was
    assert {name: (servers / name).read_bytes() for name in pair} == pair
    assert [r["status"] for r in listing(pki_dir)] == ["valid", "valid"]


@pytest.mark.fault
@pytest.mark.parametrize("failpoint", ["before_link", "after_link"])
def test_a_key_write_killed_before_removing_its_temporary_file_is_cleaned_up(
    pki_dir: Path, failpoint: str
) -> None:
    """A key is written to a temporary file, linked to its pending name, and the temporary
    name removed: killed before that, the temporary file, a copy of a private key (the pending
    key's second name, or its only copy if the kill came before the link), stayed for good. The
    next issuance removes it with that run's other leftovers and says so; its certificate was
    never written (it is written only once the key write has returned). Look-alikes the tool
    did not write, and the temporary files of records not being settled, are left alone."""
    assert run("--dir", str(pki_dir), "device", "dev-0").returncode == 0
    killed = run(
        "--dir", str(pki_dir), "device", "dev-1",
        env={"BRIDGE_FAILPOINTS": f"certs.write_new.{failpoint}=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    devices = pki_dir / "devices"
    (stray,) = devices.glob("..dev-1.key.pending.*.tmp")
    assert stat.S_IMODE(stray.stat().st_mode) == 0o600
    pending = devices / ".dev-1.key.pending"
    if failpoint == "after_link":
        assert stray.stat().st_ino == pending.stat().st_ino
    else:
        assert not pending.exists()
    assert not (devices / "dev-1.pem").exists()
    foreign = {
        "..dev-1.key.pending.mine.tmp": 0o600,  # not a name mkstemp makes
        ".dev-1.key.abcd1234.tmp": 0o600,  # not the pending key's
        "..dev-1.key.pending.abcd1234.tmp": 0o644,  # not a mode the tool writes a key with
        "..dev-0.key.pending.abcd1234.tmp": 0o600,  # dev-0's record is not being settled
    }
    for name, mode in foreign.items():
        (devices / name).write_bytes(b"not the tool's")
        (devices / name).chmod(mode)
    (devices / "..dev-1.key.pending.abcd1235.tmp").symlink_to(devices / "dev-0.key")
    kept = {k: v for k, v in tree(devices).items() if k not in (stray.name, pending.name)}
    interrupted = listing(pki_dir)[2]["serial"]

    retried = run("--dir", str(pki_dir), "device", "dev-1")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(
        f"settled an interrupted issuance of device dev-1 serial {interrupted}: its key never"
        " reached its name: its leftover files removed, marked abandoned\n"
        f"removed {stray}: a temporary file left by an interrupted write of a key\n"
        f"wrote {devices / 'dev-1.pem'} and {devices / 'dev-1.key'} (mode 0600): "
    ), retried.stdout
    assert not stray.exists()
    assert not pending.exists()
    after = tree(devices)
    assert {name: after[name] for name in kept} == kept  # dev-0's pair and the look-alikes
    assert sorted(set(after) - set(kept)) == ["dev-1.key", "dev-1.pem"]
    matched = openssl("x509", "-in", str(devices / "dev-1.pem"), "-noout", "-pubkey")
    derived = openssl("pkey", "-in", str(devices / "dev-1.key"), "-pubout")
    assert matched.returncode == 0
    assert matched.stdout == derived.stdout
    assert [r["status"] for r in listing(pki_dir)] == ["valid", "valid", "abandoned", "valid"]


@pytest.mark.fault
def test_a_retry_never_touches_a_key_file_it_did_not_write(pki_dir: Path) -> None:
    """Killed with the certificate in place, then someone puts a file at the key's name: it is
    not the tool's to judge or remove; the retry refuses and leaves everything as it is."""
    killed = run(
        "--dir", str(pki_dir), "device", "dev-2",
        env={"BRIDGE_FAILPOINTS": "certs.issue.after_cert=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9
    (pki_dir / "devices" / "dev-2.key").write_bytes(b"precious")
    before = tree(pki_dir / "devices")
    retried = run("--dir", str(pki_dir), "device", "dev-2")
    assert retried.returncode == 2
    assert "exists already; refusing to overwrite it" in retried.stderr
    assert tree(pki_dir / "devices") == before
    assert listing(pki_dir)[1]["status"] == "interrupted"


@pytest.mark.parametrize(("failpoint", "kept"), [("after_key", []), ("after_cert", ["abandoned"])])
def test_an_issuance_that_fails_removes_what_it_wrote(
    tmp_path: Path, failpoint: str, kept: list[str]
) -> None:
    """A failure (not a kill) is undone at once: its files go, and its record too unless its
    certificate had reached the disk (then the serial stays known, abandoned)."""
    ca = CertificateAuthority.create(tmp_path / "pki")
    failpoints.arm(f"certs.issue.{failpoint}", "raise")
    try:
        with pytest.raises(failpoints.FailpointError):
            ca.issue_device("dev-3")
    finally:
        failpoints.disarm_all()
    assert _files(tmp_path / "pki" / "devices") == []
    assert [r.issuance for r in ca.records()[1:]] == kept
    issued = ca.issue_device("dev-3")
    assert issued.settled == ()
    assert [r.issuance for r in ca.records()[1:]] == [*kept, "complete"]


# -- 3. paths in the index -------------------------------------------------------------------


def test_list_from_another_directory_shows_where_the_files_are(tmp_path: Path) -> None:
    """index.json stored --dir/--cert paths as given, relative to the issuing command's
    directory: `list` from anywhere else showed paths that lead nowhere."""
    work = tmp_path / "work"
    work.mkdir()
    assert run("--dir", "pki", "init-ca", cwd=work).returncode == 0
    issued = run("--dir", "pki", "device", "d1", "--cert", "out/d1.pem", "--key", "out/d1.key",
                 cwd=work)  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert run("--dir", "pki", "device", "d2", cwd=work).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rows = listing(work / "pki", cwd=elsewhere)
    assert [(r["cert"], r["key"]) for r in rows] == [
        (str(work / "pki/ca.pem"), str(work / "pki/ca.key")),
        (str(work / "out/d1.pem"), str(work / "out/d1.key")),
        (str(work / "pki/devices/d2.pem"), str(work / "pki/devices/d2.key")),
    ]
    assert all(Path(r["cert"]).is_file() and Path(r["key"]).is_file() for r in rows)
    stored = json.loads((work / "pki/index.json").read_text())
    assert [r["cert_path"] for r in stored] == [
        "ca.pem",
        str(work / "out/d1.pem"),
        "devices/d2.pem",
    ]
    # Moved elsewhere, the directory still lists its own files (they are relative to it).
    (work / "pki").rename(tmp_path / "moved")
    assert listing(Path("moved"), cwd=tmp_path)[2]["cert"] == "moved/devices/d2.pem"


def test_records_of_earlier_versions_are_read_by_what_their_paths_can_mean(
    tmp_path: Path, pki_dir: Path
) -> None:
    """An index written before: paths as given to the issuing command. One in the tool's own
    layout names that file of the PKI directory if that file is the record's certificate (not
    when ``--cert out/devices/ID.pem`` put it elsewhere: it was mapped to a file that does not
    exist, or to another certificate, and the next save lost the path it had); another relative
    one has no knowable base and is shown as given; an absolute one as it is. A later issuance
    keeps them so."""
    assert run("--dir", str(pki_dir), "device", "e").returncode == 0
    records = json.loads((pki_dir / "index.json").read_text())
    ca = {key: records[0][key] for key in ("serial", "kind", "name", "not_before", "not_after")}
    e_serial = records[1]["serial"]
    old = [
        {**ca, "cert_path": "some/where/pki/ca.pem", "revoked_at": None},
        {**ca, "serial": "7", "kind": "device", "name": "a", "cert_path": "out/devices/a.pem",
         "revoked_at": None},
        {**ca, "serial": "8", "kind": "device", "name": "b", "cert_path": "new/b.pem",
         "revoked_at": None},
        {**ca, "serial": "9", "kind": "device", "name": "c", "cert_path": "/srv/c.pem",
         "revoked_at": None},
        {**ca, "serial": e_serial, "kind": "device", "name": "e", "cert_path": "pki/devices/e.pem",
         "revoked_at": None},
        {**ca, "serial": "10", "kind": "device", "name": "e", "cert_path": "out/devices/e.pem",
         "revoked_at": None},
    ]  # fmt: skip
    (pki_dir / "index.json").write_text(json.dumps(old))
    expected = [
        (str(pki_dir / "ca.pem"), "valid"),
        ("out/devices/a.pem", "valid"),  # no such file in the PKI directory
        ("new/b.pem", "valid"),
        ("/srv/c.pem", "valid"),
        (str(pki_dir / "devices/e.pem"), "valid"),
        ("out/devices/e.pem", "valid"),  # the PKI directory's file is another certificate
    ]
    assert [(r["cert"], r["status"]) for r in listing(pki_dir, cwd=tmp_path)] == expected
    assert run("--dir", str(pki_dir), "device", "d").returncode == 0
    rows = listing(pki_dir, cwd=tmp_path)
    assert [(r["cert"], r["status"]) for r in rows[:6]] == expected
    assert [r["key"] for r in rows] == [None] * 6 + [str(pki_dir / "devices/d.key")]


@pytest.mark.fault
def test_an_init_ca_killed_between_its_files_says_what_to_do(tmp_path: Path) -> None:
    """An init-ca killed after writing ca.key left it alone there: every command then said
    "no CA ... run init-ca", and init-ca said "ca.key exists already". A CA key is never removed
    for the operator (it may be the only copy of a real CA's), but both now say what happened
    and what to do."""
    directory = tmp_path / "pki"
    killed = run(
        "--dir", str(directory), "init-ca",
        env={"BRIDGE_FAILPOINTS": "certs.init_ca.after_key=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert _files(directory) == [".lock", "ca.key"]
    hint = "is there without ca.pem or index.json: an init-ca that did not finish?"
    for args in (("init-ca",), ("device", "dev-1")):
        refused = run("--dir", str(directory), *args)
        assert refused.returncode == 2
        assert hint in refused.stderr, refused.stderr
        assert "Delete it, then run 'bridge-certs init-ca' again" in refused.stderr
    assert _files(directory) == [".lock", "ca.key"]
    (directory / "ca.key").unlink()
    assert run("--dir", str(directory), "init-ca").returncode == 0


@pytest.mark.fault
@pytest.mark.parametrize("failpoint", ["before_link", "after_link"])
def test_an_init_ca_killed_while_writing_its_key_leaves_no_stray_copy(
    tmp_path: Path, failpoint: str
) -> None:
    """A kill inside the key's write leaves its temporary file, a copy of the CA key (found by
    the review of the issuance's cleanup). After the link (ca.key there too) the hint names the
    copy, for the operator to delete with ca.key; before it (the key never had its name, so
    nothing was signed with it) the next init-ca removes it."""
    directory = tmp_path / "pki"
    killed = run(
        "--dir", str(directory), "init-ca",
        env={"BRIDGE_FAILPOINTS": f"certs.write_new.{failpoint}=kill9"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    [copy] = [f for f in _files(directory) if f.endswith(".tmp")]
    assert copy.startswith(".ca.key.")
    if failpoint == "after_link":
        assert (directory / copy).stat().st_ino == (directory / "ca.key").stat().st_ino
        refused = run("--dir", str(directory), "device", "dev-1")
        assert refused.returncode == 2
        assert f"Delete it and {directory / copy} (a copy of it the killed" in refused.stderr
        (directory / "ca.key").unlink()
        (directory / copy).unlink()
    else:
        assert "ca.key" not in _files(directory)
    assert run("--dir", str(directory), "init-ca").returncode == 0
    assert _files(directory) == [".lock", "ca.key", "ca.pem", "index.json"]
