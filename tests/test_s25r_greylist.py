"""S25R and greylisting: the rules against realistic host names, greylisting's timing with an
injected clock (across a restart: a new Store on the same state.db), and both end to end on port 25
with reverse DNS from the test DNS server."""

from __future__ import annotations

import ipaddress
import smtplib
import time

import pytest

from tests.smtpclient import RawSMTP
from yuubin.dns import LookupResult
from yuubin.policy.greylist import Greylist, GreylistSettings, client_network
from yuubin.policy.pipeline import SessionFacts, Transaction
from yuubin.policy.s25r import S25rAllow, S25rCheck, dynamic_rule
from yuubin.smtp.address import parse_path
from yuubin.store import Store

DYNAMIC = {  # names of the kind consumer lines get, and the rule that catches them
    "p1234-ipbf5607.tokyo.ocn.ne.jp": 1,
    "softbank126012034056.bbtec.net": 2,
    "KD111239123045.au-net.ne.jp": 2,
    "i121-115-22-33.s41.a013.ap.plala.or.jp": 1,
    "c-73-45-12-3.hsd1.ca.comcast.net": 1,
    "pool-71-112-34-5.nycmny.fios.verizon.net": 1,
    "ip68-100-20-3.ri.ri.cox.net": 1,
    "host86-150-12-3.range86-150.btcentralplus.com": 1,
    "24.34.5.6.dyn.example.com": 3,
    "123.45.67.89.broad.xx.js.dynamic.163data.com.cn": 3,
    "dhcp7.example.net": 6,
    "adsl2.example.org": 6,
    "ppp.1-2.example.net": None,  # not every odd name is caught: rule 6 needs a digit in the label
}
STATIC = [
    "mail.example.jp", "mx1.example.co.jp", "smtp.gmail.com", "mta7.am0.yahoodns.net",
    "mail.sakura.ne.jp", "out.mail.example.org", "mx01.nifty.com", "www3.example.com",
]


@pytest.mark.parametrize("name,rule", sorted(DYNAMIC.items()))
def test_dynamic_names_are_suspects(name, rule):
    got = dynamic_rule(name)
    if rule is None:
        assert got is None
    else:
        assert got is not None and got.startswith(f"rule {rule}:"), got


@pytest.mark.parametrize("name", STATIC)
def test_server_names_are_not(name):
    assert dynamic_rule(name) is None


def test_allow_list_names_domains_and_networks():
    allow = S25rAllow.parse([".google.com", "mail.partner.example", "192.0.2.0/24"])
    ip = ipaddress.ip_address("198.51.100.7")
    assert allow.allows(ip, "mail-ej1-f51.google.com")
    assert allow.allows(ip, "mail.partner.example") and not allow.allows(ip, "evil-mail.partner.example.net")
    assert allow.allows(ipaddress.ip_address("192.0.2.99"), None)
    assert not allow.allows(ip, None)


class FixedDns:
    def __init__(self, answers):
        self.answers = answers

    async def lookup(self, name, rdtype):
        return self.answers.get((name, rdtype), LookupResult("nxdomain"))


async def test_classify_needs_forward_confirmation_and_ignores_dns_failure():
    ip = ipaddress.ip_address("198.51.100.7")
    ptr = ("7.100.51.198.in-addr.arpa", "PTR")
    good = FixedDns({ptr: LookupResult("ok", ("mail.example.jp.",)),
                     ("mail.example.jp", "A"): LookupResult("ok", ("198.51.100.7",))})
    assert await S25rCheck(good, S25rAllow(), "reject").classify(ip) == ("mail.example.jp", "")
    liar = FixedDns({ptr: LookupResult("ok", ("mail.example.jp.",)),
                     ("mail.example.jp", "A"): LookupResult("ok", ("203.0.113.1",))})
    assert "does not resolve back" in (await S25rCheck(liar, S25rAllow(), "reject").classify(ip))[1]
    assert (await S25rCheck(FixedDns({}), S25rAllow(), "reject").classify(ip))[1] == "rule 0: no reverse DNS"
    down = FixedDns({ptr: LookupResult("timeout")})
    assert await S25rCheck(down, S25rAllow(), "reject").classify(ip) == (None, "")


# ---- greylisting's timing, with an injected clock ---------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def _txn(client: str, sender: str = "a@remote.example") -> Transaction:
    facts = SessionFacts("t", "mx", ipaddress.ip_address(client), trusted=False)
    return Transaction(facts, parse_path(f"<{sender}>", smtputf8=True))


RCPT = parse_path("<alice@example.test>", smtputf8=True)
SETTINGS = GreylistSettings(only_s25r=False, delay=300, expire=4 * 3600, ttl=36 * 86400)


async def test_greylisting_timing_across_a_restart(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "state.db")
    gl = Greylist(store, SETTINGS, clock)
    first = await gl.rcpt(_txn("203.0.113.5"), RCPT)
    assert first.reply is not None and first.reply.code == 451 and first.reply.status == "4.7.1"
    clock.now += 60
    early = await gl.rcpt(_txn("203.0.113.5"), RCPT)
    assert early.reply is not None and early.reply.code == 451 and "too early" in early.reason
    store.close()
    store = Store(tmp_path / "state.db")  # the server restarts: what it knew is still there
    gl = Greylist(store, SETTINGS, clock)
    clock.now += 300
    passed = await gl.rcpt(_txn("203.0.113.77"), RCPT)  # a neighbour in the same /24 retries
    assert passed.accepted and "passed" in passed.reason
    other = await gl.rcpt(_txn("203.0.113.9", sender="b@remote.example"),
                          parse_path("<bob@example.test>", smtputf8=True))
    assert other.accepted and "retried before" in other.reason  # the network is known now
    clock.now += 37 * 86400  # past the ttl: a stranger again
    again = await gl.rcpt(_txn("203.0.113.5"), RCPT)
    assert not again.accepted
    store.close()


async def test_a_retry_after_expire_starts_over_and_spf_pass_skips(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "state.db")
    gl = Greylist(store, SETTINGS, clock)
    assert not (await gl.rcpt(_txn("198.51.100.1"), RCPT)).accepted
    clock.now += 5 * 3600  # after expire
    late = await gl.rcpt(_txn("198.51.100.1"), RCPT)
    assert not late.accepted and "first attempt" in late.reason
    clock.now += 301
    assert (await gl.rcpt(_txn("198.51.100.1"), RCPT)).accepted
    spf = _txn("192.0.2.50")
    spf.results["spf"] = "pass"
    assert (await gl.rcpt(spf, RCPT)).accepted
    suspect_only = Greylist(store, GreylistSettings(only_s25r=True), clock)
    assert (await suspect_only.rcpt(_txn("192.0.2.60"), RCPT)).accepted  # not marked by S25R
    store.close()


async def test_dry_run_remembers_nothing(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "state.db")
    dry = Greylist(store, SETTINGS, clock, dry_run=True)
    d = await dry.rcpt(_txn("203.0.113.5"), RCPT)
    assert not d.accepted and "would be remembered" in d.reason
    assert store.greylist_entry(f"{client_network(ipaddress.ip_address('203.0.113.5'))} a@remote.example "
                                f"{RCPT.key}") is None
    store.close()


def test_ipv6_clients_are_grouped_by_64():
    assert client_network(ipaddress.ip_address("2001:db8:1:2:3::4")) == "2001:db8:1:2::/64"


# ---- end to end on port 25 ---------------------------------------------------------------------------


def _ptr(dns_server, ip: str, name: str, forward: str | None = None) -> None:
    dns_server.add(ipaddress.ip_address(ip).reverse_pointer, "PTR", name + ".")
    dns_server.add(name, "A", forward or ip)


def test_s25r_reject_answers_450_at_rcpt_but_postmaster_gets_through(make_server, dns_server):
    _ptr(dns_server, "127.1.0.61", "p1234-ipbf5607.dyn.example.jp")
    _ptr(dns_server, "127.1.0.62", "mail.good.example")
    srv = make_server(dnsbl={"zones": []}, s25r={"enabled": True, "action": "reject"})
    with RawSMTP(srv.port("mx"), source="127.1.0.61") as c:
        c.reply()
        c.cmd("EHLO p1234-ipbf5607.dyn.example.jp")
        assert c.cmd("MAIL FROM:<a@remote.example>")[0] == 250
        code, text = c.cmd("RCPT TO:<alice@example.test>")
        assert code == 450 and text[0].startswith("4.7.1") and "S25R rule 1" in text[0]
        assert c.cmd("RCPT TO:<postmaster@example.test>")[0] == 250
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), source_address=("127.1.0.62", 0), timeout=10) as s:
        assert s.sendmail("a@good.example", ["alice@example.test"], b"Subject: hi\r\n\r\nhi\r\n") == {}
    with RawSMTP(srv.port("mx"), source="127.1.0.63") as c:  # no reverse DNS at all
        c.reply()
        c.cmd("EHLO unknown.example")
        c.cmd("MAIL FROM:<a@remote.example>")
        code, text = c.cmd("RCPT TO:<alice@example.test>")
        assert code == 450 and "rule 0" in text[0]


def test_greylisting_end_to_end(make_server, dns_server):
    srv = make_server(dnsbl={"zones": []}, greylist={"enabled": True, "delay": "1s"})

    def attempt(client: str) -> int:
        with RawSMTP(srv.port("mx"), source=client) as c:
            c.reply()
            c.cmd("EHLO mail.remote.example")
            c.cmd("MAIL FROM:<a@remote.example>")
            code, _text = c.cmd("RCPT TO:<alice@example.test>")
            if code == 250:
                assert c.cmd("DATA")[0] == 354
                c.send(b"Subject: grey\r\n\r\nbody\r\n.\r\n")
                assert c.reply()[0] == 250
            c.cmd("QUIT")
            return code

    assert attempt("127.1.0.70") == 451
    assert attempt("127.1.0.70") == 451  # too early
    with RawSMTP(srv.port("mx"), source="127.1.0.71") as c:  # unknown users are refused first, not greylisted
        c.reply()
        c.cmd("EHLO x.example")
        c.cmd("MAIL FROM:<a@remote.example>")
        assert c.cmd("RCPT TO:<nobody@example.test>")[0] == 550
    time.sleep(1.2)
    assert attempt("127.1.0.70") == 250
    srv.wait_delivered("alice@example.test", 1)
    with RawSMTP(srv.port("mx"), source="127.0.0.70") as c:  # the LAN is never greylisted
        c.reply()
        c.cmd("EHLO pc.lan")
        c.cmd("MAIL FROM:<pc@example.test>")
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
