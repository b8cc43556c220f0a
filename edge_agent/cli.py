"""``edge-agent``: the command line of this package.

Only ``--help`` works today; the commands arrive with their issues (see README.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=(
            "The edge agent (store-and-forward from a gateway to the cloud sink). "
            "Not implemented yet: only --help works in this release."
        ),
    )
    parser.parse_args(argv)
    print("edge-agent: no command is implemented yet; see README.md.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
