"""``edge-agent doctor`` against a real sink: all green, then failing on each broken item with
its message and a fix, exit status 1."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_sink.config import parse_config as parse_sink_config
from cloud_sink.service import Sink
from edge_agent import Agent, load_config
from edge_agent.clocksync import (
    ClockSync,
    clock_sync,
    kernel_sync,
    parse_timedatectl,
    timedatectl_sync,
)
from edge_agent.doctor import run_checks
from tests.harness.agent import uplink_section, write_config
from tests.harness.agent_cli import acli
from tests.harness.clock import SkewedClock
from tests.harness.disk import small_disk
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.report import figures
from tests.harness.sink import running_sink, write_sink_config
from tests.harness.stages import Gate, RecordingStage, counters, running_server

pytestmark = pytest.mark.integration


def copy_creds(creds: DeviceCreds, directory: Path) -> DeviceCreds:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "device.pem", directory / "device.key"
    shutil.copyfile(creds.cert, cert)
    shutil.copyfile(creds.key, key)
    key.chmod(0o600)
    return DeviceCreds(creds.device_id, cert, key, creds.serial)


def agent_config(tmp_path: Path, pki: Pki, port: int) -> Path:
    """An agent.toml for a new device (its credentials copied as an operator would) whose
    uplink goes to the test sink on ``port``."""
    device = copy_creds(pki.device(f"doc-{uuid.uuid4().hex[:6]}"), tmp_path / "creds")
    return write_config(
        tmp_path / "agent", device_id=device.device_id,
        uplink=uplink_section(pki, device, port),
    )  # fmt: skip


async def test_doctor_passes_against_a_working_sink(tmp_path: Path, pki: Pki) -> None:
    async with running_sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, server.port)
        (tmp_path / "agent" / "data").mkdir()  # as `install` leaves it: no buffer yet
        done = await acli(path, "doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the agent will create its buffer there" in done.stdout
    names = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line[:4].strip()]
    assert names == [
        "config", "data", "files", "clock", "certificate", "identity", "key", "token", "dns",
        "tcp", "tls", "connect",
    ]  # fmt: skip
    assert "CONNACK accepted" in done.stdout
    assert "FAIL" not in done.stdout


def test_doctor_warns_of_a_data_directory_below_the_disk_reserve(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 4 * 1024**2) as disk:
        path = write_config(disk / "agent")  # the default reserve: 16 MiB, more than there is
        (disk / "agent" / "data").mkdir()
        config = load_config(path)
        [_, data] = list(run_checks(config, path))[:2]
    assert (data.ok, data.warning) == (True, True), data
    assert "MB free (disk_reserve 16.8 MB)" in data.detail
    assert "that is below the reserve" in data.detail


Breakage = Callable[[Pki, DeviceCreds, Path], str]  # returns extra [uplink] keys or token text


def _other_key(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    other = pki.device(f"other-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(other.key, device.key)
    return ""


def _expired(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    old = pki.expired_device(f"old-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(old.cert, device.cert)
    shutil.copyfile(old.key, device.key)
    return ""


def _not_yet_valid(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    future = pki.future_device(f"future-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(future.cert, device.cert)
    shutil.copyfile(future.key, device.key)
    return ""


def _foreign(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    foreign = pki.foreign_device(f"alien-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(foreign.cert, device.cert)
    shutil.copyfile(foreign.key, device.key)
    return ""


def _other_device(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    """The most common provisioning mistake: another device's certificate and key."""
    other = pki.device(f"twin-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(other.cert, device.cert)
    shutil.copyfile(other.key, device.key)
    return ""


def _missing_ca(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return "MISSING_CA"


def _wrong_audience(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return 'TOKEN:audience = "somebody.else"'


def _closed_port(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return "CLOSED_PORT"


def _unknown_host(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return "HOST:no-such-host.invalid"


def _wrong_name(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return "WRONG_SERVER_NAME"  # the sink presents a certificate for other.example


def _revoked_sink(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    return "REVOKED_SERVER"  # the sink presents a certificate the agent's CRL lists


def _expired_crl(pki: Pki, device: DeviceCreds, tmp_path: Path) -> str:
    crl = pki.ca.write_crl(tmp_path / "short-crl.pem", days=1 / 86400)
    time.sleep(1.5)
    return f"CRL:{crl}"


@pytest.mark.parametrize(
    ("breakage", "check", "message"),
    [
        (_missing_ca, "files", "does not exist"),
        (_other_key, "key", "is not the key of"),
        (_not_yet_valid, "clock", "before the certificate was issued"),
        (_expired, "certificate", "expired"),
        (_foreign, "certificate", "was not issued by the CA"),
        (_other_device, "identity", "is the certificate of twin-"),
        (_unknown_host, "dns", "does not resolve"),
        (_closed_port, "tcp", "cannot reach"),
        (_wrong_name, "tls", "not trusted"),
        (_revoked_sink, "tls", "certificate revoked"),
        (_expired_crl, "crl", "expired at"),
        (_wrong_audience, "connect", "refused the CONNECT"),
    ],
)
async def test_doctor_fails_on_each_broken_item(
    tmp_path: Path, pki: Pki, breakage: Breakage, check: str, message: str
) -> None:
    device = copy_creds(pki.device(f"doc-{uuid.uuid4().hex[:6]}"), tmp_path / "creds")
    change = breakage(pki, device, tmp_path)
    server_cert = None
    crl = change.removeprefix("CRL:") if change.startswith("CRL:") else None
    if change == "WRONG_SERVER_NAME":
        issued = pki.server(f"other-{uuid.uuid4().hex[:6]}", ["other.example"])
        server_cert = (issued.cert_path, issued.key_path)
    elif change == "REVOKED_SERVER":
        issued = pki.server(f"gone-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"])
        server_cert = (issued.cert_path, issued.key_path)
        pki.ca.revoke(f"{issued.serial:x}")
        crl = str(shutil.copyfile(pki.crl, tmp_path / "crl.pem"))
    async with running_sink(tmp_path, pki, server_cert=server_cert) as server:
        port = free_port() if change == "CLOSED_PORT" else server.port
        host = change.removeprefix("HOST:") if change.startswith("HOST:") else "localhost"
        token = change.removeprefix("TOKEN:") if change.startswith("TOKEN:") else None
        section = uplink_section(
            pki, device, port, host=host, **({"token": token} if token else {})
        )
        if change == "MISSING_CA":
            section = section.replace(str(pki.ca_cert), str(tmp_path / "nowhere" / "ca.pem"))
        if crl is not None:
            section = section.replace("[uplink.tls]\n", f'[uplink.tls]\ncrl = "{crl}"\n')
        path = write_config(tmp_path / "agent", device_id=device.device_id, uplink=section)
        done = await acli(path, "doctor")
    assert done.returncode == 1, done.stdout
    failing = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failing, done.stdout
    assert failing[0].startswith(f"FAIL {check}:"), done.stdout
    assert message in failing[0], done.stdout
    assert "fix:" in done.stdout


def test_doctor_only_warns_of_another_identity_for_a_standard_broker(
    tmp_path: Path, pki: Pki
) -> None:
    """With no token (a standard broker, which may not read the device id from the
    certificate), a certificate of another name is a warning, not a failure."""
    device = copy_creds(pki.device(f"doc-{uuid.uuid4().hex[:6]}"), tmp_path / "creds")
    other = pki.device(f"twin-{uuid.uuid4().hex[:6]}")
    shutil.copyfile(other.cert, device.cert)
    shutil.copyfile(other.key, device.key)
    section = uplink_section(pki, device, free_port(), token='mode = "none"')
    path = write_config(tmp_path / "agent", device_id=device.device_id, uplink=section)
    checks = {check.name: check for check in run_checks(load_config(path), path)}
    identity = checks["identity"]
    assert (identity.ok, identity.warning) == (True, True)
    assert f"is the certificate of {other.device_id}" in identity.detail
    assert "a standard broker may not" in identity.detail


async def test_doctor_does_not_knock_a_running_agent_off_the_sink(tmp_path: Path, pki: Pki) -> None:
    """Its CONNECT uses the device's client id: the sink would take the session over, closing
    the running agent's connection (which then resends its in-flight window)."""
    async with running_sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, server.port)
        async with Agent(load_config(path)) as agent:
            await agent.publish("sensors/t", b"1")
            async with asyncio.timeout(20):
                while server.connection_count == 0:  # noqa: ASYNC110  # polling a counter
                    await asyncio.sleep(0.05)
            done = await acli(path, "doctor")
            assert server.connection_count == 1
        assert counters(server).get("takeovers") == 0
    assert done.returncode == 0, done.stdout + done.stderr
    assert "connect: skipped: the agent (pid" in done.stdout


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o600, False), (0o640, False), (0o644, True), (0o660, True), (0o604, True)],
)
def test_doctor_accepts_the_installed_key_mode_and_warns_on_exposed_keys(
    tmp_path: Path, pki: Pki, mode: int, warned: bool
) -> None:
    # 0640 root:edge-agent is what the README installs; group write or others' access is not.
    path = agent_config(tmp_path, pki, free_port())
    config = load_config(path)
    assert config.uplink is not None
    config.uplink.tls.key.chmod(mode)
    files = next(check for check in run_checks(config, path) if check.name == "files")
    assert files.ok
    assert files.warning is warned, files.detail
    if warned:
        assert f"has mode {mode:o}: chmod 640 (root:edge-agent) or 600" in files.detail
    else:
        assert f"key mode {mode:04o}" in files.detail


def test_doctor_fails_on_a_certificate_path_that_is_a_directory(tmp_path: Path, pki: Pki) -> None:
    path = agent_config(tmp_path, pki, free_port())
    config = load_config(path)
    assert config.uplink is not None
    config.uplink.tls.cert.unlink()
    config.uplink.tls.cert.mkdir()
    checks = list(run_checks(config, path))
    files = next(check for check in checks if check.name == "files")
    assert not files.ok
    assert f"uplink cert {config.uplink.tls.cert} is not a regular file" in files.detail


async def test_a_data_dir_that_is_a_file_is_a_clear_error_everywhere(
    tmp_path: Path, pki: Pki
) -> None:
    path = agent_config(tmp_path, pki, free_port())
    config = load_config(path)
    config.agent.data_dir.parent.mkdir(parents=True, exist_ok=True)
    config.agent.data_dir.write_text("not a directory\n")
    check = list(run_checks(config, path))[1]
    assert (check.name, check.ok) == ("data directory", False)
    data = config.agent.data_dir
    assert f"{data} is not a directory" in check.detail
    for command in (["run"], ["publish", "sensors/t", "1"]):
        done = await acli(path, *command)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert f"data_dir {data} is not a directory" in done.stderr
    done = await acli(path, "status")
    assert (done.returncode, done.stderr) == (1, f"edge-agent: no buffer at {data}/buffer.db\n")


async def test_doctor_reports_an_invalid_config_as_its_failed_first_check(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent")
    path.write_text(path.read_text().replace('filter = "#"', 'filter = "other/#"'))
    done = await acli(path, "doctor")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("FAIL config: "), done.stdout
    assert 'must have filter = "#"' in done.stdout
    assert "fix: correct each item listed" in done.stdout


def _listener_tls(directory: Path, ca: Path, cert: Path, key: Path) -> Path:
    return write_config(
        directory,
        listener=(
            'host = "0.0.0.0"\nport = 0\n[listener.tls]\n'
            f'ca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n'
        ),
    )


async def test_doctor_and_run_on_a_missing_listener_tls_file(tmp_path: Path) -> None:
    """Found by review: doctor checked only the uplink's files and passed; `run` then printed a
    traceback ending in a FileNotFoundError that named no file, and exited 1, which systemd's
    Restart=on-failure turned into a restart loop. Now doctor fails on [listener.tls], and `run`
    refuses the start in one line naming the section and every missing file, exit status 2
    (like an invalid configuration: the unit's RestartPreventExitStatus=2)."""
    path = _listener_tls(tmp_path, tmp_path / "ca.pem", tmp_path / "srv.pem", tmp_path / "srv.key")
    doctor = await acli(path, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    failing = [line for line in doctor.stdout.splitlines() if line.startswith("FAIL")]
    assert failing, doctor.stdout
    assert failing[0].startswith("FAIL listener tls: "), doctor.stdout
    assert f"{tmp_path}/ca.pem" in failing[0]
    run = await acli(path, "run")
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent: [listener.tls]: "), last
    for what, name in (("ca", "ca.pem"), ("cert", "srv.pem"), ("key", "srv.key")):
        assert f"cannot read {what} {tmp_path}/{name}: No such file or directory" in last, last
    assert not (tmp_path / "data" / "buffer.db").exists()  # refused before the buffer opened


async def test_doctor_and_run_on_a_listener_key_that_is_not_the_certificates(
    tmp_path: Path, pki: Pki
) -> None:
    server = pki.server(f"listener-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"])
    other = pki.device(f"other-{uuid.uuid4().hex[:6]}")
    path = _listener_tls(tmp_path, pki.ca_cert, server.cert_path, other.key)
    doctor = await acli(path, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    failing = [line for line in doctor.stdout.splitlines() if line.startswith("FAIL")]
    assert failing, doctor.stdout
    assert failing[0] == (
        f"FAIL listener tls: [listener.tls]: key {other.key} is not the key of cert"
        f" {server.cert_path}"
    ), doctor.stdout
    run = await acli(path, "run")
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"edge-agent: [listener.tls]: key {other.key} is not the key of cert {server.cert_path}"
    )


async def test_doctor_and_run_on_a_listener_ca_that_is_no_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    server = pki.server(f"listener-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"])
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    path = _listener_tls(tmp_path, ca, server.cert_path, server.key_path)
    doctor = await acli(path, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    assert f"FAIL listener tls: [listener.tls]: ca {ca} has no usable CA certificate" in (
        doctor.stdout
    )
    run = await acli(path, "run")
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    assert f"edge-agent: [listener.tls]: ca {ca} has no usable CA certificate" in run.stderr


def test_doctor_passes_a_working_listener_tls_and_warns_before_it_expires(
    tmp_path: Path, pki: Pki
) -> None:
    name = f"listener-{uuid.uuid4().hex[:6]}"
    server = pki.server(name, ["localhost"], ["127.0.0.1"], days=365)
    path = _listener_tls(tmp_path / "a", pki.ca_cert, server.cert_path, server.key_path)
    checks = {check.name: check for check in run_checks(load_config(path), path)}
    listener = checks["listener tls"]
    assert (listener.ok, listener.warning) == (True, False), listener
    assert "the key matches; the cert expires in 364 days" in listener.detail
    soon = pki.server(f"{name}-soon", ["localhost"], ["127.0.0.1"], days=10)
    path = _listener_tls(tmp_path / "b", pki.ca_cert, soon.cert_path, soon.key_path)
    checks = {check.name: check for check in run_checks(load_config(path), path)}
    listener = checks["listener tls"]
    assert (listener.ok, listener.warning) == (True, True), listener
    assert listener.detail.endswith("expires in 9 days: renew it soon"), listener


@pytest.mark.parametrize(
    ("behind", "refusal"),
    [
        # 600 or 601: the sink reads its clock up to a second after the doctor minted `iat`.
        (600, r"token issued 60[01]s ago: the device clock is behind\?"),
        (3 * 3600, "token expired"),
        (-600, "token not valid yet"),
    ],
    ids=["10min-behind", "3h-behind", "10min-ahead"],
)
async def test_doctor_names_the_clock_when_the_sink_refuses_a_token_minted_by_a_wrong_clock(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, behind: int, refusal: str
) -> None:
    """Found by review: with the gateway's clock hours behind, the clock check passed (the
    certificate was issued even further back), the sink refused the token (CONNACK "bad user
    name or password") and the fix line pointed at the audience, the mode and the deny list
    only. A sink clock ahead is a gateway clock behind: the doctor, a process of its own, mints
    its token with this machine's real clock."""
    config = write_sink_config(tmp_path, pki)
    async with Sink(parse_sink_config(config.read_text()), clock=SkewedClock(behind)) as sink:
        path = agent_config(tmp_path, pki, sink.port)
        done = await acli(path, "doctor")
    assert re.search(rf"\): {refusal}", caplog.text), caplog.text
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    [failing] = [index for index, line in enumerate(lines) if line.startswith("FAIL")]
    assert lines[failing].startswith("FAIL connect: the server refused the CONNECT: "), lines
    fix = lines[failing + 1]
    assert "the gateway's clock (a token minted by a clock behind or ahead is refused)" in fix
    assert "[uplink.token] (audience, mode)" in fix


async def test_doctor_says_a_server_unavailable_is_no_setting_of_the_agent(
    tmp_path: Path, pki: Pki
) -> None:
    """A server that cannot take events (our sink with its core queue down) answers CONNACK 3,
    "server unavailable": the fix pointed at the token's audience, the mode and the deny list,
    none of which is wrong then."""
    gate = Gate()
    gate.close()
    async with running_server(
        RecordingStage(), ssl_context=pki.server_context(), availability=gate
    ) as server:
        done = await acli(agent_config(tmp_path, pki, server.port), "doctor")
    lines = done.stdout.splitlines()
    [failing] = [index for index, line in enumerate(lines) if line.startswith("FAIL")]
    assert lines[failing].startswith("FAIL connect: the server refused the CONNECT: "), lines
    assert "the server cannot take events now" in lines[failing + 1]
    assert "audience" not in lines[failing + 1]


TIMEDATECTL_SHOW = """Timezone=Etc/UTC
LocalRTC=no
CanNTP=yes
NTP=yes
NTPSynchronized={}
TimeUSec=Wed 2024-05-01 10:00:00 UTC
RTCTimeUSec=Wed 2024-05-01 10:00:00 UTC
"""
TIMEDATECTL_STATUS = """               Local time: Wed 2024-05-01 10:00:00 UTC
           Universal time: Wed 2024-05-01 10:00:00 UTC
                 RTC time: Wed 2024-05-01 10:00:00
                Time zone: Etc/UTC (UTC, +0000)
System clock synchronized: {}
              NTP service: active
          RTC in local TZ: no
"""
TIMEDATECTL_STATUS_BEFORE_239 = """      Local time: Wed 2019-05-01 10:00:00 UTC
  Universal time: Wed 2019-05-01 10:00:00 UTC
        RTC time: Wed 2019-05-01 10:00:00
       Time zone: Etc/UTC (UTC, +0000)
 Network time on: yes
NTP synchronized: {}
 RTC in local TZ: no
"""


@pytest.mark.parametrize(
    "text", [TIMEDATECTL_SHOW, TIMEDATECTL_STATUS, TIMEDATECTL_STATUS_BEFORE_239]
)
def test_timedatectl_output_is_read_in_each_format(text: str) -> None:
    assert parse_timedatectl(text.format("yes")) is True
    assert parse_timedatectl(text.format("no")) is False
    assert parse_timedatectl("yes\n") is None  # `--value` alone: not what is run
    no_systemd = "System has not been booted with systemd as init system (PID 1). Can't operate."
    assert parse_timedatectl(no_systemd) is None


def test_the_kernels_maximum_error_at_its_ceiling_is_not_synchronised() -> None:
    """As systemd's timedatectl decides: a maximum error under 16 s is synchronised (STA_UNSYNC
    alone is not: chronyd may keep it set to keep the kernel off the RTC)."""
    synced = kernel_sync(maxerror_us=16_000_000 - 1, esterror_us=120)
    assert synced == ClockSync(
        True, "NTP synchronised (kernel: estimated error 0.1 ms, at most 16.0 s)"
    )
    unsynced = kernel_sync(maxerror_us=16_000_000, esterror_us=16_000_000)
    assert unsynced.synchronised is False
    assert "the kernel's maximum error is 16 s, its ceiling" in unsynced.detail


def test_clock_sync_on_this_machine_agrees_with_timedatectl(tmp_path: Path, pki: Pki) -> None:
    """What this machine says (printed); where timedatectl answers (a systemd host), the
    kernel's answer read here must be its. doctor's clock line carries it, a WARN unless
    synchronised."""
    found = clock_sync()
    figures("clock_sync on this machine", synchronised=found.synchronised, detail=found.detail)
    if found.synchronised is None:
        assert found.detail.startswith("NTP synchronisation unknown (adjtimex: "), found
    fallback = timedatectl_sync()  # what is asked where adjtimex cannot be called
    figures("timedatectl on this machine", answer=fallback)
    if isinstance(fallback, str):  # why it could not tell: "unknown" then names it
        assert fallback.startswith("timedatectl: "), fallback
    timedatectl = shutil.which("timedatectl")
    if timedatectl is not None:
        done = subprocess.run(
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip() in ("yes", "no"):
            assert found.synchronised is (done.stdout.strip() == "yes"), (found, done.stdout)
    path = agent_config(tmp_path, pki, free_port())
    clock = next(check for check in run_checks(load_config(path), path) if check.name == "clock")
    figures("doctor's clock line", line=clock.line())
    assert clock.ok
    assert found.detail in clock.detail
    assert clock.warning is not found.synchronised
    if clock.warning:
        assert "enable NTP (timedatectl set-ntp true, or chrony/ntpd)" in clock.detail
