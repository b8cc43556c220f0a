"""Loads the harness fixtures for every test (see tests/harness/)."""

import pytest
from hypothesis import settings

# Asserts in every harness module say what they compared when they fail (pytest rewrites only
# test modules and plugins by itself); before anything imports them.
pytest.register_assert_rewrite("tests.harness")

pytest_plugins = [
    "tests.harness.process",  # before the plugins that import it (assertion rewriting)
    "tests.harness.pki",
    "tests.harness.mosquitto",
    "tests.harness.brokers",
    "tests.harness.chaos",
    "tests.harness.stages",
]

# No per-example deadline: on a loaded 2-core machine an example that usually takes 1 ms can take
# over hypothesis's default 200 ms, which fails the test for no fault of the code.
settings.register_profile("bridge", deadline=None)
settings.load_profile("bridge")
