"""The mx's mail authentication check driven directly: SPF at MAIL, decisions at the message
stage by [mailauth], with a fixed DNS zone and small fakes of the DKIM/ARC verifiers (their
cryptography is tested in test_dkim_verify / test_arc_verify; end to end in
test_mailauth_inbound)."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import pytest

from yuubin.auth.accounts import Directory
from yuubin.config import MailauthConfig
from yuubin.dns import LookupResult
from yuubin.policy.mailauth import MailAuthCheck
from yuubin.policy.pipeline import SessionFacts, Transaction, Verdict
from yuubin.smtp.address import parse_path
from yuubin.store import Store

HOST = "mx.test.example"
CLIENT = "192.0.2.10"
ZONE = {
    ("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
    ("_dmarc.sender.example", "TXT"): ["v=DMARC1; p=reject"],
    ("soft.example", "TXT"): ["v=spf1 -all"],
    ("_dmarc.soft.example", "TXT"): ["v=DMARC1; p=quarantine"],
    ("_dmarc.testing.example", "TXT"): ["v=DMARC1; p=reject; t=y"],
}


class Zone:
    def __init__(self, records: dict[tuple[str, str], list[str]], timeout: frozenset[str] = frozenset()):
        self.records = records
        self.timeout = timeout
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.queries.append((name, rdtype))
        if name in self.timeout:
            return LookupResult("timeout")
        found = self.records.get((name, rdtype))
        return LookupResult("ok", tuple(found), 300) if found else LookupResult("nxdomain")


@dataclass(frozen=True)
class FakeDkim:
    result: str
    domain: str
    selector: str = "s1"
    algorithm: str = "rsa-sha256"
    reason: str = ""
    header_b: str = "abcdefghijkl"


@dataclass(frozen=True)
class FakeArc:
    result: str
    sealers: tuple[str, ...]
    reason: str = ""
    last_aar: str = ""


@pytest.fixture
def directory(tmp_path):
    store = Store(tmp_path / "state.db")
    yield Directory(store, ("example.test",), "postmaster@example.test")
    store.close()


def make(directory, zone=None, *, dkim=(), arc=None, **cfg) -> MailAuthCheck:
    async def verify_dkim(data: bytes):
        return list(dkim)

    async def verify_arc(data: bytes):
        return arc or FakeArc("none", ())

    return MailAuthCheck(Zone(zone or ZONE), directory, MailauthConfig(**cfg), HOST, verify_dkim=verify_dkim,
                         verify_arc=verify_arc, clock=lambda: 1_800_000_000.0)


def txn(sender: str, *, client: str = CLIENT, trusted: bool = False, auth: str | None = None) -> Transaction:
    facts = SessionFacts("s1", "mx", ipaddress.ip_address(client), trusted, helo="client.sender.example",
                         auth_user=auth)
    return Transaction(facts, parse_path(f"<{sender}>", smtputf8=False))


def message(from_: str, *, signed: bool = True) -> bytes:
    """A message; ``signed`` gives it the fields that make the check call the (fake) verifiers."""
    marks = "DKIM-Signature: v=1; d=fake\r\nARC-Seal: i=1; d=fake\r\n" if signed else ""
    return (f"{marks}From: {from_}\r\nAuthentication-Results: {HOST}; dmarc=pass\r\nSubject: x\r\n\r\n"
            "body\r\n").encode()


async def run(check: MailAuthCheck, sender: str, from_: str, **kw):
    t = txn(sender, **kw)
    mail = await check.mail(t, t.sender)
    if not mail.accepted:
        return t, mail
    return t, await check.message(t, message(from_))


async def test_spf_pass_aligned_delivers_with_one_header_and_the_results(directory, caplog):
    caplog.set_level(logging.INFO, logger="yuubin.mailauth")
    t, d = await run(make(directory), "bob@sender.example", "bob@sender.example")
    assert d.verdict is Verdict.ACCEPT
    assert t.results["spf"] == "pass"
    assert d.results["dmarc"] == "pass" and d.results["dmarc.domain"] == "sender.example"
    (header,) = d.headers
    assert header.startswith(b"Authentication-Results: mx.test.example;") and b"dmarc=pass" in header
    assert d.drop_header is not None
    assert d.drop_header("authentication-results", f"Authentication-Results: {HOST}; dmarc=pass\r\n".encode())
    (line,) = [r.getMessage() for r in caplog.records if "event=mailauth" in r.getMessage()]
    for part in ("spf=pass", "dkim=none", "dmarc=pass", "arc=none", "action=deliver", "header_from=sender.example"):
        assert part in line, line


async def test_dmarc_fail_under_p_reject_is_550(directory):
    _, d = await run(make(directory), "bob@sender.example", "bob@sender.example", client="198.51.100.1")
    assert d.verdict is Verdict.REJECT and d.reply is not None
    assert (d.reply.code, d.reply.status) == (550, "5.7.1")
    assert "DMARC policy of sender.example" in d.reply.text


@pytest.mark.parametrize(("setting", "verdict"), [("quarantine", Verdict.QUARANTINE), ("deliver", Verdict.ACCEPT)])
async def test_dmarc_reject_can_be_softened(directory, setting, verdict):
    _, d = await run(make(directory, dmarc_reject=setting), "bob@sender.example", "bob@sender.example",
                     client="198.51.100.1")
    assert d.verdict is verdict and d.results["dmarc"] == "fail"


async def test_p_quarantine_quarantines_unless_configured_to_deliver(directory):
    _, d = await run(make(directory), "x@soft.example", "x@soft.example")
    assert d.verdict is Verdict.QUARANTINE
    _, d = await run(make(directory, dmarc_quarantine="deliver"), "x@soft.example", "x@soft.example")
    assert d.verdict is Verdict.ACCEPT


async def test_testing_mode_quarantines_instead_of_rejecting(directory):
    _, d = await run(make(directory), "x@testing.example", "x@testing.example")
    assert d.verdict is Verdict.QUARANTINE


async def test_aligned_dkim_pass_saves_a_spf_fail(directory):
    check = make(directory, dkim=[FakeDkim("pass", "sender.example")])
    _, d = await run(check, "bob@sender.example", "bob@sender.example", client="198.51.100.1")
    assert d.verdict is Verdict.ACCEPT and d.results["dmarc"] == "pass"
    assert b"dkim=pass header.d=sender.example header.s=s1 header.b=abcdefghijkl" in d.headers[0]


async def test_our_own_domain_from_outside_is_rejected_even_without_a_record(directory):
    _, d = await run(make(directory), "bob@sender.example", "ceo@example.test")
    assert d.verdict is Verdict.REJECT and d.reply is not None and d.reply.code == 550
    assert "our domain example.test" in d.reply.text
    # Even when the admin chose to deliver DMARC failures, and even through a trusted sealer.
    check = make(directory, dmarc_reject="deliver", trusted_arc_sealers=("lists.example",),
                 arc=FakeArc("pass", ("lists.example",)))
    _, d = await run(check, "bob@sender.example", "ceo@example.test")
    assert d.verdict is Verdict.REJECT


async def test_a_trusted_arc_sealer_overrides_a_dmarc_fail(directory, caplog):
    caplog.set_level(logging.INFO, logger="yuubin.mailauth")
    arc = FakeArc("pass", ("first.example", "lists.example"))
    check = make(directory, trusted_arc_sealers=("lists.example",), arc=arc)
    _, d = await run(check, "bob@sender.example", "bob@sender.example", client="198.51.100.1")
    assert d.verdict is Verdict.ACCEPT and d.results["dmarc"] == "fail" and d.results["arc"] == "pass"
    line = [r.getMessage() for r in caplog.records if "event=mailauth" in r.getMessage()][-1]
    assert "arc_sealer=lists.example" in line and "overridden" in line
    # Only the newest sealer counts; a failing chain never overrides.
    for other in (FakeArc("pass", ("lists.example", "evil.example")), FakeArc("fail", ("lists.example",))):
        check = make(directory, trusted_arc_sealers=("lists.example",), arc=other)
        _, d = await run(check, "bob@sender.example", "bob@sender.example", client="198.51.100.1")
        assert d.verdict is Verdict.REJECT


async def test_spf_temperror_delivers_by_default_and_defers_when_configured(directory):
    zone = Zone(ZONE, timeout=frozenset({"sender.example"}))
    check = make(directory, spf_temperror="deliver")
    check.lookup = zone
    t = txn("bob@sender.example")
    assert (await check.mail(t, t.sender)).accepted and t.results["spf"] == "temperror"
    check = make(directory, spf_temperror="defer")
    check.lookup = zone
    d = await check.mail(t, t.sender)
    assert d.verdict is Verdict.TEMPFAIL and d.reply is not None and (d.reply.code, d.reply.status) == (451, "4.7.24")


async def test_null_sender_checks_helo_and_dmarc_uses_no_spf(directory):
    t = txn("")
    assert t.sender is None
    check = make(directory, {**ZONE, ("client.sender.example", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
                             ("_dmarc.client.sender.example", "TXT"): ["v=DMARC1; p=quarantine"]})
    await check.mail(t, None)
    assert (t.results["spf"], t.results["spf.identity"]) == ("pass", "helo")
    d = await check.message(t, message("bob@client.sender.example"))
    assert d.results["dmarc"] == "fail"  # HELO never aligns for DMARC
    assert b"smtp.helo=client.sender.example" in d.headers[0]


@pytest.mark.parametrize(("trusted", "auth"), [(True, None), (False, "alice@example.test")])
async def test_trusted_networks_and_logins_are_not_checked(directory, trusted, auth):
    check = make(directory)
    t = txn("bob@sender.example", client="198.51.100.1", trusted=trusted, auth=auth)
    assert (await check.mail(t, t.sender)).accepted
    d = await check.message(t, message("ceo@example.test"))
    assert d.verdict is Verdict.ACCEPT and d.headers == () and "spf" not in t.results
    assert check.lookup.queries == []  # type: ignore[attr-defined]


async def test_a_verifier_that_breaks_is_logged_and_never_passes(directory, caplog):
    caplog.set_level(logging.INFO, logger="yuubin.mailauth")

    async def broken(data: bytes):
        raise RuntimeError("boom")

    check = MailAuthCheck(Zone(ZONE), directory, MailauthConfig(trusted_arc_sealers=("lists.example",)), HOST,
                          verify_dkim=broken, verify_arc=broken)
    t = txn("x@soft.example")
    await check.mail(t, t.sender)
    d = await check.message(t, message("x@soft.example"))
    assert d.verdict is Verdict.QUARANTINE  # p=quarantine still applies
    assert b"dkim=temperror (DKIM verifier error: RuntimeError)" in d.headers[0]
    assert b"arc=fail (ARC verifier error: RuntimeError)" in d.headers[0]
    errors = [r.getMessage() for r in caplog.records if "event=mailauth_error" in r.getMessage()]
    assert len(errors) == 2 and "boom" in errors[0]


class SlowZone(Zone):
    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        import asyncio

        await asyncio.sleep(0.2)
        return await super().lookup(name, rdtype)


async def test_checks_are_bounded_by_check_timeout(directory):
    check = make(directory, check_timeout=0.3, spf_temperror="defer")
    check.lookup = SlowZone({("a.example", "TXT"): ["v=spf1 include:b.example -all"],
                             ("b.example", "TXT"): ["v=spf1 include:c.example -all"],
                             ("c.example", "TXT"): ["v=spf1 -all"]})
    t = txn("x@a.example")
    d = await check.mail(t, t.sender)  # three lookups of 0.2 s each: over the 0.3 s bound
    assert d.verdict is Verdict.TEMPFAIL and t.results["spf"] == "temperror"
    assert "longer than 0.3s" in t.results["spf.reason"]
    check = make(directory, check_timeout=0.3)
    check.lookup = SlowZone({("_dmarc.b.example", "TXT"): ["v=DMARC1; p=reject"]})
    t = txn("x@a.example", client="198.51.100.1")
    t.results.update({"spf": "fail", "spf.domain": "a.example", "spf.identity": "mailfrom"})
    d = await check.message(t, message("x@a.b.example"))  # the walk: two names of 0.2 s each
    assert d.verdict is Verdict.ACCEPT and d.results["dmarc"] == "temperror"


async def test_unsigned_mail_never_reaches_the_verifiers(directory):
    called: list[str] = []

    async def verify_dkim(data: bytes):
        called.append("dkim")
        return []

    async def verify_arc(data: bytes):
        called.append("arc")
        return FakeArc("none", ())

    check = MailAuthCheck(Zone(ZONE), directory, MailauthConfig(), HOST, verify_dkim=verify_dkim,
                          verify_arc=verify_arc)
    t = txn("bob@sender.example")
    await check.mail(t, t.sender)
    d = await check.message(t, message("bob@sender.example", signed=False))
    assert d.results["dmarc"] == "pass" and called == []
    assert b"dkim=none" in d.headers[0] and b"arc=none" in d.headers[0]
    await check.message(t, message("bob@sender.example").replace(b"ARC-Seal", b"arc-message-signature"))
    assert called == ["dkim", "arc"]
