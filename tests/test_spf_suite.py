"""The RFC 7208 test suite (tests/data/rfc7208-tests.yml, from pyspf's sdist) against yuubin's
SPF evaluator, with a fixed-answer DnsLookup built from each scenario's zonedata — the suite's
own model: SPF-type records double as TXT when a name has no TXT, "TIMEOUT" makes queries of a
name (or of one type) time out, an unknown name is NXDOMAIN, a known name without the type is
NODATA, names under "error." time out, a CNAME is followed once.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from yuubin.dns import LookupResult
from yuubin.mailauth.spf import check_host

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"

# Cases whose expectations our answer meets in a way the plain comparison cannot see, with why.
# (Cases that list several acceptable results are accepted by the comparison itself.)
KNOWN: dict[str, str] = {}
# Explanations compared without regard to case, with why.
CASELESS_EXPLANATION = {
    "v-macro-ip6": "the suite writes %{ir}'s nibbles in the case of its input address (CAFE:BABE::1); "
                   "RFC 7208 7.4's own example has lowercase nibbles, as we give",
}


class ZoneLookup:
    """The suite's zone as a DnsLookup."""

    def __init__(self, zonedata: dict[str, list[Any]]):
        self.zone: dict[str, list[tuple[str, Any]]] = {}
        for name, rrs in zonedata.items():
            entries: list[tuple[str, Any]] = []
            has_txt = any(isinstance(rr, dict) and "TXT" in rr for rr in rrs)
            generated: list[tuple[str, Any]] = []
            for rr in rrs:
                if rr == "TIMEOUT":
                    entries.append(("TIMEOUT", None))
                    continue
                for rtype, value in rr.items():
                    if rtype in ("TXT", "SPF") and isinstance(value, str):
                        value = [value]
                    if value == ["NONE"]:
                        continue
                    entries.append((rtype, value))
                    if rtype == "SPF" and not has_txt:
                        generated.append(("TXT", value))
            self.zone[name.lower().rstrip(".")] = entries + generated
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.queries.append((name, rdtype))
        return self._answer(name.lower().rstrip("."), rdtype, follow=True)

    def _answer(self, name: str, rdtype: str, follow: bool) -> LookupResult:
        if any(len(label) > 63 for label in name.split(".")):
            return LookupResult("servfail")
        entries = self.zone.get(name)
        if entries is None:
            if name.startswith("error."):
                return LookupResult("timeout")
            return LookupResult("nxdomain")
        out: list[str] = []
        seen_type = False
        for rtype, value in entries:
            if rtype == "TIMEOUT":
                if not seen_type:
                    return LookupResult("timeout")
                break
            if value == "TIMEOUT":
                if rtype == rdtype:
                    return LookupResult("timeout")
                continue
            if rtype == "CNAME" and follow and rdtype != "CNAME":
                target = self._answer(str(value).lower().rstrip("."), rdtype, follow=False)
                if target.status == "ok":
                    out.extend(target.records)
                    seen_type = True
                elif target.status in ("timeout", "servfail"):
                    return target
                continue
            if rtype != rdtype:
                continue
            seen_type = True
            out.append(_text(rtype, value))
        if out:
            return LookupResult("ok", tuple(out), 300)
        return LookupResult("nodata")


def _text(rtype: str, value: Any) -> str:
    if rtype in ("TXT", "SPF"):
        return "".join(value)
    if rtype == "MX":
        prio, host = value
        return f"{prio} {host}."
    if rtype in ("PTR", "CNAME"):
        return f"{value}."
    return str(value)


def _cases() -> list[Any]:
    out = []
    for scenario in yaml.safe_load_all(SUITE.read_text(encoding="utf-8")):
        for name, case in scenario["tests"].items():
            out.append(pytest.param(scenario["zonedata"], case, id=name))
    return out


@pytest.mark.parametrize(("zonedata", "case"), _cases())
async def test_rfc7208_case(zonedata: dict[str, Any], case: dict[str, Any], request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.id
    if name in KNOWN:
        pytest.skip(KNOWN[name])
    lookup = ZoneLookup(zonedata)
    mailfrom = case["mailfrom"]
    helo = case["helo"]
    if mailfrom:
        domain = mailfrom.rpartition("@")[2]
        sender = mailfrom
        identity = "mailfrom"
    else:
        domain, sender, identity = helo, f"postmaster@{helo}", "helo"
    got = await check_host(ipaddress.ip_address(case["host"]), domain, sender, lookup, helo=helo,
                           receiver="receiver.example", identity=identity)
    expected = case["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    assert got.result in allowed, f"{name}: got {got.result} ({got.reason}), expected {expected}"
    want_exp = case.get("explanation")
    if want_exp is not None and got.result == "fail" and want_exp != "DEFAULT":
        if name in CASELESS_EXPLANATION:
            assert got.explanation.lower() == want_exp.lower(), f"{name}: explanation {got.explanation!r}"
        else:
            assert got.explanation == want_exp, f"{name}: explanation {got.explanation!r}"


async def test_an_smtputf8_domain_is_checked_by_its_a_labels():
    lookup = ZoneLookup({"xn--bcher-kva.example": [{"TXT": "v=spf1 ip4:192.0.2.1 -all"}]})
    got = await check_host(ipaddress.ip_address("192.0.2.1"), "bücher.example", "anna@bücher.example", lookup)
    assert got.result == "pass" and got.domain == "xn--bcher-kva.example"
    assert lookup.queries == [("xn--bcher-kva.example", "TXT")]


async def test_the_null_sender_is_checked_by_its_helo_name():
    from yuubin.mailauth.spf import check_sender

    lookup = ZoneLookup({"mta.example": [{"TXT": "v=spf1 -all"}]})
    got = await check_sender(ipaddress.ip_address("192.0.2.1"), None, "mta.example", lookup)
    assert (got.result, got.identity, got.domain) == ("fail", "helo", "mta.example")
