"""Installing a wing as a systemd service: ``edge-agent install`` / ``cloud-sink install``.

What an install does, in order, each step printed as it happens:

1. the system user and group (``useradd --system``, no login shell, no home directory made);
2. the configuration directory ``/etc/<name>``, 0750 root:<name> (the service reads, never writes);
3. the state directory ``/var/lib/<name>``, 0700 <name>:<name> (systemd's ``StateDirectory=``
   makes it too; this is for a start outside systemd and for a clear ownership from day one);
4. the configuration template, 0640 root:<name>; an existing configuration is never replaced;
5. the unit file in ``/etc/systemd/system``, its ``ExecStart=`` pointing at the console script
   that runs the install (so a virtual environment in /opt works as is), then
   ``systemctl daemon-reload`` when systemd runs.

``root`` works like DESTDIR: every path is written below it, and what needs the real system
(useradd, chown, systemctl) is printed instead of done, so a packager or a test can run the
install without privileges. ``dry_run`` prints every step and does nothing.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TextIO

from mqtt_ingest.disk import fsync_directory, write_temporary

__all__ = [
    "InstallError",
    "ServiceLayout",
    "add_install_command",
    "find_executable",
    "install",
    "install_command",
    "render_unit",
]

# A binary under these is hidden from the service by ProtectHome=yes (203/EXEC at start).
HIDDEN_BY_PROTECT_HOME = (
    PurePosixPath("/home"),
    PurePosixPath("/root"),
    PurePosixPath("/run/user"),
)


class InstallError(Exception):
    """The install cannot go on (not root, useradd failed, ...); one line for the user."""


@dataclass(frozen=True)
class ServiceLayout:
    """Where one service lives. ``name`` is the unit, the user, the group and the directory
    name under /etc and /var/lib; the templates are ``<package>/templates/<config_name>`` and
    ``<package>/templates/<name>.service``."""

    name: str
    package: str
    config_name: str
    description: str

    @property
    def config_dir(self) -> PurePosixPath:
        return PurePosixPath("/etc") / self.name

    @property
    def config_path(self) -> PurePosixPath:
        return self.config_dir / self.config_name

    @property
    def state_dir(self) -> PurePosixPath:
        return PurePosixPath("/var/lib") / self.name

    @property
    def unit_name(self) -> str:
        return f"{self.name}.service"

    @property
    def unit_path(self) -> PurePosixPath:
        return PurePosixPath("/etc/systemd/system") / self.unit_name

    def template(self, file_name: str) -> bytes:
        return resources.files(self.package).joinpath("templates", file_name).read_bytes()


def add_install_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], layout: ServiceLayout
) -> None:
    """The ``install`` subcommand of ``layout``'s program (run it with `install_command`)."""
    parser = commands.add_parser(
        "install",
        help=f"install as a systemd service: user, {layout.config_dir}, unit file (needs root)",
        description=f"Create the {layout.name} system user, {layout.config_dir} (with a "
        f"configuration template, never overwriting one), {layout.state_dir} and "
        f"{layout.unit_path}, then run systemctl daemon-reload.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        help="install below DIR (like DESTDIR); useradd, chown and systemctl are printed, not run",
    )
    parser.add_argument("--dry-run", action="store_true", help="print every step, do nothing")
    parser.add_argument(
        "--executable",
        type=Path,
        metavar="PATH",
        help=f"the program ExecStart= runs (default: this {layout.name})",
    )


def install_command(args: argparse.Namespace, layout: ServiceLayout) -> int:
    """Run ``install`` as parsed by `add_install_command`; the exit status (1: failed)."""
    try:
        executable = args.executable or find_executable(layout.name)
        install(layout, executable=executable.absolute(), root=args.root, dry_run=args.dry_run)
    except (InstallError, OSError) as exc:
        sys.stderr.write(f"{layout.name} install: {exc}\n")
        return 1
    return 0


_UNIT_SPECIAL = "\"'\\%$;"
"""Characters systemd reads specially on an ExecStart= line (with white space)."""


def find_executable(name: str) -> Path:
    """Our console script ``name``: next to the running interpreter (a virtual environment),
    else on ``$PATH``. Raises `InstallError` when there is none."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise InstallError(f"cannot find the {name!r} program; pass --executable PATH")
    return Path(found).absolute()


def render_unit(text: str, executable: Path | str) -> str:
    """The unit file with the program of every ``ExecStart=`` replaced by ``executable``."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("ExecStart="):
            arguments = line.removeprefix("ExecStart=").split(maxsplit=1)[1:]
            line = f"ExecStart={executable} {''.join(arguments)}".rstrip() + "\n"
        lines.append(line)
    return "".join(lines)


def systemd_running() -> bool:
    """sd_booted(3): whether systemd is the init system of this machine."""
    return Path("/run/systemd/system").is_dir()


def install(
    layout: ServiceLayout,
    *,
    executable: Path,
    root: Path | None = None,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> None:
    """Install ``layout`` (see the module doc); raises `InstallError`."""
    _Installer(layout, executable, root, dry_run, out).run()


class _Installer:
    def __init__(
        self, layout: ServiceLayout, executable: Path, root: Path | None, dry_run: bool, out: TextIO
    ) -> None:
        self.layout = layout
        self.executable = executable
        self.root = root
        self.dry_run = dry_run
        self.out = out

    def run(self) -> None:
        layout = self.layout
        if self.root is None and not self.dry_run and os.geteuid() != 0:
            raise InstallError("installing a system service needs root (or --root DIR, --dry-run)")
        where = f" into {self.root}" if self.root is not None else ""
        self.say(f"installing {layout.unit_name}{where}" + (" (dry run)" if self.dry_run else ""))
        text = str(self.executable)
        if any(c.isspace() or c in _UNIT_SPECIAL for c in text):
            # systemd splits ExecStart= at spaces and expands % and $: the unit ran another
            # program, or none.
            raise InstallError(
                f"{text!r}: a path with white space, quotes, '\\', '%', '$' or ';' cannot be the"
                " unit's ExecStart=; install the package under a plain path (/opt/...)"
            )
        if self.root is None and not (self.executable.is_file() and os.access(text, os.X_OK)):
            raise InstallError(f"{text} is not an executable file; pass --executable PATH")
        if any(PurePosixPath(self.executable).is_relative_to(p) for p in HIDDEN_BY_PROTECT_HOME):
            self.say(
                f"WARNING: {self.executable} is below a home directory, which the unit hides "
                "(ProtectHome=yes): install the package in /opt or /usr/local instead"
            )
        unit_path = self.path(layout.unit_path)
        if unit_path.is_symlink():
            # `systemctl mask` links the unit to /dev/null: replaced by a file, the service was
            # unmasked without a word (and another link's target is the operator's, not ours).
            target = os.readlink(unit_path)
            if target == "/dev/null":
                raise InstallError(
                    f"{unit_path} is masked (a link to /dev/null): run `systemctl unmask"
                    f" {layout.unit_name}` first if it should run; nothing was changed"
                )
            raise InstallError(
                f"{unit_path} is a link to {target}, not a unit file: remove the link to install"
                " ours; nothing was changed"
            )
        self.user()
        self.directory(layout.config_dir, 0o750, "root", layout.name)
        self.directory(layout.state_dir, 0o700, layout.name, layout.name)
        self.new_file(layout.config_path, layout.template(layout.config_name), 0o640, layout.name)
        unit = render_unit(layout.template(layout.unit_name).decode(), self.executable)
        self.unit(layout.unit_path, unit.encode())
        self.systemctl("daemon-reload")
        self.next_steps()

    # -- steps ---------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def path(self, path: PurePosixPath) -> Path:
        return Path(self.root, *path.parts[1:]) if self.root is not None else Path(path)

    def command(self, argv: list[str], why: str) -> None:
        """Run ``argv`` on the real system, or print it (dry run, or --root)."""
        text = shlex.join(argv)
        if self.dry_run:
            self.say(f"would run: {text}")
            return
        if self.root is not None:
            self.say(f"skipped under --root ({why}): {text}")
            return
        self.say(f"run: {text}")
        # The argv is ours: fixed programs, names from the service layout.
        result = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise InstallError(f"{text} failed with status {result.returncode}: {detail}")

    def user(self) -> None:
        name = self.layout.name
        if self.root is None and _exists(pwd.getpwnam, name):
            self.say(f"user {name} exists")
            return
        group = ["--gid", name] if _exists(grp.getgrnam, name) else ["--user-group"]
        shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), None)
        self.command(
            [
                "useradd",
                "--system",
                *group,
                "--no-create-home",
                "--home-dir",
                str(self.layout.state_dir),
                "--shell",
                shell or "/bin/false",
                "--comment",
                self.layout.description,
                name,
            ],
            "the user belongs to the target system",
        )

    def directory(self, target: PurePosixPath, mode: int, owner: str, group: str) -> None:
        path = self.path(target)
        what = f"{path} {mode:04o} {owner}:{group}"
        if self.dry_run:
            self.say(f"would make directory {what}")
            return
        existed = path.is_dir()
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        path.chmod(mode)
        self.say(f"directory {what}" + (" (existed; mode set)" if existed else ""))
        self.chown(path, owner, group)

    def chown(self, path: Path, owner: str, group: str) -> None:
        if self.root is not None:
            self.say(f"skipped under --root (owners belong to the target system): chown {owner}:"
                     f"{group} {path}")  # fmt: skip
            return
        shutil.chown(path, owner, group)

    def new_file(self, target: PurePosixPath, data: bytes, mode: int, group: str) -> None:
        """Write ``target`` unless it exists: an operator's configuration is never replaced."""
        path = self.path(target)
        if path.exists():
            self.say(f"kept {path} (exists; the template is {self.layout.package}/templates/"
                     f"{self.layout.config_name})")  # fmt: skip
            return
        if self.dry_run:
            self.say(f"would write {path} {mode:04o} root:{group} from the template")
            return
        temporary = write_temporary(path, data, mode)
        try:
            # link(2) fails if the name exists: no window in which a config made meanwhile is lost.
            os.link(temporary, path)
        except FileExistsError:
            self.say(f"kept {path} (appeared meanwhile)")
            return
        finally:
            temporary.unlink()
        fsync_directory(path.parent)
        self.say(f"wrote {path} {mode:04o} root:{group} (edit it: every key is explained)")
        self.chown(path, "root", group)

    def unit(self, target: PurePosixPath, data: bytes) -> None:
        """Write the unit file; an older one (an earlier version of ours) is replaced. Local
        changes belong in a drop-in (``systemctl edit``), which this never touches."""
        path = self.path(target)
        old = path.read_bytes() if path.exists() else None
        if old == data:
            self.say(f"{path} is up to date (ExecStart={self.executable})")
            return
        verb = "replace" if old is not None else "write"
        if self.dry_run:
            self.say(f"would {verb} {path} 0644 (ExecStart={self.executable})")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = write_temporary(path, data, 0o644)
        os.replace(temporary, path)
        fsync_directory(path.parent)
        self.say(
            f"{'replaced' if old is not None else 'wrote'} {path} (ExecStart={self.executable})"
        )

    def systemctl(self, *arguments: str) -> None:
        argv = ["systemctl", *arguments]
        if self.root is None and not self.dry_run and not systemd_running():
            self.say(f"skipped (systemd is not running here): {' '.join(argv)}")
            return
        self.command(argv, "systemd runs on the target system")

    def next_steps(self) -> None:
        layout = self.layout
        name = layout.name
        self.say(
            f"""
next steps:
  1. edit {layout.config_path} (the REQUIRED keys are commented out until you set them) and
     put the certificates and keys it names in {layout.config_dir}, readable by the service:
     install -m 0640 -o root -g {name} FILE {layout.config_dir}/
  2. check it as the service will run it:
     sudo -u {name} {self.executable} --config {layout.config_path} check-config
  3. start it now and at every boot:   systemctl enable --now {name}
     see how it is doing:              systemctl status {name}; journalctl -u {name} -f
     reload certificates and policy:   systemctl reload {name}
     local changes to the unit:        systemctl edit {name} (a drop-in; reinstalls keep it)"""
        )


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
