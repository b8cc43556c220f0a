"""``cloud-sink``: the command line of this package.

Only ``--help`` works today; the commands arrive with their issues (see README.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cloud-sink",
        description=(
            "The cloud sink (mutual-TLS MQTT with certificate-bound JWTs into the core queue). "
            "Not implemented yet: only --help works in this release."
        ),
    )
    parser.parse_args(argv)
    print(
        "cloud-sink: no command is implemented yet; see README.md for the status.", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
