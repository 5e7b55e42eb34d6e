"""Unit tests of the policy: each check and the two assembled pipelines, driven directly (no sockets).

The rules are policy.md's per-port table; the reply codes, enhanced statuses and texts are the ones
the end-to-end tests (test_mx_policy.py, test_submission.py, test_mx_dnsbl.py) see on the wire.
State lives in a real Store on a tmp_path file; DNS is a recording resolver with fixed answers;
time is a clock the test sets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from yuubin.auth.accounts import Directory, Resolution
from yuubin.config import OutboundConfig
from yuubin.dns import LookupResult
from yuubin.geo import AccessList, GeoDatabase
from yuubin.policy.access import AllowList
from yuubin.policy.dnsbl import DnsblCheck, DnsblChecker
from yuubin.policy.listeners import mx_pipeline, submission_pipeline
from yuubin.policy.pipeline import (
    AcceptedRecipient,
    Decision,
    Pipeline,
    SessionFacts,
    StageResult,
    Transaction,
    Verdict,
    accept,
    quarantine,
    reject,
)
from yuubin.policy.ratelimit import DAY, HOUR, SUSPENDED_BY_ADMIN_TEXT, SUSPENDED_TEXT, SUSPENDED_UNKNOWN_TEXT
from yuubin.smtp.address import Address, AddressError, parse_path
from yuubin.store import SUSPENDED_BY_ADMIN, SUSPENDED_BY_LIMIT, Store

ip = ipaddress.ip_address

ALICE = "alice@example.test"
BOB = "bob@example.test"
ADMIN = "admin@example.test"
LOCAL_DOMAINS = ("example.test", "other.test")
ALIASES = {
    "team@example.test": [ALICE, BOB],
    "info@other.test": ["team@example.test"],  # an alias of an alias, in the other local domain
    "sales@example.test": [ALICE],
    "ext@example.test": ["someone@far.test"],
    "copy@example.test": [ALICE, "archive@far.test"],  # reaches alice, and a copy leaves
}
UNTRUSTED_IP = "203.0.113.5"
TRUSTED_IP = "192.168.1.10"
NOW = 1_800_000_000.0

RELAY_DENIED = "relay access denied: authenticate on port 587 to send to other domains"
ROUTING_DENIED = "relay access denied: address routes through another host"
LIMIT_TEXT = "sending limit exceeded; the account is suspended pending review by the postmaster"


# ---- helpers ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingResolver:
    """A DnsLookup with fixed answers per name (default NXDOMAIN) that records every question."""

    def __init__(self, answers: dict[str, LookupResult] | None = None) -> None:
        self.answers = dict(answers or {})
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.queries.append((name, rdtype))
        return self.answers.get(name, LookupResult("nxdomain"))


def addr(text: str) -> Address | None:
    """An address as the SMTP core hands it over: parsed from `<text>` ("" is the null sender)."""
    return parse_path(f"<{text}>", smtputf8=True)


def rcpt_addr(text: str) -> Address:
    a = addr(text)
    assert a is not None
    return a


def facts(client: str = UNTRUSTED_IP, *, trusted: bool = False, listener: str = "mx",
          auth_user: str | None = None) -> SessionFacts:
    return SessionFacts(session="s1", listener=listener, client=ip(client), trusted=trusted, auth_user=auth_user)


def ok(check: str, mailboxes: tuple[str, ...] = (), forwards: tuple[str, ...] = (), *,
       verdict: Verdict = Verdict.ACCEPT) -> tuple:
    """The expected summary of an accepted RCPT: check name and where the recipient goes."""
    return (verdict, check, list(mailboxes), list(forwards))


def no(code: int, status: str, check: str, text: str, *, close: bool = False) -> tuple:
    """The expected summary of a refusal."""
    verdict = Verdict.TEMPFAIL if code < 500 else Verdict.REJECT
    return (verdict, code, status, check, text, close)


def refusal(decision: Decision) -> tuple:
    assert decision.reply is not None, decision
    r = decision.reply
    return (decision.verdict, r.code, r.status, decision.check, r.text, decision.close)


def routed(result: StageResult) -> tuple:
    """RCPT result → ok(...) or no(...) shape."""
    d = result.decision
    if not result.accepted:
        assert result.route is None
        return refusal(d)
    assert d.reply is None and not d.close, d
    assert result.route is not None, result
    return (d.verdict, d.check, result.route.mailboxes, result.route.forwards)


def checks(result: StageResult) -> list[str]:
    return [d.check for d in result.trail]


async def sent(sub: Submission, at: float, account: str, rcpts: list[str], client: str = UNTRUSTED_IP) -> None:
    """Count a stored submission at time `at` through the pipeline's accepted() hooks (queued
    writes: waited for)."""
    pipeline, clock = sub.pipeline, sub.clock
    saved = clock.now
    clock.now = at
    txn = Transaction(facts(client, listener="submission", auth_user=account), sender=addr(account))
    txn.recipients = [AcceptedRecipient(rcpt_addr(r), {}, Resolution(forwards=[r])) for r in rcpts]
    pipeline.accepted(txn)
    clock.now = saved
    assert await sub.store.flush(5) == 0


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    for account in (ALICE, BOB, ADMIN):
        s.add_account(account, "$argon2id$not-checked-here")
    for alias, targets in ALIASES.items():
        s.add_alias(alias, targets)
    yield s
    s.close()


@pytest.fixture
def directory(store) -> Directory:
    return Directory(store, LOCAL_DOMAINS, ADMIN)


@pytest.fixture
def mx(directory) -> Pipeline:
    return mx_pipeline(directory, None)


@dataclass
class Submission:
    pipeline: Pipeline
    store: Store
    clock: Clock
    limit_calls: list[tuple[str, str, SessionFacts]] = field(default_factory=list)

    def session(self, account: str | None = ALICE, client: str = UNTRUSTED_IP) -> SessionFacts:
        return facts(client, listener=self.pipeline.name, auth_user=account)

    def txn(self, account: str | None = ALICE, sender: str | None = ALICE) -> Transaction:
        return Transaction(self.session(account), sender=addr(sender) if sender is not None else None)


OUTBOUND = OutboundConfig(max_per_hour=3, max_recipients_per_day=2)
OPEN = AccessList((), (), None)


def build_submission(store: Store, directory: Directory, kind: str = "submission",
                     access: AccessList = OPEN) -> Submission:
    clock = Clock()
    calls: list[tuple[str, str, SessionFacts]] = []
    pipeline = submission_pipeline(kind, directory, store, OUTBOUND, access,
                                   lambda account, what, session: calls.append((account, what, session)), clock)
    return Submission(pipeline, store, clock, calls)


@pytest.fixture(params=["submission", "submissions"])
def sub(request, store, directory) -> Submission:
    return build_submission(store, directory, request.param)


# ---- envelope addresses: what the relay decisions get to see ------------------------------------


@pytest.mark.parametrize(("text", "local", "domain", "source_route"), [
    ("carol%remote.example@example.test", "carol%remote.example", "example.test", False),
    ("remote.example!carol@example.test", "remote.example!carol", "example.test", False),
    ('"carol@remote.example"@example.test', "carol@remote.example", "example.test", False),
    ("@example.test:carol@remote.example", "carol", "remote.example", True),
    ("@other.test,@example.test:carol@remote.example", "carol", "remote.example", True),
])
def test_routing_forms_parse_as_routing_tricks(text, local, domain, source_route):
    a = rcpt_addr(text)
    assert (a.local, a.domain, a.source_route, a.routing_trick) == (local, domain, source_route, True)


@pytest.mark.parametrize("text", ["carol@remote.example@example.test", "alice@remote.example@other.test"])
def test_unquoted_double_at_never_reaches_policy(text):
    with pytest.raises(AddressError) as e:
        addr(text)
    assert (e.value.reply.code, e.value.reply.status) == (501, "5.1.3")


# ---- port 25: RCPT, the per-port table ----------------------------------------------------------

UNKNOWN = "no such user here: {}"

MX_LOCAL = [  # the same answer for trusted and untrusted clients
    ("alice@example.test", ok("recipient", (ALICE,))),
    ("ALICE@Example.TEST", ok("recipient", (ALICE,))),
    ("alice+newsletters@example.test", ok("recipient", (ALICE,))),
    ("bob+x+y@example.test", ok("recipient", (BOB,))),
    ("team@example.test", ok("recipient", (ALICE, BOB))),
    ("info@other.test", ok("recipient", (ALICE, BOB))),
    ("sales@example.test", ok("recipient", (ALICE,))),
    ("ext@example.test", ok("recipient", (), ("someone@far.test",))),  # an alias may forward out
    ("copy@example.test", ok("recipient", (ALICE,), ("archive@far.test",))),
    ("postmaster@example.test", ok("recipient", (ADMIN,))),
    ("postmaster@other.test", ok("recipient", (ADMIN,))),
    ("PostMaster@Other.Test", ok("recipient", (ADMIN,))),
    ("postmaster+tag@other.test", ok("recipient", (ADMIN,))),
    ("postmaster", ok("recipient", (ADMIN,))),
    ("nobody@example.test", no(550, "5.1.1", "recipient", UNKNOWN.format("nobody@example.test"))),
    ("nobody@other.test", no(550, "5.1.1", "recipient", UNKNOWN.format("nobody@other.test"))),
    ("nobody+tag@example.test", no(550, "5.1.1", "recipient", UNKNOWN.format("nobody+tag@example.test"))),
    ("alice@other.test", no(550, "5.1.1", "recipient", UNKNOWN.format("alice@other.test"))),
]

TRICK = no(554, "5.7.1", "relay", ROUTING_DENIED)

MX_BY_TRUST = [  # (rcpt, untrusted, trusted)
    ("carol@remote.example", no(554, "5.7.1", "relay", RELAY_DENIED),
     ok("relay", (), ("carol@remote.example",))),
    ("Carol@Remote.Example", no(554, "5.7.1", "relay", RELAY_DENIED),
     ok("relay", (), ("Carol@remote.example",))),
    # routing tricks into a local domain: refused for everyone
    ("carol%remote.example@example.test", TRICK, TRICK),
    ("remote.example!carol@example.test", TRICK, TRICK),
    ('"carol@remote.example"@example.test', TRICK, TRICK),
    ("alice%remote.example@example.test", TRICK, TRICK),
    ('"alice@remote.example"@example.test', TRICK, TRICK),
    ("alice%example.test@other.test", TRICK, TRICK),
    ("@remote.example:alice@example.test", TRICK, TRICK),
    # routing tricks towards another domain: never for the untrusted; the LAN relays them as written
    ("@example.test:carol@remote.example", TRICK, ok("relay", (), ("carol@remote.example",))),
    ("@other.test,@example.test:carol@remote.example", TRICK, ok("relay", (), ("carol@remote.example",))),
    ("carol%remote.example@far.test", TRICK, ok("relay", (), ("carol%remote.example@far.test",))),
    ("far.test!carol@remote.example", TRICK, ok("relay", (), ("far.test!carol@remote.example",))),
]

MX_RCPT_TABLE = (
    [pytest.param(r, t, exp, id=f"{'trusted' if t else 'untrusted'}-{r}") for r, exp in MX_LOCAL for t in (False, True)]
    + [pytest.param(r, False, u, id=f"untrusted-{r}") for r, u, _ in MX_BY_TRUST]
    + [pytest.param(r, True, t, id=f"trusted-{r}") for r, _, t in MX_BY_TRUST]
)


@pytest.mark.parametrize(("rcpt", "trusted", "expected"), MX_RCPT_TABLE)
async def test_mx_rcpt(mx, rcpt, trusted, expected):
    client = TRUSTED_IP if trusted else UNTRUSTED_IP
    txn = Transaction(facts(client, trusted=trusted), sender=addr("sender@remote.example"))
    result = await mx.rcpt(txn, rcpt_addr(rcpt))
    assert routed(result) == expected
    assert len(result.trail) == 1  # one check decides RCPT on port 25; no "route" fallback needed


@pytest.mark.parametrize("rcpt", ["postmaster", "postmaster@example.test", "postmaster@other.test"])
async def test_mx_postmaster_without_an_account_waits_in_its_own_mailbox(store, rcpt):
    pipeline = mx_pipeline(Directory(store, LOCAL_DOMAINS, "postmaster@example.test"), None)
    result = await pipeline.rcpt(Transaction(facts()), rcpt_addr(rcpt))
    assert routed(result) == ok("recipient", ("postmaster@example.test",))


async def test_mx_recipient_changes_apply_at_once(mx, store):
    txn = Transaction(facts())
    assert routed(await mx.rcpt(txn, rcpt_addr("carol@example.test")))[:2] == (Verdict.REJECT, 550)
    store.add_account("carol@example.test", "x")
    assert routed(await mx.rcpt(txn, rcpt_addr("carol@example.test"))) == ok("recipient", ("carol@example.test",))


# ---- port 25: MAIL ------------------------------------------------------------------------------

def ours(domain: str) -> tuple:
    return no(550, "5.7.1", "sender", f"sender domain {domain} is ours: use port 587 to send as {domain}")


@pytest.mark.parametrize(("sender", "trusted", "expected"), [
    ("alice@example.test", False, ours("example.test")),
    ("someone@other.test", False, ours("other.test")),
    ("Bob@EXAMPLE.test", False, ours("example.test")),
    ("alice@example.test", True, (Verdict.ACCEPT, "sender", "ok")),
    ("someone@other.test", True, (Verdict.ACCEPT, "sender", "ok")),
    ("Bob@EXAMPLE.test", True, (Verdict.ACCEPT, "sender", "ok")),
    ("sender@remote.example", False, (Verdict.ACCEPT, "sender", "ok")),
    ("sender@remote.example", True, (Verdict.ACCEPT, "sender", "ok")),
    ("alice@sub.example.test", False, (Verdict.ACCEPT, "sender", "ok")),  # a subdomain is not ours
    ("", False, (Verdict.ACCEPT, "sender", "null sender")),
    ("", True, (Verdict.ACCEPT, "sender", "null sender")),
])
async def test_mx_mail(mx, sender, trusted, expected):
    txn = Transaction(facts(TRUSTED_IP if trusted else UNTRUSTED_IP, trusted=trusted))
    result = await mx.mail(txn, addr(sender))
    d = result.decision
    got = refusal(d) if not result.accepted else (d.verdict, d.check, d.reason)
    assert got == expected
    assert checks(result) == ["sender"]


async def test_mx_has_no_message_checks_or_hooks(mx):
    txn = Transaction(facts(), sender=addr("sender@remote.example"))
    result = await mx.message(txn, b"Subject: x\r\n\r\nno From: header at all\r\n")
    assert (result.decision.verdict, result.decision.check, result.decision.reason) == (
        Verdict.ACCEPT, "message", "no checks")
    assert result.trail == ()
    mx.accepted(txn)  # nothing to count on port 25


# ---- port 25: DNSBL at connect ------------------------------------------------------------------

ZONES = ("zen.dnsbl.test", "bl.dnsbl.test")
CLIENT = "198.51.100.7"


def rev(client: str, zone: str) -> str:
    return ".".join(reversed(client.split("."))) + "." + zone


def A(*records: str) -> LookupResult:
    return LookupResult("ok", records, 300)


def listed_on(zone: str, codes: str, client: str = CLIENT) -> tuple:
    return (Verdict.REJECT, 554, "5.7.1", "dnsbl", f"service refused: client [{client}] is listed on {zone}",
            f"listed on {zone} ({codes})")


NOT_LISTED = (Verdict.ACCEPT, "dnsbl", "not listed")


@pytest.mark.parametrize(("zen", "bl", "expected"), [
    (A("127.0.0.2"), None, listed_on("zen.dnsbl.test", "127.0.0.2")),
    (None, A("127.0.0.2"), listed_on("bl.dnsbl.test", "127.0.0.2")),
    (A("127.0.0.3"), A("127.0.0.2"), listed_on("zen.dnsbl.test", "127.0.0.3")),  # first zone in config order
    (A("127.0.0.4", "127.0.0.2"), None, listed_on("zen.dnsbl.test", "127.0.0.2,127.0.0.4")),
    (A("127.255.255.254", "127.0.0.10"), None, listed_on("zen.dnsbl.test", "127.0.0.10")),
    (A("127.255.255.254"), A("127.0.0.2"), listed_on("bl.dnsbl.test", "127.0.0.2")),
    (LookupResult("timeout"), A("127.0.0.2"), listed_on("bl.dnsbl.test", "127.0.0.2")),
    (LookupResult("servfail"), A("127.0.0.2"), listed_on("bl.dnsbl.test", "127.0.0.2")),
    (None, None, NOT_LISTED),
    (LookupResult("nodata"), LookupResult("nxdomain"), NOT_LISTED),
    (A("127.255.255.252"), None, NOT_LISTED),
    (A("127.255.255.254"), None, NOT_LISTED),
    (A("127.255.255.255"), None, NOT_LISTED),
    (A("127.255.255.1"), None, NOT_LISTED),
    (A("127.255.255.254"), A("127.255.255.255"), NOT_LISTED),
    (A("10.20.30.40"), None, NOT_LISTED),  # outside 127/8: a misused list or NXDOMAIN rewriting
    (A("not-an-address"), None, NOT_LISTED),
    (LookupResult("timeout"), None, NOT_LISTED),
    (LookupResult("servfail"), None, NOT_LISTED),
    (LookupResult("timeout"), LookupResult("servfail"), NOT_LISTED),
])
async def test_mx_dnsbl(directory, zen, bl, expected):
    answers = {rev(CLIENT, z): a for z, a in zip(ZONES, (zen, bl), strict=True) if a is not None}
    resolver = RecordingResolver(answers)
    pipeline = mx_pipeline(directory, DnsblChecker(resolver, ZONES, clock=Clock()))
    result = await pipeline.connect(facts(CLIENT))
    d = result.decision
    got = (*refusal(d)[:5], d.reason) if not result.accepted else (d.verdict, d.check, d.reason)
    assert got == expected
    assert d.close is False  # a listed client gets 554 as its greeting; only QUIT works, the core closes
    assert sorted(resolver.queries) == sorted((rev(CLIENT, z), "A") for z in ZONES)  # every zone asked once


@pytest.mark.parametrize("client", ["192.168.1.10", "10.0.0.1", "2001:db8::1"])
async def test_mx_dnsbl_never_asks_about_trusted_clients(directory, client):
    resolver = RecordingResolver({rev(client, z): A("127.0.0.2") for z in ZONES})
    pipeline = mx_pipeline(directory, DnsblChecker(resolver, ZONES, clock=Clock()))
    result = await pipeline.connect(facts(client, trusted=True))
    assert (result.decision.verdict, result.decision.check, result.decision.reason) == (
        Verdict.ACCEPT, "dnsbl", "trusted network: not checked")
    assert resolver.queries == []


@pytest.mark.parametrize("zones", [(), ("",), (" . ",)])
async def test_mx_dnsbl_without_zones_asks_nobody(directory, zones):
    resolver = RecordingResolver()
    for checker in (None, DnsblChecker(resolver, zones, clock=Clock())):
        result = await mx_pipeline(directory, checker).connect(facts(CLIENT))
        assert (result.decision.verdict, result.decision.reason) == (Verdict.ACCEPT, "no zones configured")
    assert resolver.queries == []


@pytest.mark.parametrize(("client", "query_prefix"), [
    ("2001:db8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2."),
    ("::ffff:198.51.100.7", "7.100.51.198."),  # dual-stack socket, IPv4 client: asked as IPv4
])
async def test_mx_dnsbl_ipv6_and_mapped_clients(directory, client, query_prefix):
    shown = str(ip(client))
    resolver = RecordingResolver({query_prefix + "bl.dnsbl.test": A("127.0.0.2")})
    result = await mx_pipeline(directory, DnsblChecker(resolver, ZONES, clock=Clock())).connect(facts(client))
    assert refusal(result.decision)[:5] == (
        Verdict.REJECT, 554, "5.7.1", "dnsbl", f"service refused: client [{shown}] is listed on bl.dnsbl.test")
    assert sorted(resolver.queries) == sorted((query_prefix + z, "A") for z in ZONES)


async def test_dnsbl_check_alone_matches_the_pipeline(directory):
    """DnsblCheck is the connect check of mx and nothing else is."""
    resolver = RecordingResolver({rev(CLIENT, "zen.dnsbl.test"): A("127.0.0.2")})
    check = DnsblCheck(DnsblChecker(resolver, ZONES, clock=Clock()))
    d = await check.connect(facts(CLIENT))
    result = await mx_pipeline(directory, check.checker).connect(facts(CLIENT))
    assert result.decision == d
    assert checks(result) == ["dnsbl"]


# ---- 587/465: MAIL -----------------------------------------------------------------------------

def not_owned(sender: str, account: str = ALICE) -> tuple:
    return no(553, "5.7.1", "sender", f"sender address <{sender}> is not owned by {account}")


@pytest.mark.parametrize(("account", "sender", "expected"), [
    (ALICE, ALICE, (Verdict.ACCEPT, "sender", "owned")),
    (ALICE, "Alice@Example.TEST", (Verdict.ACCEPT, "sender", "owned")),
    (ALICE, "alice+lists@example.test", (Verdict.ACCEPT, "sender", "owned")),
    (ALICE, "sales@example.test", (Verdict.ACCEPT, "sender", "owned")),  # alias that reaches only alice
    (ALICE, "", (Verdict.ACCEPT, "sender", "null sender")),
    (ADMIN, "postmaster@other.test", (Verdict.ACCEPT, "sender", "owned")),  # postmaster reaches only admin
    (ALICE, BOB, not_owned(BOB)),
    (ALICE, "team@example.test", not_owned("team@example.test")),  # alias reaching others too
    (ALICE, "ext@example.test", not_owned("ext@example.test")),  # alias forwarding elsewhere
    (ALICE, "copy@example.test", not_owned("copy@example.test")),  # alias reaching alice and elsewhere
    (ALICE, "ceo@far.test", not_owned("ceo@far.test")),  # a remote address
    (ALICE, "bob+x@example.test", not_owned("bob+x@example.test")),
    (ALICE, "nobody@example.test", not_owned("nobody@example.test")),
    (ALICE, "alice@other.test", not_owned("alice@other.test")),
    (ALICE, "alice%far.test@example.test", not_owned("alice%far.test@example.test")),
    (ALICE, "@far.test:alice@example.test", not_owned(ALICE)),  # source route: a routing trick
    (ALICE, "postmaster", not_owned("postmaster")),
    (ALICE, "postmaster@example.test", not_owned("postmaster@example.test")),
])
async def test_submission_mail_sender_ownership(sub, account, sender, expected):
    result = await sub.pipeline.mail(sub.txn(account, None), addr(sender))
    d = result.decision
    got = refusal(d) if not result.accepted else (d.verdict, d.check, d.reason)
    assert got == expected
    assert checks(result) == ["limits", "sender"]  # the limits first, then ownership
    assert sub.limit_calls == []


async def test_submission_mail_needs_a_login(sub):
    result = await sub.pipeline.mail(sub.txn(None, None), addr(ALICE))
    assert refusal(result.decision) == no(530, "5.7.0", "auth", "authentication required")
    assert checks(result) == ["auth"]  # ownership is not asked


@pytest.mark.parametrize(("account", "by", "text", "reason"), [
    (ALICE, SUSPENDED_BY_LIMIT, SUSPENDED_TEXT, f"account {ALICE} is suspended by the sending limit"),
    (ALICE, SUSPENDED_BY_ADMIN, SUSPENDED_BY_ADMIN_TEXT, f"account {ALICE} is suspended by the administrator"),
    (ALICE, "", SUSPENDED_UNKNOWN_TEXT, f"account {ALICE} is suspended"),  # suspended by an older yuubin
    ("ghost@example.test", SUSPENDED_BY_ADMIN, SUSPENDED_UNKNOWN_TEXT, "account ghost@example.test is suspended"),
])  # the reply says who suspended it; no account row at all is a suspension without a reason
async def test_submission_mail_from_a_suspended_account(sub, account, by, text, reason):
    sub.store.set_suspended(ALICE, True, by)
    result = await sub.pipeline.mail(sub.txn(account, None), addr(account))
    assert refusal(result.decision) == no(550, "5.7.1", "suspended", text)
    assert result.decision.reason == reason
    assert checks(result) == ["suspended"]
    assert sub.limit_calls == []
    bob = await sub.pipeline.mail(sub.txn(BOB, None), addr(BOB))
    assert bob.accepted  # only that account


@pytest.mark.parametrize(("ages", "broken"), [
    ((3599.0, 10.0, 0.0), True),
    ((1.0, 1.0, 1.0), True),
    ((3600.0, 10.0, 0.0), False),  # exactly an hour old: out of the window
    ((10.0, 0.0), False),
    ((7200.0, 5000.0, 3700.0, 0.0), False),
])
async def test_submission_hourly_limit(sub, ages, broken):
    for age in ages:
        await sent(sub, NOW - age, ALICE, ["carol@far.test"])
    session = sub.session()
    result = await sub.pipeline.mail(Transaction(session), addr(ALICE))
    if not broken:
        assert result.accepted and checks(result) == ["limits", "sender"]
        assert not sub.store.account(ALICE).suspended and sub.limit_calls == []
        return
    assert refusal(result.decision) == no(451, "4.7.1", "limit", LIMIT_TEXT)
    assert checks(result) == ["limit"]
    assert sub.store.account(ALICE).suspended
    assert sub.limit_calls == [(ALICE, "3 messages in the last hour (outbound.max_per_hour = 3)", session)]
    assert sub.limit_calls[0][2] is session
    # the next MAIL meets the suspension; containment is not called again
    again = await sub.pipeline.mail(sub.txn(), addr(ALICE))
    assert refusal(again.decision) == no(550, "5.7.1", "suspended", SUSPENDED_TEXT)
    assert len(sub.limit_calls) == 1
    # other accounts go on
    assert (await sub.pipeline.mail(sub.txn(BOB), addr(BOB))).accepted
    assert not sub.store.account(BOB).suspended


async def test_submission_hourly_limit_comes_before_ownership(sub):
    for _ in range(3):
        await sent(sub, NOW - 5, ALICE, ["carol@far.test"])
    result = await sub.pipeline.mail(sub.txn(), addr(BOB))  # not owned either: the limit answers
    assert refusal(result.decision)[:4] == (Verdict.TEMPFAIL, 451, "4.7.1", "limit")
    assert checks(result) == ["limit"]


# ---- 587/465: RCPT -----------------------------------------------------------------------------

SUB_TRICK = no(554, "5.7.1", "relay", ROUTING_DENIED)


@pytest.mark.parametrize(("rcpt", "expected", "trail"), [
    (BOB, ok("limits", (BOB,)), ["recipient", "limits"]),
    ("Bob+Tag@Example.TEST", ok("limits", (BOB,)), ["recipient", "limits"]),
    ("team@example.test", ok("limits", (ALICE, BOB)), ["recipient", "limits"]),
    ("info@other.test", ok("limits", (ALICE, BOB)), ["recipient", "limits"]),
    ("ext@example.test", ok("limits", (), ("someone@far.test",)), ["recipient", "limits"]),
    ("postmaster", ok("limits", (ADMIN,)), ["recipient", "limits"]),
    ("postmaster@other.test", ok("limits", (ADMIN,)), ["recipient", "limits"]),
    ("carol@far.test", ok("limits", (), ("carol@far.test",)), ["relay", "limits"]),  # relay after AUTH
    ("nobody@example.test", no(550, "5.1.1", "recipient", UNKNOWN.format("nobody@example.test")), ["recipient"]),
    ("nobody@other.test", no(550, "5.1.1", "recipient", UNKNOWN.format("nobody@other.test")), ["recipient"]),
    ("carol%far.test@example.test", SUB_TRICK, ["relay"]),
    ("far.test!carol@example.test", SUB_TRICK, ["relay"]),
    ('"carol@far.test"@example.test', SUB_TRICK, ["relay"]),
    ("@example.test:carol@far.test", SUB_TRICK, ["relay"]),
    ("carol%far.test@remote.example", SUB_TRICK, ["relay"]),  # never, even towards another domain
])
async def test_submission_rcpt(sub, rcpt, expected, trail):
    result = await sub.pipeline.rcpt(sub.txn(), rcpt_addr(rcpt))
    assert routed(result) == expected
    assert checks(result) == trail
    assert sub.limit_calls == []


async def test_submission_daily_recipient_limit(sub):
    await sent(sub, NOW - 100, ALICE, ["r1@far.test", "r2@far.test"])
    await sent(sub, NOW - DAY, ALICE, ["old@far.test"])  # a day old: forgotten
    txn = sub.txn()
    for again in ("r1@far.test", "R2@Far.Test"):  # already seen today: not counted again
        result = await sub.pipeline.rcpt(txn, rcpt_addr(again))
        assert routed(result)[:2] == (Verdict.ACCEPT, "limits"), again
        assert result.decision.reason == "2 distinct recipients in the last day"
    # refusals of other checks come first and do not trip the limit
    assert refusal((await sub.pipeline.rcpt(txn, rcpt_addr("nobody@example.test"))).decision)[1] == 550
    assert refusal((await sub.pipeline.rcpt(txn, rcpt_addr("r3%x@far.test"))).decision)[1] == 554
    assert sub.limit_calls == [] and not sub.store.account(ALICE).suspended
    # a third distinct recipient breaks it, also when it is local
    result = await sub.pipeline.rcpt(txn, rcpt_addr(BOB))
    assert refusal(result.decision) == no(451, "4.7.1", "limit", LIMIT_TEXT)
    assert checks(result) == ["recipient", "limit"]
    assert sub.store.account(ALICE).suspended
    assert sub.limit_calls == [(ALICE, "2 distinct recipients in the last day (outbound.max_recipients_per_day = 2)",
                                txn.session)]
    mail = await sub.pipeline.mail(sub.txn(), addr(ALICE))
    assert refusal(mail.decision) == no(550, "5.7.1", "suspended", SUSPENDED_TEXT)
    assert len(sub.limit_calls) == 1


async def test_submission_daily_limit_window(sub):
    await sent(sub, NOW - DAY + 1, ALICE, ["r1@far.test", "r2@far.test"])
    assert not (await sub.pipeline.rcpt(sub.txn(), rcpt_addr("r3@far.test"))).accepted
    sub.store.set_suspended(ALICE, False)
    sub.limit_calls.clear()
    sub.clock.now += 1  # now exactly a day old
    assert (await sub.pipeline.rcpt(sub.txn(), rcpt_addr("r3@far.test"))).accepted
    assert sub.limit_calls == []


async def test_submission_daily_limit_counts_the_current_transaction(sub):
    """policy.md/ratelimit.py: at most max_recipients_per_day distinct recipients per day (here 2)."""
    txn = sub.txn()
    for r in ("r1@far.test", "r2@far.test"):
        result = await sub.pipeline.rcpt(txn, rcpt_addr(r))
        assert result.accepted
        txn.recipients.append(AcceptedRecipient(rcpt_addr(r), {}, result.route))
    third = await sub.pipeline.rcpt(txn, rcpt_addr("r3@far.test"))
    assert refusal(third.decision)[:4] == (Verdict.TEMPFAIL, 451, "4.7.1", "limit")


async def test_submission_accepted_counts_the_message_and_its_recipients(sub):
    txn = sub.txn()
    for r in ("carol@far.test", "Bob+x@Example.TEST"):
        result = await sub.pipeline.rcpt(txn, rcpt_addr(r))
        txn.recipients.append(AcceptedRecipient(rcpt_addr(r), {}, result.route))
    sub.pipeline.accepted(txn)
    assert await sub.store.flush(5) == 0
    assert sub.store.submissions_since(ALICE, NOW - HOUR) == 1
    assert sub.store.submission_recipients_since(ALICE, NOW - DAY) == {"carol@far.test", "bob+x@example.test"}
    assert sub.store.submission_clients_since(ALICE, NOW - DAY) == [(UNTRUSTED_IP, 1)]
    assert sub.store.submissions_since(BOB, NOW - HOUR) == 0
    sub.pipeline.accepted(sub.txn(None))  # nobody logged in: nothing to count
    assert sub.store.submissions_since(ALICE, NOW - HOUR) == 1


# ---- 587/465: the From: header at the end of DATA ----------------------------------------------

ONE_FROM = no(550, "5.6.0", "from", "message must have exactly one From: header")
UNREADABLE = no(550, "5.7.1", "from", "From: header must hold one address you own")


def from_not_owned(a: str) -> tuple:
    return no(550, "5.7.1", "from", f"From: address <{a}> is not owned by {ALICE}")


OWNED = (Verdict.ACCEPT, "from", "owned")


@pytest.mark.parametrize(("head", "expected"), [
    (b"To: bob@example.test\r\nSubject: no from\r\n", ONE_FROM),
    (b"From: alice@example.test\r\nFrom: alice@example.test\r\n", ONE_FROM),
    (b"From: alice@example.test, bob@example.test\r\n", UNREADABLE),
    (b"From: alice@example.test, alice+x@example.test\r\n", UNREADABLE),
    (b"From: <>\r\n", UNREADABLE),
    (b"From: \r\n", UNREADABLE),
    (b"From: undisclosed-recipients:;\r\n", UNREADABLE),
    (b"From: alice@example.test\r\n", OWNED),
    (b"From: ALICE@EXAMPLE.TEST\r\n", OWNED),
    (b"From: Alice <alice@example.test>\r\n", OWNED),
    (b'From: "Alice Example" <alice+news@example.test>\r\n', OWNED),
    (b"From: Alice\r\n <alice@example.test>\r\n", OWNED),  # folded
    (b"from: sales@example.test\r\n", OWNED),
    (b"From: Bob <bob@example.test>\r\n", from_not_owned(BOB)),
    (b"From: ceo@far.test\r\n", from_not_owned("ceo@far.test")),
    (b"From: team@example.test\r\n", from_not_owned("team@example.test")),
    (b"From: ext@example.test\r\n", from_not_owned("ext@example.test")),
    (b"From: copy@example.test\r\n", from_not_owned("copy@example.test")),
    (b"From: alice%far.test@example.test\r\n", from_not_owned("alice%far.test@example.test")),
    (b"From: alice@[192.0.2.1]\r\n", from_not_owned("alice@[192.0.2.1]")),
    (b"From: undisclosed\r\n", from_not_owned("undisclosed")),
])
async def test_submission_from_header(sub, head, expected):
    data = head + b"Subject: hi\r\n\r\nbody\r\nFrom: alice@example.test\r\n"  # a From: in the body counts not
    result = await sub.pipeline.message(sub.txn(), data)
    d = result.decision
    got = refusal(d) if not result.accepted else (d.verdict, d.check, d.reason)
    assert got == expected
    assert checks(result) == ["from"]


async def test_submission_null_sender_still_needs_an_owned_from(sub):
    txn = sub.txn(ALICE, None)
    assert (await sub.pipeline.mail(txn, None)).accepted
    assert (await sub.pipeline.message(txn, b"From: alice@example.test\r\n\r\nx\r\n")).accepted
    assert refusal((await sub.pipeline.message(txn, b"From: bob@example.test\r\n\r\nx\r\n")).decision) == \
        from_not_owned(BOB)


# ---- 587/465: who may connect ------------------------------------------------------------------

DELEGATED = """2|apnic|20261127|4|19830613|20261126|+1000
apnic|*|ipv4|*|3|summary
apnic|JP|ipv4|127.2.0.0|65536|20100101|allocated
apnic|CN|ipv4|127.3.0.0|65536|20100101|allocated
apnic||ipv4|127.6.0.0|256||available
"""


def refused_here(client: str, why: str) -> tuple:
    return (Verdict.REJECT, 554, "5.7.1", "allow", f"service refused: [{client}] may not submit mail here", True,
            why)


@pytest.mark.parametrize(("client", "expected"), [
    ("192.0.2.9", (Verdict.ACCEPT, "allow", "in 192.0.2.0/24")),
    ("::ffff:192.0.2.9", (Verdict.ACCEPT, "allow", "in 192.0.2.0/24")),
    ("2001:db8::5", (Verdict.ACCEPT, "allow", "in 2001:db8::/32")),
    ("127.2.0.5", (Verdict.ACCEPT, "allow", "country JP")),
    ("198.51.100.1", refused_here("198.51.100.1", "country unknown not in allow list")),
    ("192.0.3.1", refused_here("192.0.3.1", "country unknown not in allow list")),
    ("127.3.0.5", refused_here("127.3.0.5", "country CN not in allow list")),
    ("127.6.0.1", refused_here("127.6.0.1", "country unknown not in allow list")),
])
async def test_submission_allow_list(store, directory, tmp_path, client, expected):
    geo_file = tmp_path / "delegated-apnic-latest"
    geo_file.write_text(DELEGATED)
    access = AccessList((ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")), ("JP",),
                        GeoDatabase.load(str(geo_file)))
    s = build_submission(store, directory, access=access)
    result = await s.pipeline.connect(facts(client, listener="submission"))
    d = result.decision
    got = (*refusal(d), d.reason) if not result.accepted else (d.verdict, d.check, d.reason)
    assert got == expected
    assert checks(result) == ["allow"]


@pytest.mark.parametrize(("networks", "client", "allowed", "why"), [
    ((), "198.51.100.1", True, "no allow list"),
    (("127.4.0.0/24",), "127.4.0.9", True, "in 127.4.0.0/24"),
    (("127.4.0.0/24",), "127.4.1.9", False, "not in allow list"),
    (("::1/128",), "::1", True, "in ::1/128"),
    (("::1/128",), "127.0.0.1", False, "not in allow list"),
    (("127.0.0.0/8",), "::1", False, "not in allow list"),
])
async def test_submission_allow_list_networks_only(store, directory, networks, client, allowed, why):
    access = AccessList(tuple(ipaddress.ip_network(n) for n in networks), (), None)
    s = build_submission(store, directory, access=access)
    d = (await s.pipeline.connect(facts(client, listener="submission"))).decision
    assert (d.accepted, d.check, d.reason, d.close) == (allowed, "allow", why, not allowed)
    if not allowed:
        assert refusal(d)[:3] == (Verdict.REJECT, 554, "5.7.1")


async def test_allow_list_check_alone():
    check = AllowList(AccessList((ipaddress.ip_network("192.0.2.0/24"),), (), None))
    assert (await check.connect(facts("192.0.2.1"))).accepted
    assert (await check.connect(facts("192.0.3.1"))).close


# ---- the pipeline's own semantics -------------------------------------------------------------


class Recording:
    """A check for every stage that logs when it is called and when its coroutine runs."""

    def __init__(self, log: list, name: str, decision: Decision):
        self.log = log
        self.name = name
        self.decision = decision

    def _call(self) -> object:
        self.log.append(("called", self.name))
        return self._run()

    async def _run(self) -> Decision:
        self.log.append(("ran", self.name))
        return self.decision

    def connect(self, session):
        return self._call()

    def helo(self, session):
        return self._call()

    def auth(self, session):
        return self._call()

    def mail(self, txn, sender):
        return self._call()

    def rcpt(self, txn, rcpt):
        return self._call()

    def message(self, txn, data):
        return self._call()

    def accepted(self, txn) -> None:
        self.log.append(("accepted", self.name, txn))


ROUTE = Resolution(mailboxes=[ALICE])


def A_(name: str, **kw) -> Decision:
    return accept(name, "ok", route=ROUTE, **kw)


def Q_(name: str, **kw) -> Decision:
    return Decision(Verdict.QUARANTINE, name, "junk", route=ROUTE, **kw)


def R_(name: str, code: int = 550) -> Decision:
    return reject(name, "no", code, f"{code // 100}.7.1", f"{name} says no")


STAGES = ["connect", "helo", "auth", "mail", "rcpt", "message"]


async def run_stage(stage: str, decisions: list[Decision]) -> tuple[StageResult, list]:
    log: list = []
    recs = [Recording(log, f"c{i}", d) for i, d in enumerate(decisions)]
    pipeline = Pipeline("test", **{stage: recs})
    session = facts()
    txn = Transaction(session)
    call: dict[str, Callable] = {
        "connect": lambda: pipeline.connect(session), "helo": lambda: pipeline.helo(session),
        "auth": lambda: pipeline.auth(session), "mail": lambda: pipeline.mail(txn, None),
        "rcpt": lambda: pipeline.rcpt(txn, rcpt_addr(ALICE)), "message": lambda: pipeline.message(txn, b"x"),
    }
    return await call[stage](), log


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("decisions", "deciding", "ran"), [
    ([A_("a"), A_("b"), A_("c")], 2, 3),
    ([R_("a"), A_("b"), A_("c")], 0, 1),
    ([A_("a"), R_("b"), A_("c")], 1, 2),
    ([A_("a"), R_("b", 451), R_("c")], 1, 2),  # a tempfail ends the stage too
    ([A_("a"), A_("b"), R_("c")], 2, 3),
    ([Q_("a"), A_("b")], 0, 2),  # quarantine wins over a later accept ...
    ([A_("a"), Q_("b"), A_("c")], 1, 3),  # ... and over an earlier one
    ([Q_("a"), Q_("b"), A_("c")], 1, 3),  # the last quarantine is the one reported
    ([Q_("a"), R_("b"), A_("c")], 1, 2),  # but not over a later reject
])
async def test_stage_first_refusal_ends_it(stage, decisions, deciding, ran):
    result, log = await run_stage(stage, decisions)
    assert result.decision is decisions[deciding]
    assert result.trail == tuple(decisions[:ran])
    names = [f"c{i}" for i in range(ran)]
    assert log == [e for n in names for e in (("called", n), ("ran", n))]  # later checks never even called
    expected_accepted = decisions[deciding].verdict in (Verdict.ACCEPT, Verdict.QUARANTINE)
    assert result.accepted is expected_accepted
    if expected_accepted:
        assert result.quarantine is (decisions[deciding].verdict is Verdict.QUARANTINE)
        assert result.route is ROUTE


@pytest.mark.parametrize("stage", ["connect", "helo", "auth", "mail", "message"])
async def test_stage_without_checks_accepts(stage):
    result, log = await run_stage(stage, [])
    d = result.decision
    assert (d.verdict, d.check, d.reason, d.reply) == (Verdict.ACCEPT, stage, "no checks", None)
    assert result.trail == () and log == []


async def test_headers_and_results_accumulate_in_order():
    decisions = [
        accept("a", headers=(b"X-A: 1\r\n",), results={"spf": "pass", "dkim": "none"}),
        quarantine("b", "spam", headers=(b"X-B: 1\r\n", b"X-B: 2\r\n"), results={"dkim": "fail"}),
        accept("c", "ok"),
        accept("d", headers=(b"X-D: 1\r\n",), results={"dmarc": "fail"}),
    ]
    result, _ = await run_stage("message", decisions)
    assert result.headers == (b"X-A: 1\r\n", b"X-B: 1\r\n", b"X-B: 2\r\n", b"X-D: 1\r\n")
    assert dict(result.results) == {"spf": "pass", "dkim": "fail", "dmarc": "fail"}  # later results win
    assert list(result.results) == ["spf", "dkim", "dmarc"]
    assert result.decision is decisions[1] and result.quarantine and result.accepted


async def test_a_refused_stage_carries_no_headers_or_results():
    decisions = [accept("a", headers=(b"X-A: 1\r\n",), results={"spf": "pass"}), R_("b")]
    result, _ = await run_stage("message", decisions)
    assert (result.headers, dict(result.results), result.route) == ((), {}, None)
    assert result.decision is decisions[1]


async def test_rcpt_accepted_without_a_route_is_refused():
    result, log = await run_stage("rcpt", [accept("a"), quarantine("b", "junk")])
    assert routed(result) == no(550, "5.1.1", "route", f"no such user here: {ALICE}")
    assert checks(result) == ["a", "b", "route"]
    assert len(log) == 4  # both checks ran


async def test_rcpt_without_checks_has_no_route():
    result, _ = await run_stage("rcpt", [])
    assert routed(result) == no(550, "5.1.1", "route", f"no such user here: {ALICE}")
    assert checks(result) == ["route"]


async def test_rcpt_route_comes_from_whichever_check_gave_it():
    first, later = Resolution(mailboxes=[ALICE]), Resolution(forwards=["carol@far.test"])
    result, _ = await run_stage("rcpt", [accept("a", route=first), accept("b"), accept("c")])
    assert result.route is first and result.decision.check == "c"
    result, _ = await run_stage("rcpt", [accept("a", route=first), accept("b", route=later), accept("c")])
    assert result.route is later


async def test_rcpt_refusal_is_not_turned_into_a_route_refusal():
    result, _ = await run_stage("rcpt", [accept("a"), R_("b", 554)])
    assert checks(result) == ["a", "b"]
    assert refusal(result.decision)[:4] == (Verdict.REJECT, 554, "5.7.1", "b")


async def test_accepted_hooks_run_in_order():
    log: list = []
    hooks = [Recording(log, n, accept(n)) for n in ("h1", "h2", "h3")]
    pipeline = Pipeline("test", accepted=hooks)
    txn = Transaction(facts())
    pipeline.accepted(txn)
    assert [e[:2] for e in log] == [("accepted", "h1"), ("accepted", "h2"), ("accepted", "h3")]
    assert all(e[2] is txn for e in log)


@pytest.mark.parametrize(("decision", "verdict", "accepted", "reply"), [
    (accept("x"), Verdict.ACCEPT, True, None),
    (quarantine("x", "junk"), Verdict.QUARANTINE, True, None),
    (reject("x", "why", 550, "5.7.1", "no"), Verdict.REJECT, False, (550, "5.7.1", "no")),
    (reject("x", "why", 554, "5.7.1", "no"), Verdict.REJECT, False, (554, "5.7.1", "no")),
    (reject("x", "why", 500, "5.5.1", "no"), Verdict.REJECT, False, (500, "5.5.1", "no")),
    (reject("x", "why", 451, "4.7.1", "later"), Verdict.TEMPFAIL, False, (451, "4.7.1", "later")),
    (reject("x", "why", 499, "4.0.0", "later"), Verdict.TEMPFAIL, False, (499, "4.0.0", "later")),
])
def test_decision_helpers(decision, verdict, accepted, reply):
    assert decision.verdict is verdict and decision.accepted is accepted
    got = None if decision.reply is None else (decision.reply.code, decision.reply.status, decision.reply.text)
    assert got == reply
    assert decision.close is False


# ---- the assembled pipelines: which check sits at which stage ----------------------------------


async def test_mx_pipeline_stages(directory):
    resolver = RecordingResolver()
    pipeline = mx_pipeline(directory, DnsblChecker(resolver, ZONES, clock=Clock()))
    session = facts(CLIENT)
    txn = Transaction(session)
    assert pipeline.name == "mx"
    assert checks(await pipeline.connect(session)) == ["dnsbl"]
    assert checks(await pipeline.helo(session)) == []
    assert checks(await pipeline.auth(session)) == []
    assert checks(await pipeline.mail(txn, addr("sender@remote.example"))) == ["sender"]
    assert checks(await pipeline.rcpt(txn, rcpt_addr(ALICE))) == ["recipient"]
    assert checks(await pipeline.message(txn, b"\r\n")) == []


async def test_submission_pipeline_stages(sub):
    session = sub.session()
    txn = sub.txn()
    assert sub.pipeline.name in ("submission", "submissions")
    assert checks(await sub.pipeline.connect(session)) == ["allow"]
    assert checks(await sub.pipeline.helo(session)) == []
    assert checks(await sub.pipeline.auth(session)) == []
    assert checks(await sub.pipeline.mail(txn, addr(ALICE))) == ["limits", "sender"]
    assert checks(await sub.pipeline.rcpt(txn, rcpt_addr("carol@far.test"))) == ["relay", "limits"]
    assert checks(await sub.pipeline.message(txn, b"From: alice@example.test\r\n\r\n")) == ["from"]
