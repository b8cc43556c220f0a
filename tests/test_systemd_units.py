"""The unit files (SPEC §5 "systemd", issue #7): ``systemd-analyze verify`` accepts them as
``edge-agent install`` / ``cloud-sink install`` write them, the hardening holds up in
``systemd-analyze security``, and the copies the install ships are the files in systemd/.

``verify`` insists that ExecStart='s program exists, so each unit is checked as the install
renders it: ExecStart pointing at this virtual environment's console script.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mqtt_ingest.install import render_unit
from tests.harness.process import console_script

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
UNITS = {"edge-agent": "edge_agent", "cloud-sink": "cloud_sink"}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    # A failure, not a skip: CI must not pass without having checked the units.
    assert found is not None, "systemd-analyze is needed (Debian: apt-get install systemd)"
    return found


def rendered(name: str, directory: Path) -> Path:
    """The unit as `install` writes it, in ``directory`` under its own name."""
    text = (REPO / "systemd" / f"{name}.service").read_text()
    path = directory / f"{name}.service"
    path.write_text(render_unit(text, console_script(name)))
    return path


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value (systemd keys may repeat)."""
    result: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.setdefault(section, {}).setdefault(key, []).append(value)
    return result


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(name: str, tmp_path: Path) -> None:
    unit = rendered(name, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    # verify prints problems (unknown keys, bad values, missing programs) even when it exits 0.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    assert f"ExecStart={console_script(name)} --config /etc/{name}/" in unit.read_text()


@pytest.mark.parametrize("name", UNITS)
def test_verify_catches_a_broken_unit(name: str, tmp_path: Path) -> None:
    # The check above is worth something only if verify does refuse a bad unit.
    unit = rendered(name, tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notiffy"))
    result = subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert "notiffy" in result.stdout + result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_hardening_exposure_stays_low(name: str, tmp_path: Path) -> None:
    unit = rendered(name, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    # 0 (locked down) .. 100 (exposed); --threshold=20 fails above 2.0.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize(("name", "package"), UNITS.items())
def test_the_install_ships_the_units_in_systemd_dir(name: str, package: str) -> None:
    shipped = REPO / package / "templates" / f"{name}.service"
    assert shipped.read_bytes() == (REPO / "systemd" / f"{name}.service").read_bytes(), (
        f"systemd/{name}.service changed: cp systemd/{name}.service {package}/templates/"
    )


@pytest.mark.parametrize("name", UNITS)
def test_the_unit_says_what_issue_7_asks(name: str) -> None:
    unit = directives(REPO / "systemd" / f"{name}.service")
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify"
    assert one["WatchdogSec"] == "30s"
    assert one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == "2"  # a configuration error does not loop
    assert (one["User"], one["Group"]) == (name, name)
    assert "DynamicUser" not in service  # the state keeps a fixed owner across restarts
    assert (one["StateDirectory"], one["ConfigurationDirectory"]) == (name, name)
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["CapabilityBoundingSet"] == ""  # 8883 > 1023: no CAP_NET_BIND_SERVICE
    assert one["AmbientCapabilities"] == ""
    assert one["UMask"] == "0077"
    for key, value in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "ProtectClock": "yes", "ProtectHostname": "yes",
    }.items():  # fmt: skip
        assert one[key] == value, key
    assert "@system-service" in service["SystemCallFilter"]
    if name == "cloud-sink":
        assert one["LimitNOFILE"] == "65536"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
