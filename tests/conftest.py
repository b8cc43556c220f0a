"""Loads the harness fixtures for every test (see tests/harness/)."""

pytest_plugins = [
    "tests.harness.pki",
    "tests.harness.process",
    "tests.harness.mosquitto",
    "tests.harness.brokers",
    "tests.harness.chaos",
    "tests.harness.stages",
]
