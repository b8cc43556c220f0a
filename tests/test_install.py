"""``edge-agent install`` / ``cloud-sink install`` (issue #7), run for real below a temporary
``--root``, and the configuration templates they copy, checked by the real ``check-config``."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.harness.pki import Pki
from tests.harness.process import console_script

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# A commented setting is "#key = value" or "#[section]"; prose comments are "# text".
SETTING = re.compile(r"^#(?=\[|[a-z_]+ = )", re.MULTILINE)


def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(name), *args], capture_output=True, text=True, timeout=60, check=False
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def uncomment(text: str) -> str:
    """The template with every commented setting switched on (as its header explains)."""
    return SETTING.sub("", text)


@pytest.mark.parametrize(
    ("name", "config"), [("edge-agent", "agent.toml"), ("cloud-sink", "sink.toml")]
)
def test_install_below_a_root(tmp_path: Path, name: str, config: str) -> None:
    root = tmp_path / "root"
    result = run(name, "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    out = result.stdout

    etc, state = root / "etc" / name, root / "var" / "lib" / name
    unit = root / "etc" / "systemd" / "system" / f"{name}.service"
    assert (mode(etc), mode(state), mode(etc / config), mode(unit)) == (0o750, 0o700, 0o640, 0o644)
    package = name.replace("-", "_")
    assert (etc / config).read_bytes() == (REPO / package / "templates" / config).read_bytes()
    # The unit runs the console script that did the install (this virtual environment).
    exec_start = f"ExecStart={console_script(name)} --config /etc/{name}/{config} run\n"
    assert exec_start in unit.read_text()
    assert unit.read_text().replace(exec_start, "") == (
        (REPO / "systemd" / f"{name}.service").read_text()
        .replace(f"ExecStart=/usr/local/bin/{name} --config /etc/{name}/{config} run\n", "")
    )  # fmt: skip
    # What belongs to the real system is printed, not done.
    assert re.search(
        rf"skipped under --root .*: useradd --system .*--no-create-home .* {name}", out
    )
    assert "--shell /usr/sbin/nologin" in out or "--shell /sbin/nologin" in out
    assert f"chown root:{name} {etc}" in out
    assert f"chown {name}:{name} {state}" in out
    assert (
        "skipped under --root (systemd runs on the target system): systemctl daemon-reload" in out
    )
    assert f"systemctl enable --now {name}" in out

    # A second install keeps the operator's configuration and says so.
    (etc / config).write_text("# mine\n")
    again = run(name, "install", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert (etc / config).read_text() == "# mine\n"
    assert f"kept {etc / config}" in again.stdout
    assert f"{unit} is up to date" in again.stdout
    assert not list(etc.glob(".*.tmp"))


def test_dry_run_does_nothing_and_says_everything(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("edge-agent", "install", "--root", str(root), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not root.exists()
    for step in (
        "would run: useradd --system",
        f"would make directory {root}/etc/edge-agent 0750 root:edge-agent",
        f"would make directory {root}/var/lib/edge-agent 0700 edge-agent:edge-agent",
        f"would write {root}/etc/edge-agent/agent.toml 0640 root:edge-agent",
        f"would write {root}/etc/systemd/system/edge-agent.service 0644",
        "would run: systemctl daemon-reload",
    ):
        assert step in result.stdout


@pytest.mark.parametrize(
    ("executable", "message"),
    [
        ("/opt/my tools/edge-agent", "cannot be the unit's ExecStart="),
        ("/opt/100%/edge-agent", "cannot be the unit's ExecStart="),
        ("/nowhere/edge-agent", "/nowhere/edge-agent is not an executable file"),
    ],
)
def test_an_executable_the_unit_could_not_run_is_refused(
    tmp_path: Path, executable: str, message: str
) -> None:
    """The path went into ExecStart= as it was: systemd split it at the space (or expanded the
    %), and the service ran another program or none."""
    root = ["--root", str(tmp_path / "root")] if " " in executable or "%" in executable else []
    result = run("edge-agent", "install", *root, "--dry-run", "--executable", executable)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "root").exists()


def test_install_leaves_a_masked_unit_masked(tmp_path: Path) -> None:
    """`systemctl mask` links the unit to /dev/null: install replaced the link with a file and
    so unmasked the service without a word."""
    root = tmp_path / "root"
    unit = root / "etc/systemd/system/edge-agent.service"
    unit.parent.mkdir(parents=True)
    unit.symlink_to("/dev/null")
    result = run("edge-agent", "install", "--root", str(root))
    assert result.returncode == 1
    assert "is masked (a link to /dev/null): run `systemctl unmask edge-agent.service`" in (
        result.stderr
    )
    assert unit.is_symlink()
    assert not (root / "etc/edge-agent").exists()  # nothing was changed


def test_install_without_root_privileges_or_root_dir_is_refused(tmp_path: Path) -> None:
    # As root (CI containers), become nobody first.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [*(drop if os.geteuid() == 0 else []), console_script("edge-agent"), "install"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "needs root (or --root DIR, --dry-run)" in result.stderr


# -- the templates --------------------------------------------------------------------------------


def test_agent_template_refuses_to_start_until_the_device_id_is_set(tmp_path: Path) -> None:
    result = run("edge-agent", "--config", str(REPO / "edge_agent/templates/agent.toml"),
                 "check-config")  # fmt: skip
    assert result.returncode == 2
    assert "agent.device_id: Field required" in result.stderr


def test_agent_template_with_every_setting_switched_on_passes_check_config(
    tmp_path: Path,
) -> None:
    text = uncomment((REPO / "edge_agent/templates/agent.toml").read_text())
    assert "#" + "device_id" not in text
    path = tmp_path / "agent.toml"
    path.write_text(text.replace("/var/lib/edge-agent", str(tmp_path / "data")))
    result = run("edge-agent", "--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    # Every setting shown in the template is a real key with a valid value: unknown keys are
    # errors, so exit 0 proves it; spot-check that the values arrived.
    assert '"device_id": "gw-0001"' in result.stdout
    assert '"zstd_level": 3' in result.stdout
    assert '"filter": "alarms/#"' in result.stdout


def sink_template(tmp_path: Path, pki: Pki) -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issuer_key = tmp_path / "issuer-k1.pem"
    issuer_key.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    text = uncomment((REPO / "cloud_sink/templates/sink.toml").read_text())
    for placeholder, real in {
        "/etc/cloud-sink/ca.pem": pki.ca_cert,
        "/etc/cloud-sink/server.pem": pki.server_cert,
        "/etc/cloud-sink/server.key": pki.server_key,
        "/etc/cloud-sink/crl.pem": pki.crl,
        "/etc/cloud-sink/issuer-k1.pem": issuer_key,
        "/var/lib/cloud-sink": tmp_path,
    }.items():
        assert placeholder in text
        text = text.replace(placeholder, str(real))
    return text


def test_sink_template_names_every_required_key(tmp_path: Path) -> None:
    result = run("cloud-sink", "--config", str(REPO / "cloud_sink/templates/sink.toml"),
                 "check-config")  # fmt: skip
    assert result.returncode == 2
    for key in ("listener.ca", "listener.cert", "listener.key", "auth.audience"):
        assert f"{key}: Field required" in result.stderr


@pytest.mark.parametrize("backend", ["sqlite", "amqp", "nats"])
def test_sink_template_with_its_settings_switched_on_passes_check_config(
    tmp_path: Path, pki: Pki, backend: str
) -> None:
    text = sink_template(tmp_path, pki)
    if backend != "sqlite":
        # An alternative core queue: its "##" lines replace the sqlite keys, as the template says.
        block = re.search(rf'^##type = "{backend}"\n(?:##.*\n)+', text, re.MULTILINE)
        assert block is not None
        sqlite = re.search(
            rf'^type = "sqlite"\npath = "{tmp_path}/core.db"\ndisk_reserve = .*\n',
            text,
            re.MULTILINE,
        )
        assert sqlite is not None
        text = text.replace(sqlite.group(0), block.group(0).replace("##", ""))
    path = tmp_path / "sink.toml"
    path.write_text(text)
    result = run("cloud-sink", "--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    assert f'"type": "{backend}"' in result.stdout
    assert '"audience": "sink.example.com"' in result.stdout
    assert '"port": 9883' in result.stdout
