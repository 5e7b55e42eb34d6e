"""End to end: DNSBL checks on port 25, against a real DNS server on loopback.

The server's resolver asks only the test DNS server (dns.timeout 0.5 s), and the test config
lists the zones zen.dnsbl.test and bl.dnsbl.test. A client bound to 127.1.x.y is untrusted and
gets checked; 127.0.x.y is in network.trusted and must never be looked up.
"""

from __future__ import annotations

import logging
import smtplib
import time

import pytest

from tests.smtpclient import RawSMTP

ZONES = ("zen.dnsbl.test", "bl.dnsbl.test")
ACCOUNTS = {"alice@example.test": "correct horse battery staple"}


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """Port 25 never checks passwords: reuse the accounts' Argon2id hashes."""


def rev(ip: str, zone: str) -> str:
    return ".".join(reversed(ip.split("."))) + "." + zone


def queried(dns_server, ip: str) -> list[tuple[str, str]]:
    prefix = ".".join(reversed(ip.split("."))) + "."
    return [q for q in dns_server.queries if q[0].startswith(prefix)]


def send_one(srv, source: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="client.remote.example",
                      source_address=(source, 0), timeout=10) as s:
        errors = s.sendmail("sender@remote.example", ["alice@example.test"],
                            f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        assert errors == {}


@pytest.mark.parametrize("zone", ZONES)
def test_listed_client_is_refused_at_connect_naming_the_list(make_server, dns_server, caplog, zone):
    caplog.set_level(logging.INFO, logger="yuubin")
    client = "127.1.0.2"
    dns_server.add(rev(client, zone), "A", "127.0.0.2")
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=client) as c:
        code, text = c.reply()
        assert code == 554 and text[0].startswith("5.7.1 "), text
        assert zone in " ".join(text)
        # Only QUIT works; a pipelined transaction is not executed: every line (8) gets a 5xx.
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: spam\r\n\r\nspam\r\n.\r\n")
        codes = [c.reply()[0] for _ in range(8)]
        assert all(500 <= code < 600 for code in codes), codes
        assert c.cmd("QUIT")[0] == 221
        assert c.closed_by_peer()
    time.sleep(0.2)
    assert srv.delivered("alice@example.test") == []
    assert list((srv.config.data_dir / "spool" / "queue").iterdir()) == []
    rejects = [r.getMessage() for r in caplog.records if "event=reject" in r.getMessage()]
    assert any("check=dnsbl" in m and zone in m and client in m for m in rejects), rejects


def test_smtplib_sees_the_refusal_as_a_connect_error(make_server, dns_server):
    client = "127.1.0.3"
    dns_server.add(rev(client, "zen.dnsbl.test"), "A", "127.0.0.4")
    srv = make_server(accounts=ACCOUNTS)
    with pytest.raises(smtplib.SMTPConnectError) as err:
        smtplib.SMTP("127.0.0.1", srv.port("mx"), source_address=(client, 0), timeout=10)
    assert err.value.smtp_code == 554
    assert b"zen.dnsbl.test" in err.value.smtp_error


def test_unlisted_untrusted_client_is_checked_and_accepted(make_server, dns_server):
    client = "127.1.0.4"
    srv = make_server(accounts=ACCOUNTS)
    send_one(srv, client, "clean")
    srv.wait_delivered("alice@example.test", 1)
    names = {q[0] for q in queried(dns_server, client)}
    assert names == {rev(client, z) for z in ZONES}


@pytest.mark.parametrize("code", ["127.255.255.254", "127.255.255.252", "127.255.255.255", "127.255.255.1",
                                  "10.20.30.40"])
def test_error_code_answer_is_not_a_listing_and_warns_once(make_server, dns_server, caplog, code):
    caplog.set_level(logging.INFO, logger="yuubin.policy.dnsbl")
    first, second = "127.1.0.5", "127.1.0.6"
    for client in (first, second):
        dns_server.add(rev(client, "zen.dnsbl.test"), "A", code)
    srv = make_server(accounts=ACCOUNTS)
    send_one(srv, first, "one")
    send_one(srv, second, "two")
    srv.wait_delivered("alice@example.test", 2)
    warnings = [r for r in caplog.records
                if r.name == "yuubin.policy.dnsbl" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one per zone per hour, not per client
    text = warnings[0].getMessage()
    assert "zen.dnsbl.test" in text and code in text
    if code == "127.255.255.254":
        assert "resolver" in text


def test_error_code_on_one_zone_does_not_hide_a_listing_on_another(make_server, dns_server):
    client = "127.1.0.7"
    dns_server.add(rev(client, "zen.dnsbl.test"), "A", "127.255.255.254")
    dns_server.add(rev(client, "bl.dnsbl.test"), "A", "127.0.0.2")
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=client) as c:
        code, text = c.reply()
        assert code == 554 and "bl.dnsbl.test" in text[0], text


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_failing_zone_is_skipped_within_the_dns_timeout(make_server, dns_server, caplog, behaviour):
    caplog.set_level(logging.INFO, logger="yuubin.policy.dnsbl")
    client = "127.1.0.8"
    dns_server.set_behaviour(rev(client, "zen.dnsbl.test"), behaviour)
    srv = make_server(accounts=ACCOUNTS)
    assert srv.config.dns.timeout == 0.5
    t0 = time.monotonic()
    with RawSMTP(srv.port("mx"), source=client) as c:
        code, _ = c.reply()
        elapsed = time.monotonic() - t0
        assert code == 220
        assert c.cmd("QUIT")[0] == 221
    assert elapsed < 0.5 + 0.7, elapsed
    send_one(srv, client, "after a dnsbl failure")
    srv.wait_delivered("alice@example.test", 1)
    skips = [r.getMessage() for r in caplog.records if "dnsbl_skip" in r.getMessage()]
    assert any("zen.dnsbl.test" in m for m in skips), skips


def test_all_zones_timing_out_delays_the_session_only_once(make_server, dns_server):
    client = "127.1.0.9"
    for zone in ZONES:
        dns_server.set_behaviour(rev(client, zone), "timeout")
    srv = make_server(accounts=ACCOUNTS)
    t0 = time.monotonic()
    with RawSMTP(srv.port("mx"), source=client) as c:
        assert c.reply()[0] == 220
    assert time.monotonic() - t0 < 0.5 + 0.7  # zones are queried concurrently, not one after another


def test_listing_on_a_live_zone_counts_while_the_other_times_out(make_server, dns_server):
    client = "127.1.0.10"
    dns_server.set_behaviour(rev(client, "zen.dnsbl.test"), "timeout")
    dns_server.add(rev(client, "bl.dnsbl.test"), "A", "127.0.0.2")
    srv = make_server(accounts=ACCOUNTS)
    t0 = time.monotonic()
    with RawSMTP(srv.port("mx"), source=client) as c:
        code, text = c.reply()
    assert code == 554 and "bl.dnsbl.test" in text[0], text
    assert time.monotonic() - t0 < 0.5 + 0.7


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.5.1"])
def test_trusted_client_is_never_looked_up(make_server, dns_server, client):
    for zone in ZONES:
        dns_server.add(rev(client, zone), "A", "127.0.0.2")
    srv = make_server(accounts=ACCOUNTS)
    send_one(srv, client, "from the lan")
    srv.wait_delivered("alice@example.test", 1)
    assert queried(dns_server, client) == []
    assert not any(q[0].endswith("dnsbl.test") for q in dns_server.queries), dns_server.queries


def test_answers_are_cached(make_server, dns_server):
    listed, clean = "127.1.0.11", "127.1.0.12"
    dns_server.add(rev(listed, "zen.dnsbl.test"), "A", "127.0.0.2", ttl=300)
    srv = make_server(accounts=ACCOUNTS)
    for _ in range(3):
        with RawSMTP(srv.port("mx"), source=listed) as c:
            assert c.reply()[0] == 554
        with RawSMTP(srv.port("mx"), source=clean) as c:
            assert c.reply()[0] == 220
            c.cmd("QUIT")
    assert sorted(queried(dns_server, listed)) == sorted((rev(listed, z), "A") for z in ZONES)
    assert sorted(queried(dns_server, clean)) == sorted((rev(clean, z), "A") for z in ZONES)


def test_cached_answer_expires_with_its_ttl(make_server, dns_server):
    client = "127.1.0.13"
    dns_server.add(rev(client, "zen.dnsbl.test"), "A", "127.0.0.2", ttl=1)
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=client) as c:
        assert c.reply()[0] == 554
    dns_server.clear()  # delisted
    with RawSMTP(srv.port("mx"), source=client) as c:
        assert c.reply()[0] == 554  # still cached
    time.sleep(1.3)
    with RawSMTP(srv.port("mx"), source=client) as c:
        assert c.reply()[0] == 220  # the listing expired with its TTL
        c.cmd("QUIT")
