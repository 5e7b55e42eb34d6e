"""yuubin.dns.Resolver against a real DNS server on loopback: statuses, bounds and caching."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from tests.dnsserver import TestDNSServer
from yuubin.dns import LookupResult, Resolver


@pytest.mark.asyncio
async def test_a_records(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    dns_server.add("host.example.test", "A", "192.0.2.2")
    result = await resolver.lookup("host.example.test", "A")
    assert result.status == "ok"
    assert sorted(result.records) == ["192.0.2.1", "192.0.2.2"]
    assert 290 <= result.ttl <= 300


@pytest.mark.asyncio
async def test_aaaa_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "AAAA", "2001:db8::1")
    result = await resolver.lookup("host.example.test", "AAAA")
    assert result == LookupResult("ok", ("2001:db8::1",), result.ttl)


@pytest.mark.asyncio
async def test_mx_record_text_form(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "10 mx1.example.test.")
    dns_server.add("example.test", "MX", "20 mx2.example.test.")
    result = await resolver.lookup("example.test", "MX")
    assert result.status == "ok"
    assert sorted(result.records) == ["10 mx1.example.test.", "20 mx2.example.test."]


@pytest.mark.asyncio
async def test_txt_strings_are_joined_and_decoded(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    long_value = "v=DKIM1; k=rsa; p=" + "A" * 400  # more than one 255-byte string
    dns_server.add("sel._domainkey.example.test", "TXT", long_value)
    dns_server.add("example.test", "TXT", "v=spf1 -all")
    assert (await resolver.lookup("sel._domainkey.example.test", "TXT")).records == (long_value,)
    assert (await resolver.lookup("example.test", "TXT")).records == ("v=spf1 -all",)


@pytest.mark.asyncio
async def test_ptr_and_cname(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("1.2.0.192.in-addr.arpa", "PTR", "host.example.test.")
    dns_server.add("alias.example.test", "CNAME", "host.example.test.")
    dns_server.add("host.example.test", "A", "192.0.2.1")
    assert (await resolver.lookup("1.2.0.192.in-addr.arpa", "PTR")).records == (
        "host.example.test.",
    )
    assert (await resolver.lookup("alias.example.test", "A")).records == ("192.0.2.1",)


@pytest.mark.asyncio
async def test_nxdomain_has_negative_ttl(resolver: Resolver) -> None:
    result = await resolver.lookup("missing.example.test", "A")
    assert result.status == "nxdomain"
    assert result.records == ()
    assert 50 <= result.ttl <= 60


@pytest.mark.asyncio
async def test_nodata(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    result = await resolver.lookup("host.example.test", "MX")
    assert result.status == "nodata"
    assert result.records == ()


@pytest.mark.asyncio
async def test_timeout_is_bounded(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_behaviour("slow.example.test", "timeout")
    start = time.monotonic()
    result = await resolver.lookup("slow.example.test", "A")
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert elapsed < resolver.timeout + 0.3


@pytest.mark.asyncio
async def test_short_timeout_is_bounded(dns_server: TestDNSServer) -> None:
    dns_server.set_behaviour("slow.example.test", "timeout")
    quick = Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.2)
    start = time.monotonic()
    assert (await quick.lookup("slow.example.test", "A")).status == "timeout"
    assert time.monotonic() - start < 0.2 + 0.3


@pytest.mark.parametrize("behaviour", ["servfail", "refused"])
@pytest.mark.asyncio
async def test_server_failures_are_servfail(
    dns_server: TestDNSServer, resolver: Resolver, behaviour: str
) -> None:
    dns_server.set_behaviour("broken.example.test", behaviour)
    assert await resolver.lookup("broken.example.test", "A") == LookupResult("servfail")


@pytest.mark.asyncio
async def test_nobody_listening_does_not_raise() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = Resolver(["127.0.0.1"], port=port, timeout=0.5)
    start = time.monotonic()
    result = await dead.lookup("host.example.test", "A")
    assert result.status in ("servfail", "timeout")
    assert time.monotonic() - start < 0.5 + 0.3


@pytest.mark.asyncio
async def test_invalid_name_does_not_raise(resolver: Resolver) -> None:
    assert (await resolver.lookup("a..b.example.test", "A")).status == "servfail"
    assert (await resolver.lookup("x" * 64 + ".example.test", "A")).status == "servfail"


@pytest.mark.asyncio
async def test_unknown_type_is_a_programming_error(resolver: Resolver) -> None:
    with pytest.raises(ValueError):
        await resolver.lookup("example.test", "NOSUCHTYPE")


@pytest.mark.asyncio
async def test_positive_answers_are_cached(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    first = await resolver.lookup("host.example.test", "A")
    second = await resolver.lookup("host.example.test", "A")
    assert first.records == second.records == ("192.0.2.1",)
    assert dns_server.queries == [("host.example.test", "A")]


@pytest.mark.asyncio
async def test_negative_answers_are_cached(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    for _ in range(3):
        assert (await resolver.lookup("missing.example.test", "A")).status == "nxdomain"
        assert (await resolver.lookup("host.example.test", "MX")).status == "nodata"
    assert dns_server.queries == [("missing.example.test", "A"), ("host.example.test", "MX")]


@pytest.mark.asyncio
async def test_cached_nxdomain_covers_other_types(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    assert (await resolver.lookup("missing.example.test", "A")).status == "nxdomain"
    assert (await resolver.lookup("missing.example.test", "TXT")).status == "nxdomain"
    assert dns_server.queries == [("missing.example.test", "A")]


@pytest.mark.asyncio
async def test_zero_ttl_is_not_cached(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("volatile.example.test", "A", "192.0.2.1", ttl=0)
    await resolver.lookup("volatile.example.test", "A")
    await resolver.lookup("volatile.example.test", "A")
    assert len(dns_server.queries) == 2


@pytest.mark.asyncio
async def test_failures_are_not_cached(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_behaviour("flaky.example.test", "servfail")
    assert (await resolver.lookup("flaky.example.test", "A")).status == "servfail"
    dns_server.clear()
    dns_server.add("flaky.example.test", "A", "192.0.2.1")
    assert (await resolver.lookup("flaky.example.test", "A")).status == "ok"


@pytest.mark.asyncio
async def test_concurrent_lookups(dns_server: TestDNSServer, resolver: Resolver) -> None:
    for i in range(10):
        dns_server.add(f"h{i}.example.test", "A", f"192.0.2.{i}")
    results = await asyncio.gather(
        *(resolver.lookup(f"h{i}.example.test", "A") for i in range(10))
    )
    assert [r.records for r in results] == [(f"192.0.2.{i}",) for i in range(10)]


@pytest.mark.asyncio
async def test_test_server_answers_over_tcp(dns_server: TestDNSServer) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    query = dns.message.make_query("host.example.test", "A")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", port=dns_server.port, timeout=2)
    assert response.rcode() == dns.rcode.NOERROR
    assert [rd.address for rd in response.answer[0]] == ["192.0.2.1"]


def test_system_resolver_is_used_without_nameservers() -> None:
    # No lookup: the system's nameservers are not on loopback.
    assert Resolver([]).timeout == 5.0


def test_port_applies_to_given_nameservers() -> None:
    assert Resolver(["127.0.0.1"], port=5353)._resolver.port == 5353


def _timeout_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "yuubin.dns" and r.getMessage().startswith("event=dns_timeout ")]


@pytest.mark.asyncio
async def test_a_silent_nameserver_is_named_and_warned_about_once(
    dns_server: TestDNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="yuubin.dns")
    now = [1000.0]
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.3, clock=lambda: now[0])
    endpoint = f"127.0.0.1:{dns_server.port}"
    for name in ("a.example.test", "b.example.test", "c.example.test"):
        dns_server.set_behaviour(name, "timeout")
        result = await resolver.lookup(name, "A")
        assert (result.status, result.silent) == ("timeout", (endpoint,))
    [warning] = _timeout_warnings(caplog)
    assert warning.startswith(f"event=dns_timeout nameserver={endpoint} timeout=0.3s "), warning
    assert "[dns].nameservers" in warning
    now[0] += 3601  # an hour later it is said again, once
    await resolver.lookup("a.example.test", "A")
    await resolver.lookup("b.example.test", "A")
    assert len(_timeout_warnings(caplog)) == 2
    dns_server.add("d.example.test", "A", "192.0.2.4")
    assert (await resolver.lookup("d.example.test", "A")).status == "ok"
    answering = [r.getMessage() for r in caplog.records if "event=dns_answering " in r.getMessage()]
    assert answering == [f"event=dns_answering nameserver={endpoint}"]

