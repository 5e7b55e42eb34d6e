"""DNSBL checks against a real DNS server on loopback: listings, error codes and failures."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest

from tests.dnsserver import TestDNSServer
from yuubin.dns import Resolver
from yuubin.policy.dnsbl import DnsblChecker, Listing, reverse_name

CLIENT = ipaddress.IPv4Address("192.0.2.99")
LOGGER = "yuubin.policy.dnsbl"


class FakeClock:
    """A monotonic clock the test moves by hand, for the hourly warning limit."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listed(server: TestDNSServer, ip: object, zone: str, *codes: str) -> None:
    for code in codes:
        server.add(reverse_name(str(ip), zone), "A", code)


def messages(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and f"event={event} " in r.getMessage()]


def test_reverse_name_ipv4() -> None:
    assert reverse_name(ipaddress.IPv4Address("1.2.3.4"), "zen.example") == "4.3.2.1.zen.example"
    assert reverse_name("192.0.2.99", "zen.example.") == "99.2.0.192.zen.example"


def test_reverse_name_ipv6_nibbles() -> None:
    expected = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"
    assert reverse_name(ipaddress.IPv6Address("2001:db8::1"), "bl.example") == expected


@pytest.mark.asyncio
async def test_listed_client(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    listed(dns_server, CLIENT, "zen.test", "127.0.0.2")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    assert await checker.check(CLIENT, session="s1") == Listing("zen.test", ("127.0.0.2",))
    [record] = messages(caplog, "dnsbl_listed")
    assert record.getMessage() == (
        "event=dnsbl_listed session=s1 client=192.0.2.99 zone=zen.test codes=127.0.0.2"
    )


@pytest.mark.asyncio
async def test_clean_client(dns_server: TestDNSServer, resolver: Resolver) -> None:
    listed(dns_server, "192.0.2.1", "zen.test", "127.0.0.2")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    assert await checker.check(CLIENT) is None
    assert sorted(dns_server.queries) == [
        ("99.2.0.192.bl.test", "A"),
        ("99.2.0.192.zen.test", "A"),
    ]


@pytest.mark.asyncio
async def test_all_codes_reported(dns_server: TestDNSServer, resolver: Resolver) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.0.0.4", "127.0.0.2")
    listing = await DnsblChecker(resolver, ["zen.test"]).check(CLIENT)
    assert listing == Listing("zen.test", ("127.0.0.2", "127.0.0.4"))


@pytest.mark.asyncio
async def test_first_zone_in_configured_order_wins(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.0.0.2")
    listed(dns_server, CLIENT, "bl.test", "127.0.0.3")
    assert (await DnsblChecker(resolver, ["bl.test", "zen.test"]).check(CLIENT)).zone == "bl.test"
    assert (await DnsblChecker(resolver, ["zen.test", "bl.test"]).check(CLIENT)).zone == "zen.test"


@pytest.mark.asyncio
async def test_listing_in_later_zone(dns_server: TestDNSServer, resolver: Resolver) -> None:
    listed(dns_server, CLIENT, "bl.test", "127.0.0.2")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    assert await checker.check(CLIENT) == Listing("bl.test", ("127.0.0.2",))


@pytest.mark.asyncio
async def test_zone_names_are_normalised(dns_server: TestDNSServer, resolver: Resolver) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.0.0.2")
    checker = DnsblChecker(resolver, [" Zen.Test. ", ""])
    assert checker.zones == ("zen.test",)
    assert (await checker.check(CLIENT)).zone == "zen.test"


@pytest.mark.asyncio
async def test_no_zones(dns_server: TestDNSServer, resolver: Resolver) -> None:
    assert await DnsblChecker(resolver, []).check(CLIENT) is None
    assert dns_server.queries == []


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("127.255.255.254", "public/open resolver"),
        ("127.255.255.255", "query volume exceeded"),
        ("127.255.255.252", "typo"),
        ("127.255.255.250", "error code"),
    ],
)
@pytest.mark.asyncio
async def test_error_code_is_not_a_listing(
    dns_server: TestDNSServer,
    resolver: Resolver,
    caplog: pytest.LogCaptureFixture,
    code: str,
    cause: str,
) -> None:
    listed(dns_server, CLIENT, "zen.test", code)
    checker = DnsblChecker(resolver, ["zen.test"], clock=FakeClock())
    assert await checker.check(CLIENT) is None
    [record] = messages(caplog, "dnsbl_error")
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"event=dnsbl_error zone=zen.test code={code} cause=\"")
    assert cause in record.getMessage()


@pytest.mark.asyncio
async def test_error_code_warns_once_per_zone_per_hour(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"], clock=clock)
    for i in range(1, 21):
        listed(dns_server, f"192.0.2.{i}", "zen.test", "127.255.255.254")
    for i in range(1, 11):
        assert await checker.check(ipaddress.IPv4Address(f"192.0.2.{i}")) is None
        clock.now += 60
    assert len(messages(caplog, "dnsbl_error")) == 1
    assert "use a local recursive resolver ([dns].nameservers)" in caplog.text

    clock.now = 1000.0 + 3599  # still within the hour of the first warning
    assert await checker.check(ipaddress.IPv4Address("192.0.2.11")) is None
    assert len(messages(caplog, "dnsbl_error")) == 1

    clock.now = 1000.0 + 3600
    for i in range(12, 21):
        assert await checker.check(ipaddress.IPv4Address(f"192.0.2.{i}")) is None
    assert len(messages(caplog, "dnsbl_error")) == 2


@pytest.mark.asyncio
async def test_error_warnings_are_per_zone(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.255.255.254")
    listed(dns_server, CLIENT, "bl.test", "127.255.255.255")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"], clock=FakeClock())
    assert await checker.check(CLIENT) is None
    zones = sorted(r.getMessage().split()[1] for r in messages(caplog, "dnsbl_error"))
    assert zones == ["zone=bl.test", "zone=zen.test"]


@pytest.mark.asyncio
async def test_answer_outside_loopback_is_not_a_listing(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    listed(dns_server, CLIENT, "junk.test", "192.0.2.200")
    checker = DnsblChecker(resolver, ["junk.test"], clock=FakeClock())
    assert await checker.check(CLIENT) is None
    [record] = messages(caplog, "dnsbl_error")
    assert "code=192.0.2.200" in record.getMessage()


@pytest.mark.asyncio
async def test_timeout_in_one_zone_does_not_hide_listing_in_another(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dns_server.set_behaviour(reverse_name(CLIENT, "zen.test"), "timeout")
    listed(dns_server, CLIENT, "bl.test", "127.0.0.2")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    start = time.monotonic()
    assert await checker.check(CLIENT, session="s7") == Listing("bl.test", ("127.0.0.2",))
    assert time.monotonic() - start < resolver.timeout + 0.3
    [skip] = messages(caplog, "dnsbl_skip")
    assert skip.getMessage().startswith("event=dnsbl_skip zone=zen.test status=timeout session=s7")


@pytest.mark.asyncio
async def test_all_zones_timing_out_is_not_a_listing(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for zone in ("zen.test", "bl.test"):
        dns_server.set_behaviour(reverse_name(CLIENT, zone), "timeout")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    start = time.monotonic()
    assert await checker.check(CLIENT) is None
    assert time.monotonic() - start < resolver.timeout + 0.3  # concurrent, not one after another
    assert len(messages(caplog, "dnsbl_skip")) == 2


@pytest.mark.asyncio
async def test_servfail_zone_is_skipped(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dns_server.set_behaviour(reverse_name(CLIENT, "zen.test"), "servfail")
    assert await DnsblChecker(resolver, ["zen.test"]).check(CLIENT) is None
    [skip] = messages(caplog, "dnsbl_skip")
    assert "status=servfail" in skip.getMessage()


@pytest.mark.asyncio
async def test_zones_are_queried_concurrently(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    for zone in ("a.test", "b.test", "c.test"):
        listed(dns_server, CLIENT, zone, "127.0.0.2")
        dns_server.set_behaviour(reverse_name(CLIENT, zone), "delay:0.3")
    checker = DnsblChecker(resolver, ["a.test", "b.test", "c.test"])
    start = time.monotonic()
    assert (await checker.check(CLIENT)).zone == "a.test"
    assert time.monotonic() - start < 0.6  # sequential would take 0.9 s


@pytest.mark.asyncio
async def test_ipv6_client_uses_nibble_name(dns_server: TestDNSServer, resolver: Resolver) -> None:
    client = ipaddress.IPv6Address("2001:db8::1")
    name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test"
    dns_server.add(name, "A", "127.0.0.2")
    assert await DnsblChecker(resolver, ["zen.test"]).check(client) == Listing(
        "zen.test", ("127.0.0.2",)
    )
    assert dns_server.queries == [(name, "A")]


@pytest.mark.asyncio
async def test_ipv4_mapped_client_is_checked_as_ipv4(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.0.0.2")
    mapped = ipaddress.IPv6Address(f"::ffff:{CLIENT}")
    assert (await DnsblChecker(resolver, ["zen.test"]).check(mapped)).zone == "zen.test"


@pytest.mark.asyncio
async def test_answers_are_cached(dns_server: TestDNSServer, resolver: Resolver) -> None:
    listed(dns_server, CLIENT, "zen.test", "127.0.0.2")
    checker = DnsblChecker(resolver, ["zen.test", "bl.test"])
    for _ in range(3):
        assert (await checker.check(CLIENT)).zone == "zen.test"
    assert len(dns_server.queries) == 2  # one per zone: the listing and the NXDOMAIN
