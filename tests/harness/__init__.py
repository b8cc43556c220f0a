"""The test harness (RELIABILITY.md "Harness"): PKI, processes, brokers, chaos proxy, checkers.

Each module defines its pytest fixtures next to the helpers they wrap; ``tests/conftest.py`` loads
them all as plugins.
"""
