"""DMARC (RFC 9989) driven directly: record parsing, the DNS tree walk, organizational domains,
relaxed/strict alignment, p/sp/np, psd=, t=, several or no From: addresses. DNS is a fixed
zone; the queries it saw show which names a walk asked."""

from __future__ import annotations

import pytest

from yuubin.dns import LookupResult
from yuubin.mailauth.dmarc import evaluate, from_domains, parse_record


class Zone:
    def __init__(self, records: dict[tuple[str, str], list[str]], *, fail: frozenset[str] = frozenset()):
        self.records = records
        self.fail = fail
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.queries.append((name, rdtype))
        if name in self.fail:
            return LookupResult("timeout")
        found = self.records.get((name, rdtype))
        if found:
            return LookupResult("ok", tuple(found), 300)
        if any(n == name or n.endswith("." + name) for n, _ in self.records):
            return LookupResult("nodata")
        return LookupResult("nxdomain")


def dmarc(name: str, text: str) -> dict[tuple[str, str], list[str]]:
    return {(f"_dmarc.{name}", "TXT"): [text]}


def test_parse_record_tags_defaults_and_invalid_ones():
    r = parse_record("example.org", "v=DMARC1; p=reject; sp=quarantine; np=reject; adkim=s; t=y; psd=n; "
                                    "rua=mailto:d@example.org")
    assert r is not None
    assert (r.p, r.sp, r.np, r.adkim, r.aspf, r.testing, r.psd) == ("reject", "quarantine", "reject", "s", "r",
                                                                      True, "n")
    assert r.rua == ("mailto:d@example.org",)
    assert parse_record("x.org", "v=DMARC1; p=none") is not None
    assert parse_record("x.org", "p=reject; v=DMARC1") is None  # v= must come first
    assert parse_record("x.org", "v=DMARC2; p=reject") is None
    for text in ("v=DMARC1; p=bogus", "v=DMARC1; rua=mailto:a@x.org", "v=DMARC1; pct=50; junk; p=reject"):
        r = parse_record("x.org", text)  # no (valid) p: p=none; unknown and malformed tags ignored
        assert r is not None and r.p == ("reject" if "p=reject" in text else "none"), text
    assert parse_record("x.org", "v=DMARC1") is not None
    assert parse_record("x.org", "junk; v=DMARC1; p=reject") is None


async def test_aligned_spf_pass_passes():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    r = await evaluate(["example.org"], ("pass", "example.org"), [], zone)
    assert (r.result, r.spf_aligned, r.published) == ("pass", True, "reject")


async def test_unaligned_spf_pass_fails_under_p_reject():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    r = await evaluate(["example.org"], ("pass", "bulk-sender.example"), [], zone)
    assert (r.result, r.policy, r.published) == ("fail", "reject", "reject")


async def test_dkim_alignment_relaxed_and_strict():
    relaxed = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    r = await evaluate(["example.org"], None, [("pass", "mail.example.org")], relaxed)
    assert r.result == "pass" and r.dkim_aligned == ("mail.example.org",)
    strict = Zone(dmarc("example.org", "v=DMARC1; p=reject; adkim=s"))
    r = await evaluate(["example.org"], None, [("pass", "mail.example.org")], strict)
    assert r.result == "fail"
    r = await evaluate(["example.org"], None, [("pass", "example.org")], strict)
    assert r.result == "pass"
    r = await evaluate(["example.org"], None, [("fail", "example.org")], strict)
    assert r.result == "fail"


async def test_spf_strict_alignment():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=quarantine; aspf=s"))
    r = await evaluate(["example.org"], ("pass", "bounce.example.org"), [], zone)
    assert (r.result, r.policy) == ("fail", "quarantine")


async def test_a_sibling_subdomain_aligns_relaxed_through_the_organizational_domain():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    r = await evaluate(["news.example.org"], ("pass", "bounces.example.org"), [], zone)
    assert (r.result, r.org_domain) == ("pass", "example.org")


async def test_tree_walk_across_several_labels_finds_the_ancestor_and_applies_sp():
    zone = Zone({**dmarc("example.org", "v=DMARC1; p=none; sp=reject"),
                 ("a.b.c.example.org", "A"): ["192.0.2.1"]})
    r = await evaluate(["a.b.c.example.org"], ("pass", "elsewhere.example"), [], zone)
    assert (r.result, r.published, r.policy) == ("fail", "reject", "reject")
    asked = [n for n, t in zone.queries if t == "TXT"]
    assert asked[:4] == ["_dmarc.a.b.c.example.org", "_dmarc.b.c.example.org", "_dmarc.c.example.org",
                         "_dmarc.example.org"]


async def test_the_walk_of_a_long_name_jumps_to_seven_labels_and_asks_at_most_eight_names():
    zone = Zone({})
    name = "l1.l2.l3.l4.l5.l6.l7.l8.l9.example.org"
    r = await evaluate([name], None, [], zone)
    assert r.result == "none"
    asked = [n.removeprefix("_dmarc.") for n, t in zone.queries if t == "TXT"]
    assert asked[0] == name
    assert asked[1] == "l5.l6.l7.l8.l9.example.org"  # the last seven labels
    assert asked[-1] == "org" and len(asked) == 8


async def test_the_domains_own_record_uses_p_not_sp():
    zone = Zone(dmarc("sub.example.org", "v=DMARC1; p=quarantine; sp=reject"))
    r = await evaluate(["sub.example.org"], None, [], zone)
    assert (r.result, r.published) == ("fail", "quarantine")


async def test_np_applies_to_a_subdomain_that_does_not_exist():
    zone = Zone({**dmarc("example.org", "v=DMARC1; p=none; sp=quarantine; np=reject"),
                 ("www.example.org", "A"): ["192.0.2.1"]})
    missing = await evaluate(["nosuch.example.org"], None, [], zone)
    assert (missing.result, missing.published) == ("fail", "reject")
    existing = await evaluate(["www.example.org"], None, [], zone)
    assert (existing.result, existing.published) == ("fail", "quarantine")


async def test_sp_defaults_to_p_and_np_to_sp():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject; sp=quarantine"))
    r = await evaluate(["ghost.example.org"], None, [], zone)
    assert r.published == "quarantine"  # no np: sp
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    r = await evaluate(["ghost.example.org"], None, [], zone)
    assert r.published == "reject"  # no sp, no np: p


async def test_testing_mode_applies_one_step_less():
    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject; t=y"))
    r = await evaluate(["example.org"], None, [], zone)
    assert (r.result, r.published, r.policy) == ("fail", "reject", "quarantine")
    zone = Zone(dmarc("example.org", "v=DMARC1; p=quarantine; t=y"))
    r = await evaluate(["example.org"], None, [], zone)
    assert (r.published, r.policy) == ("quarantine", "none")


async def test_psd_y_makes_the_organizational_domain_one_label_below():
    # The PSD "gov.example" publishes for its registrants; "agency.gov.example" is an organization.
    zone = Zone(dmarc("gov.example", "v=DMARC1; p=reject; psd=y"))
    r = await evaluate(["mail.agency.gov.example"], ("pass", "agency.gov.example"), [], zone)
    assert (r.result, r.org_domain) == ("pass", "agency.gov.example")
    # A sibling registrant does not align with it.
    r = await evaluate(["other.gov.example"], ("pass", "agency.gov.example"), [], zone)
    assert r.result == "fail"


async def test_psd_n_stops_the_walk_at_its_domain():
    zone = Zone({**dmarc("dept.example.org", "v=DMARC1; p=reject; psd=n"),
                 **dmarc("example.org", "v=DMARC1; p=none")})
    r = await evaluate(["x.dept.example.org"], ("pass", "example.org"), [], zone)
    assert (r.result, r.org_domain) == ("fail", "dept.example.org")


async def test_no_record_is_none_and_our_own_domain_without_one_counts_as_reject():
    zone = Zone({})
    assert (await evaluate(["example.org"], ("fail", "example.org"), [], zone)).result == "none"
    r = await evaluate(["example.org"], ("fail", "example.org"), [], zone, own=["example.org"])
    assert (r.result, r.policy) == ("fail", "reject")
    r = await evaluate(["example.org"], ("pass", "example.org"), [], zone, own=["example.org"])
    assert r.result == "pass"


async def test_a_dns_failure_is_temperror():
    zone = Zone({}, fail=frozenset({"_dmarc.example.org"}))
    r = await evaluate(["example.org"], None, [], zone)
    assert r.result == "temperror"


async def test_two_records_at_one_name_count_as_none():
    zone = Zone({("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert (await evaluate(["example.org"], None, [], zone)).result == "none"


async def test_several_from_domains_the_strictest_outcome_counts():
    zone = Zone({**dmarc("good.example", "v=DMARC1; p=reject"), **dmarc("bad.example", "v=DMARC1; p=quarantine")})
    r = await evaluate(["good.example", "bad.example"], ("pass", "good.example"), [], zone)
    assert (r.result, r.from_domain, r.policy) == ("fail", "bad.example", "quarantine")


@pytest.mark.parametrize(("header", "expected"), [
    (b"From: Alice <alice@Example.ORG>\r\n", ["example.org"]),
    (b"From: a@one.example, b@two.example\r\n", ["one.example", "two.example"]),
    (b"From: a@one.example\r\nFrom: b@one.example\r\n", ["one.example"]),
    (b"Subject: none\r\n", None),
    (b"From: undisclosed\r\n", None),
    (b"From: a@nodot\r\n", None),
    ("From: anna@bücher.example\r\n".encode(), ["xn--bcher-kva.example"]),
])
def test_from_domains(header, expected):
    assert from_domains(header + b"\r\nbody\r\n") == expected


async def test_no_from_is_permerror():
    r = await evaluate(None, ("pass", "x.example"), [], Zone({}))
    assert r.result == "permerror"


async def test_psd_y_above_a_long_name_names_the_label_below_it_not_the_long_name():
    zone = Zone(dmarc("gov.example", "v=DMARC1; p=reject; psd=y"))
    long_name = "a.b.c.d.e.f.g.agency.gov.example"  # 10 labels: the walk jumps to the last seven
    r = await evaluate([long_name], ("pass", "agency.gov.example"), [], zone)
    assert (r.result, r.org_domain) == ("pass", "agency.gov.example")


async def test_exact_alignment_walks_no_further_and_a_prefetched_walk_is_not_asked_again():
    from yuubin.mailauth.dmarc import TreeWalk

    zone = Zone(dmarc("example.org", "v=DMARC1; p=reject"))
    walk = TreeWalk(zone)
    await walk.prefetch("example.org")
    r = await evaluate(["example.org"], ("pass", "example.org"), [("pass", "example.org")], zone, walk=walk)
    assert r.result == "pass"
    assert zone.queries == [("_dmarc.example.org", "TXT")]  # no organizational-domain walk needed


async def test_a_failed_name_is_waited_for_once_per_message():
    from yuubin.mailauth.dmarc import TreeWalk

    zone = Zone({}, fail=frozenset({"_dmarc.example.org"}))
    walk = TreeWalk(zone)
    await walk.prefetch("example.org")
    r = await evaluate(["example.org"], None, [], zone, walk=walk)
    assert r.result == "temperror" and zone.queries == [("_dmarc.example.org", "TXT")]
