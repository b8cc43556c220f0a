#!/usr/bin/env bash
# The demo command (README.md): a PKI made with bridge-certs, a cloud sink on the embedded sqlite
# core queue, an edge agent, simulated sensors, an uplink outage, the drain, and the count of what
# reached the core queue. Everything runs in a temporary directory; nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "demo: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
echo "demo: installing the package"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python scripts/demo.py "$@"
