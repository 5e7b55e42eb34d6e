"""Shared fixtures: the test harness (tests/harness.py) as a pytest plugin."""

pytest_plugins = ["tests.harness"]
