"""RFC 5321 5.1 routing, driven with a resolver of fixed answers (no DNS server, no sockets).

The end-to-end outbound tests run the same router against the real resolver and the DNS server
on loopback; here every branch of the rule gets its own row.
"""

from __future__ import annotations

import pytest

from yuubin.delivery.remote import MxRouter
from yuubin.dns import LookupResult

OK = "ok"
SELF_IP = "192.0.2.25"


class FixedResolver:
    """A DnsLookup answering from a table keyed by (name, type); anything else is NXDOMAIN."""

    def __init__(self, table: dict[tuple[str, str], LookupResult]):
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.asked.append((name, rdtype))
        return self.table.get((name, rdtype), LookupResult("nxdomain"))


def r(*records: str) -> LookupResult:
    return LookupResult(OK, tuple(records), 300)


BASE = {
    ("a.example", "MX"): r("10 mx1.a.example.", "20 mx2.a.example."),
    ("mx1.a.example", "A"): r("198.51.100.1"),
    ("mx1.a.example", "AAAA"): LookupResult("nodata"),
    ("mx2.a.example", "A"): r("198.51.100.2"),
    ("mx2.a.example", "AAAA"): r("2001:db8::2"),
    ("implicit.example", "MX"): LookupResult("nodata"),
    ("implicit.example", "A"): r("198.51.100.3"),
    ("null.example", "MX"): r("0 ."),
    ("gone.example", "MX"): LookupResult("nxdomain"),
    ("slow.example", "MX"): LookupResult("timeout"),
    ("broken.example", "MX"): LookupResult("servfail"),
    ("noaddr.example", "MX"): r("10 nowhere.noaddr.example."),
    ("flaky.example", "MX"): r("10 mx.flaky.example."),
    ("mx.flaky.example", "A"): LookupResult("timeout"),
    ("ours.example", "MX"): r("10 mx.ours.example.", "20 backup.ours.example."),
    ("mx.ours.example", "A"): r(SELF_IP),
    ("backup.ours.example", "A"): r("198.51.100.9"),
    ("backupforus.example", "MX"): r("10 primary.backupforus.example.", "20 us.backupforus.example."),
    ("primary.backupforus.example", "A"): r("198.51.100.10"),
    ("us.backupforus.example", "A"): r(SELF_IP),
}


@pytest.mark.parametrize(("domain", "hosts", "error"), [
    ("a.example", [("mx1.a.example", ["198.51.100.1"]), ("mx2.a.example", ["198.51.100.2", "2001:db8::2"])],
     None),
    ("implicit.example", [("implicit.example", ["198.51.100.3"])], None),  # no MX: the domain itself
    ("null.example", None, ("failed", "5.1.10")),  # RFC 7505 null MX
    ("gone.example", None, ("failed", "5.1.2")),
    ("slow.example", None, ("deferred", "4.4.3")),  # DNS trouble is never a bounce
    ("broken.example", None, ("deferred", "4.4.3")),
    ("noaddr.example", None, ("failed", "5.4.4")),
    ("flaky.example", None, ("deferred", "4.4.3")),
    ("ours.example", None, ("failed", "5.4.6")),  # our own MX is the most preferred: a loop
    ("backupforus.example", [("primary.backupforus.example", ["198.51.100.10"])], None),  # only better MXs
    ("[198.51.100.7]", [("[198.51.100.7]", ["198.51.100.7"])], None),
    (f"[{SELF_IP}]", None, ("failed", "5.4.6")),
    ("[not-an-ip]", None, ("failed", "5.1.2")),
])
async def test_route(domain, hosts, error):
    router = MxRouter(FixedResolver(BASE), "mx.test.example", lambda ip: ip == SELF_IP)
    route = await router.route(domain)
    if error is None:
        assert route.error is None
        assert route.hosts == hosts
    else:
        assert route.error is not None
        assert (route.error.kind, route.error.status) == error


async def test_equal_preferences_are_all_used():
    table = {("eq.example", "MX"): r("10 a.eq.example.", "10 b.eq.example."),
             ("a.eq.example", "A"): r("198.51.100.21"), ("b.eq.example", "A"): r("198.51.100.22")}
    router = MxRouter(FixedResolver(table), "mx.test.example", lambda ip: False)
    route = await router.route("eq.example")
    assert sorted(h for h, _ in route.hosts) == ["a.eq.example", "b.eq.example"]
