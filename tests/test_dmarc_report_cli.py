"""`yuubin dmarc report` on a state.db filled by the parser, with the test DNS server answering
reverse and MX lookups; and report mail arriving over a real socket."""

from __future__ import annotations

import json
import logging
import smtplib
import time

import pytest

from tests.dmarcreports import gz, report_mail, report_xml
from tests.harness import run_yuubin
from yuubin.mailauth.reports import ReportLimits, parse_xml
from yuubin.store import Store

NOW = int(time.time())
OURS = "192.0.2.10"  # the A record of our MX host in the test DNS
SPOOFER = "203.0.113.5"
ELSEWHERE_ROWS = [
    ("198.51.100.7", 5, "none", "pass", "fail", "example.test", ("example.test", "y1", "pass"),
     ("bounce.example.test", "fail")),
    (OURS, 40, "none", "pass", "pass", "example.test", ("example.test", "y1", "pass"), ("example.test", "pass")),
    (SPOOFER, 8, "quarantine", "fail", "fail", "example.test", None, ("evil.example", "softfail")),
]


@pytest.fixture
def filled(make_config, dns_server):
    """A config file and a state.db with three reports: two recent (two organisations, both
    formats), one from a month ago; DNS knows our MX, its address and two reverse names."""
    sc = make_config()
    path = sc.write()
    store = Store(sc.load().state_db)
    limits = ReportLimits()
    for xml in (report_xml(org="Big Mail Co", report_id="r-1", begin=NOW - 86400, end=NOW - 60),
                report_xml(fmt="rfc9990", org="Mailbox Inc", report_id="m-1", begin=NOW - 86400, end=NOW - 60,
                           rows=ELSEWHERE_ROWS),
                report_xml(org="Big Mail Co", report_id="r-old", domain="other.test", begin=NOW - 40 * 86400,
                           end=NOW - 39 * 86400, rows=[("192.0.2.99", 3, "none", "pass", "pass", "other.test", None,
                                                         ("other.test", "pass"))])):
        assert store.add_dmarc_report(parse_xml(xml, limits), time.time(), "Q")
    store.close()
    dns_server.add("example.test", "MX", "10 mx.test.example.")
    dns_server.add("mx.test.example", "A", OURS)
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "mx.test.example.")
    dns_server.add("5.113.0.203.in-addr.arpa", "PTR", "host5.bad.example.")
    return path


def test_text_report_per_organisation_and_source(filled):
    r = run_yuubin(["dmarc", "report"], config=filled)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("DMARC aggregate reports, last 7 days: 2 reports from 2 organisations, 203 messages "
                          "(38 failed DMARC)\n")
    big, inc = out.split("\n\nBig Mail Co  (1 report, ")[1].split("\n\nMailbox Inc  (1 report, ")
    assert "SOURCE IP" in big.splitlines()[1] and "REVERSE DNS" in big.splitlines()[1]
    ours = next(line for line in big.splitlines() if line.strip().startswith(OURS))
    assert ours.split()[:7] == [OURS, "120", "pass", "pass", "pass", "none", "mx.test.example"]
    assert ours.endswith("this server")
    spoof = next(line for line in big.splitlines() if line.strip().startswith(SPOOFER))
    assert spoof.split()[:7] == [SPOOFER, "30", "fail", "fail", "fail", "reject", "host5.bad.example"]
    assert "LIKELY SPOOFING: 30 failed DMARC as example.test" in spoof
    forwarded = next(line for line in inc.splitlines() if line.strip().startswith("198.51.100.7"))
    assert forwarded.split()[:6] == ["198.51.100.7", "5", "fail", "pass", "pass", "none"]  # DKIM aligned: passes
    assert "SPOOFING" not in forwarded and "this server" not in forwarded
    assert forwarded.split()[6] == "-"  # no PTR
    assert "192.0.2.99" not in out  # the month-old report
    assert "1 source sent mail as your domain without passing SPF or DKIM: 203.0.113.5." in out


def test_json_report(filled):
    r = run_yuubin(["dmarc", "report", "--json"], config=filled)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["days"] == 7 and data["domain"] is None
    orgs = {o["org_name"]: o for o in data["organisations"]}
    assert set(orgs) == {"Big Mail Co", "Mailbox Inc"}
    assert orgs["Big Mail Co"]["reports"] == ["r-1"]
    sources = {s["source_ip"]: s for s in orgs["Mailbox Inc"]["sources"]}
    assert list(sources) == [OURS, SPOOFER, "198.51.100.7"]  # most messages first
    assert sources[OURS] == {
        "source_ip": OURS, "messages": 40, "reverse_dns": "mx.test.example", "spf": {"pass": 40},
        "dkim": {"pass": 40}, "dmarc": {"pass": 40}, "disposition": {"none": 40},
        "header_from": {"example.test": 40}, "this_server": True, "likely_spoofing": False,
    }
    assert sources[SPOOFER]["likely_spoofing"] is True and sources[SPOOFER]["this_server"] is False
    assert sources[SPOOFER]["disposition"] == {"quarantine": 8}
    assert sources["198.51.100.7"]["reverse_dns"] is None  # no PTR


def test_days_and_domain_filters(filled):
    r = run_yuubin(["dmarc", "report", "--days", "60", "--domain", "other.test", "--json"], config=filled)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [o["reports"] for o in data["organisations"]] == [["r-old"]]
    assert [s["source_ip"] for s in data["organisations"][0]["sources"]] == ["192.0.2.99"]
    r = run_yuubin(["dmarc", "report", "--domain", "other.test"], config=filled)
    assert r.returncode == 0
    assert r.stdout.startswith("no DMARC aggregate reports about other.test in the last 7 days")


def test_bad_arguments_are_one_line_errors(filled):
    r = run_yuubin(["dmarc", "report", "--days", "0"], config=filled)
    assert r.returncode == 2 and r.stderr.startswith("yuubin: error: --days:")
    r = run_yuubin(["dmarc", "report", "--domain", "a b"], config=filled)
    assert r.returncode == 2 and "--domain" in r.stderr


def test_a_silent_nameserver_is_one_warning_and_the_report_still_prints(filled, dns_server):
    dns_server.set_behaviour("5.113.0.203.in-addr.arpa", "timeout")
    r = run_yuubin(["dmarc", "report"], config=filled)
    assert r.returncode == 0
    spoof = [line for line in r.stdout.splitlines() if line.strip().startswith(SPOOFER)]
    assert all("(no answer)" in line for line in spoof)
    assert r.stderr.count("warning: reverse DNS: no answer for 1 address") == 1
    assert "event=" not in r.stderr


# ---- over a real socket ----


def test_report_mail_over_smtp_is_delivered_to_postmaster_and_not_stored_without_dmarc(make_server, cached_hashes,
                                                                                      caplog):
    """Without a DMARC pass from the mx message stage the report is mail only, for postmaster."""
    srv = make_server()
    data = report_mail(gz(report_xml()), to="dmarc-reports@example.test")
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"), \
            smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="mta.report.example",
                         source_address=("127.1.0.9", 0), timeout=10) as c:
        c.sendmail("dmarc@report.example", ["dmarc-reports@example.test"], data)
    [msg] = srv.wait_delivered("postmaster@example.test", 1)
    assert b"Report Domain: example.test" in msg
    deadline = time.monotonic() + 5
    while "event=dmarc_report_ignored" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "dmarc=none" in caplog.text
    store = Store(srv.config.state_db)
    assert store.dmarc_rows(0) == []


REPORTER_IP = "127.1.0.20"  # the only host report.example's SPF allows


def _send_report(srv, source: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="mta.report.example",
                      source_address=(source, 0), timeout=10) as c:
        c.sendmail("dmarc@report.example", ["dmarc-reports@example.test"], data)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_report_passing_dmarc_is_stored_and_one_failing_is_mail_only(make_server, dns_server, cached_hashes,
                                                                       caplog):
    """The real mx check decides: SPF pass aligned with From: report.example (p=none) → DMARC pass →
    the report is in state.db and `dmarc report` shows it; the same report from a host SPF does
    not allow fails DMARC → delivered to postmaster, not stored."""
    dns_server.add("report.example", "TXT", f"v=spf1 ip4:{REPORTER_IP} -all")
    dns_server.add("_dmarc.report.example", "TXT", "v=DMARC1; p=none")
    dns_server.add("example.test", "MX", "10 mx.test.example.")
    dns_server.add("mx.test.example", "A", OURS)
    srv = make_server()
    caplog.set_level(logging.INFO, logger="yuubin")
    store = Store(srv.config.state_db)
    try:
        good = report_mail(gz(report_xml(report_id="good-1", begin=NOW - 86400, end=NOW - 60)))
        _send_report(srv, REPORTER_IP, good)
        _wait_for(lambda: "event=dmarc_report_stored" in caplog.text)
        assert {(r.report_id, r.source_ip, r.count) for r in store.dmarc_rows(0)} == {
            ("good-1", OURS, 120), ("good-1", SPOOFER, 30)}
        assert "from=report.example format=rfc7489" in caplog.text

        forged = report_mail(gz(report_xml(report_id="forged-1", begin=NOW - 86400, end=NOW - 60,
                                           rows=[("198.51.100.99", 999, "none", "pass", "pass", "example.test",
                                                  None, ("example.test", "pass"))])))
        _send_report(srv, "127.1.0.21", forged)
        _wait_for(lambda: "event=dmarc_report_ignored" in caplog.text)
        [ignored] = [r.getMessage() for r in caplog.records if "event=dmarc_report_ignored" in r.getMessage()]
        assert "dmarc=fail" in ignored
        assert {r.report_id for r in store.dmarc_rows(0)} == {"good-1"}
    finally:
        store.close()
    both = srv.wait_delivered("postmaster@example.test", 2)  # each is kept as mail all the same
    assert all(b"report.example!example.test!1700000000" in m for m in both)  # the attachment kept

    r = run_yuubin(["dmarc", "report", "--json"], config=srv.config_file())
    assert r.returncode == 0, r.stderr
    [org] = json.loads(r.stdout)["organisations"]
    assert org["reports"] == ["good-1"]
    sources = {s["source_ip"]: s for s in org["sources"]}
    assert sources[OURS]["this_server"] is True and sources[SPOOFER]["likely_spoofing"] is True
