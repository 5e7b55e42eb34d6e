"""pytest plugin with the DNS fixtures: list it as ``pytest_plugins = ["tests.dnsfixtures"]``.

A fresh server per test keeps ``queries`` and the resolver cache independent between tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dnsserver import TestDNSServer
from yuubin.dns import Resolver

__all__ = ["dns_server", "resolver"]


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    """A started TestDNSServer on 127.0.0.1 (UDP and TCP, free port); stopped afterwards."""
    with TestDNSServer() as server:
        yield server


@pytest.fixture
def resolver(dns_server: TestDNSServer) -> Resolver:
    """A yuubin Resolver asking only ``dns_server``, with a short timeout to keep tests fast."""
    return Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.5)
