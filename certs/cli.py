"""``bridge-certs``: the PKI tool's command line (SPEC §8).

Every error is one line on stderr, ``bridge-certs: error: ...``, with exit code 2, and nothing is
written when a command fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from certs import lock
from certs.crls import DEFAULT_CRL_DAYS
from certs.pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_DEVICE_DAYS,
    DEFAULT_SERVER_DAYS,
    CaMissing,
    CertificateAuthority,
    CertRecord,
    ExistsAfterSettling,
    Issued,
    KeyType,
    PkiError,
    format_serial,
    read_index,
)

__all__ = ["main", "parse_when"]

PROG = "bridge-certs"
EXIT_USAGE = 2
_RELATIVE = re.compile(r"^([+-])(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line (the default prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def parse_when(text: str) -> dt.datetime:
    """``now``, a relative offset (``-2d``, ``+30m``, ``+1.5h``) or an ISO 8601 date/time (UTC if
    no zone is given)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if text == "now":
        return now
    match = _RELATIVE.match(text)
    if match:
        sign, amount, unit = match.groups()
        try:
            delta = dt.timedelta(seconds=float(amount) * _UNIT_SECONDS[unit])
            return now + delta if sign == "+" else now - delta
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range") from None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'now', an offset like -2d/+30m or an ISO 8601 date"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not (days > 0 and math.isfinite(days)):
        raise argparse.ArgumentTypeError(f"{text!r}: the number of days must be positive")
    return days


def _add_validity(parser: argparse.ArgumentParser, default_days: float) -> None:
    parser.add_argument(
        "--days",
        type=_positive_days,
        default=default_days,
        help=f"validity in days (default {default_days:g}); fractions allowed",
    )
    parser.add_argument(
        "--not-before",
        type=parse_when,
        default=None,
        metavar="WHEN",
        help=(
            "start of validity: now, an offset (--not-before=-2d, +1h) or an ISO date "
            "(default: 5 minutes ago)"
        ),
    )


def _add_key_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-type",
        type=KeyType,
        choices=list(KeyType),
        default=KeyType.EC_P256,
        help="key algorithm (default ec-p256)",
    )


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cert", type=Path, help="certificate output path (default in the PKI dir)"
    )
    parser.add_argument("--key", type=Path, help="private key output path (default in the PKI dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A small PKI for the edge-to-cloud MQTT bridge.")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("BRIDGE_PKI_DIR", "pki")),
        help="PKI directory (default $BRIDGE_PKI_DIR or ./pki)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init-ca", help="create the CA (ca.pem, ca.key)")
    init.add_argument("--cn", default="Edge Bridge CA", help="CA common name")
    _add_key_type(init)
    _add_validity(init, DEFAULT_CA_DAYS)

    server = commands.add_parser("server", help="issue a TLS server certificate (cloud sink)")
    server.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    server.add_argument("--name", help="file name and CN (default: the first --dns or --ip)")
    _add_key_type(server)
    _add_validity(server, DEFAULT_SERVER_DAYS)
    _add_outputs(server)

    device = commands.add_parser("device", help="issue a device client certificate")
    device.add_argument("device_id", metavar="DEVICE_ID")
    _add_key_type(device)
    _add_validity(device, DEFAULT_DEVICE_DAYS)
    _add_outputs(device)

    revoke = commands.add_parser("revoke", help="revoke a device's certificates, or one serial")
    revoke.add_argument("target", metavar="DEVICE_ID|SERIAL")
    revoke.add_argument(
        "--days",
        type=_positive_days,
        help="the rewritten CRL's next update (default: as long as the CRL it replaces)",
    )

    crl = commands.add_parser("crl", help="write a fresh CRL")
    crl.add_argument(
        "--days",
        type=_positive_days,
        help=f"next update (default: as long as the CRL it replaces, else {DEFAULT_CRL_DAYS})",
    )
    crl.add_argument("--out", type=Path, help="output path (default crl.pem in the PKI dir)")

    listing = commands.add_parser("list", help="list issued certificates")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return parser


def _report_settled(settled: Sequence[CertRecord], removed: Sequence[Path]) -> None:
    for record in settled:  # an earlier run of this tool, killed part way
        done = (
            "it had finished: marked complete"
            if record.issuance == "complete"
            else "its key never reached its name: its leftover files removed, marked abandoned"
        )
        print(
            f"settled an interrupted issuance of {record.kind} {record.name} serial"
            f" {format_serial(record.serial)}: {done}"
        )
    for path in removed:
        print(f"removed {path}: a temporary file left by an interrupted write of a key")


def _report(issued: Issued) -> None:
    _report_settled(issued.settled, issued.removed)
    cert = issued.certificate
    print(
        f"wrote {issued.cert_path} and {issued.key_path} (mode 0600): "
        f"serial {format_serial(issued.serial)}, valid "
        f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
    )


def _list(directory: Path, records: Sequence[CertRecord], *, as_json: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    for record in records:
        row = {
            "serial": format_serial(record.serial),
            "kind": record.kind,
            "name": record.name,
            "status": record.status(now),
            "not_before": record.not_before,
            "not_after": record.not_after,
            "revoked_at": record.revoked_at,
            "cert": str(record.cert_file(directory)),
            "key": None if (key := record.key_file(directory)) is None else str(key),
        }
        if as_json:
            print(json.dumps(row))
        else:
            print(
                f"{row['serial']:<44} {record.kind:<7} {row['status']:<14} "
                f"{record.not_after[:19]}  {record.name}"
            )


def _issue(ca: CertificateAuthority, args: argparse.Namespace) -> Issued:
    if args.command == "server":
        return ca.issue_server(
            args.dns,
            args.ip,
            name=args.name,
            key_type=args.key_type,
            days=args.days,
            not_before=args.not_before,
            cert_path=args.cert,
            key_path=args.key,
        )
    return ca.issue_device(
        args.device_id,
        key_type=args.key_type,
        days=args.days,
        not_before=args.not_before,
        cert_path=args.cert,
        key_path=args.key,
    )


def _run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.command == "init-ca":
        ca = CertificateAuthority.create(
            directory,
            common_name=args.cn,
            key_type=args.key_type,
            days=args.days,
            not_before=args.not_before,
        )
        print(f"wrote {ca.cert_path} and {ca.key_path} (mode 0600)")
        return 0

    if args.command == "list":
        # The index alone: listing needs no CA private key (kept offline, or the owner's only).
        if not (directory / "ca.pem").is_file():
            raise CaMissing(directory)
        with lock.shared(directory):  # an issuance under way is seen whole, once finished
            records = read_index(directory)
        _list(directory, records, as_json=args.json)
        return 0
    ca = CertificateAuthority.open(directory)
    if args.command in ("server", "device"):
        try:
            issued = _issue(ca, args)
        except ExistsAfterSettling as exc:  # what it settled first is done all the same
            _report_settled(exc.settled, exc.removed)
            raise
        _report(issued)
    elif args.command == "revoke":
        for record in ca.revoke(args.target, crl_days=args.days):
            print(f"revoked {record.kind} {record.name} serial {format_serial(record.serial)}")
        print(f"wrote {ca.crl_path}")
    elif args.command == "crl":
        path = ca.write_crl(args.out, days=args.days)
        print(f"wrote {path}")
        if path != ca.crl_path and not lock.writable(directory):
            print(
                f"{PROG}: note: {directory} is read-only: this CRL's number is not recorded in"
                " crlnumber; it is the second it was made, so a later CRL numbers above it"
                " unless the clock goes back",
                file=sys.stderr,
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PkiError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""  # a write(2) names no file
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # what cryptography refuses and no check of ours foresaw
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
