#!/usr/bin/env bash
# The test command (README.md): a virtual environment in .venv, the package with its test extras,
# the checks (ruff, ruff format, mypy --strict), then the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "test: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
echo "test: installing the package and its test extras"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,amqp,nats]'

echo "test: ruff check"
.venv/bin/ruff check .
echo "test: ruff format --check"
.venv/bin/ruff format --check .
echo "test: mypy --strict"
.venv/bin/mypy

bash scripts/services.sh check

echo "test: pytest"
# pytest exits 5 when it collected nothing: set -e makes that a failure too.
.venv/bin/python -m pytest "$@"
