"""Hostile input never breaks the inbound checks: any SPF record text gives one of the RFC 7208
results (never an exception), any DMARC record text parses or is refused, any header section
gives From: domains or None, any Authentication-Results field gives an authserv-id."""

from __future__ import annotations

import asyncio
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from yuubin.dns import LookupResult
from yuubin.mailauth.dmarc import from_domains, parse_record
from yuubin.mailauth.results import authserv_of
from yuubin.mailauth.spf import check_host

RESULTS = {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"}
TERMS = ["a", "mx", "ptr", "all", "include:", "exists:", "ip4:", "ip6:", "redirect=", "exp=", "%{", "%{i}",
         "%{ir}", "%{d2}", "%{l-}", "%%", "%_", "%-", "/", "//", "24", "64", "0", "33", "129", "192.0.2.1",
         "2001:db8::1", "example.org", "loop.example", ".", ":", "-", "+", "~", "?", "=", " ", "  ", "\u00e9"]


class Zone:
    """Every name answers: its TXT is the record under test (so include:/redirect= loop back into
    it), A/AAAA/PTR exist, and MX has more names than SPF allows."""

    def __init__(self, record: str):
        self.record = record

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        if rdtype == "TXT":
            return LookupResult("ok", (self.record, "an unrelated TXT record"), 60)
        if rdtype == "A":
            return LookupResult("ok", ("192.0.2.1",), 60)
        if rdtype == "AAAA":
            return LookupResult("ok", ("2001:db8::1",), 60)
        if rdtype == "MX":
            return LookupResult("ok", tuple(f"{i} mx{i}.example." for i in range(12)), 60)
        if rdtype == "PTR":
            return LookupResult("ok", ("host.example.org.",), 60)
        return LookupResult("nodata")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TERMS), max_size=12), st.sampled_from(["192.0.2.1", "2001:db8::1", "198.51.100.7"]))
def test_any_spf_record_gives_a_result(parts, ip):
    record = "v=spf1 " + "".join(parts)
    got = asyncio.run(check_host(ipaddress.ip_address(ip), "example.org", "a@example.org", Zone(record)))
    assert got.result in RESULTS


async def test_the_property_zone_evaluates_real_records():
    """The zone above lets records evaluate (not everything ends in permerror)."""
    async def result(record: str, ip: str) -> str:
        return (await check_host(ipaddress.ip_address(ip), "example.org", "a@example.org", Zone(record))).result

    assert await result("v=spf1 a -all", "192.0.2.1") == "pass"
    assert await result("v=spf1 a -all", "198.51.100.7") == "fail"
    assert await result("v=spf1 ?ptr", "2001:db8::1") == "neutral"
    assert await result("v=spf1 mx", "192.0.2.1") == "permerror"  # 12 MX names: over the limit
    assert await result("v=spf1 include:loop.example", "198.51.100.7") == "permerror"  # a loop


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_dmarc_record_text_parses_or_is_refused(text):
    for candidate in (text, "v=DMARC1;" + text):
        r = parse_record("example.org", candidate)
        assert r is None or r.p in ("none", "quarantine", "reject")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_header_section_gives_domains_or_none(head):
    out = from_domains(b"From: " + head + b"\r\n\r\nbody")
    assert out is None or all(d and d.isascii() for d in out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_authentication_results_field_gives_an_authserv_id(value):
    assert isinstance(authserv_of(b"Authentication-Results:" + value), str)
