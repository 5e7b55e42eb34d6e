"""Shared fixtures: the DNS test server plugin and a running yuubin on loopback."""

pytest_plugins = ["tests.dnsfixtures", "tests.serverfixtures"]
