"""DMARC aggregate reports: the parser against both formats and hostile input, the capture hook
with given stage results, the report address in the Directory, and the state.db table.

The `yuubin dmarc report` command and capture over a real socket are in test_dmarc_report_cli.py.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import struct
import zipfile
from pathlib import Path

import pytest

from tests.dmarcreports import gz, report_mail, report_xml, zipped
from yuubin.auth.accounts import Directory
from yuubin.mailauth.capture import ReportCapture
from yuubin.mailauth.reports import (
    NS_DMARC2,
    ReportError,
    ReportLimits,
    parse_attachment,
    parse_report_mail,
    parse_xml,
)
from yuubin.smtp.address import parse_path
from yuubin.store import Store

LIMITS = ReportLimits()


def reasons(data: bytes, limits: ReportLimits = LIMITS) -> list[str]:
    outcome = parse_report_mail(data, limits)
    assert not outcome.reports
    return [e.reason for _name, e in outcome.rejected]


# ---- the two formats ----


def test_an_rfc7489_report_is_read_whole():
    r = parse_xml(report_xml(), LIMITS)
    assert r.format == "rfc7489"
    assert (r.org_name, r.email, r.report_id) == ("Big Mail Co", "dmarc@report.example", "r-1")
    assert (r.begin, r.end) == (1_700_000_000, 1_700_086_399)
    assert r.policy.domain == "example.test"
    assert r.policy.text() == "p=quarantine sp=none adkim=r aspf=r pct=100"
    assert [(w.source_ip, w.count, w.disposition, w.dkim, w.spf, w.dmarc) for w in r.rows] == [
        ("192.0.2.10", 120, "none", "pass", "pass", "pass"),
        ("203.0.113.5", 30, "reject", "fail", "fail", "fail"),
    ]
    good, bad = r.rows
    assert good.header_from == good.envelope_from == "example.test"
    assert [(a.method, a.domain, a.result, a.selector, a.scope) for a in good.auth] == [
        ("dkim", "example.test", "pass", "y1", ""), ("spf", "example.test", "pass", "", "mfrom")]
    assert [(a.method, a.domain, a.result) for a in bad.auth] == [("spf", "evil.example", "fail")]
    assert r.messages == 150


def test_an_rfc9990_report_with_its_namespace_new_tags_and_extensions():
    xml = report_xml(fmt="rfc9990")
    assert NS_DMARC2.encode() in xml
    r = parse_xml(xml, LIMITS)
    assert r.format == "rfc9990"
    assert r.policy.text() == "p=reject sp=quarantine np=reject adkim=r aspf=r testing=n discovery_method=treewalk"
    assert [w.source_ip for w in r.rows] == ["192.0.2.10", "203.0.113.5"]  # the <extension> is not a record
    assert r.messages == 150


def test_the_draft_namespace_of_rfc7489_reporters_is_read_too():
    xml = report_xml().replace(b"<feedback>", b'<feedback xmlns="http://dmarc.org/dmarc-xml/0.1">')
    assert parse_xml(xml, LIMITS).format == "rfc7489"


def test_ipv6_sources_are_normalised():
    xml = report_xml(rows=[("2001:DB8:0:0::1", 3, "none", "pass", "fail", "example.test", None,
                            ("example.test", "pass"))])
    assert parse_xml(xml, LIMITS).rows[0].source_ip == "2001:db8::1"


# ---- attachments: gzip, zip, plain XML, octet-stream by name ----


@pytest.mark.parametrize(("payload", "content_type", "filename"), [
    (gz(report_xml()), "application/gzip", "r!example.test!1!2.xml.gz"),
    (zipped(("r.xml", report_xml())), "application/zip", "r!example.test!1!2.zip"),
    (report_xml(), "text/xml", "r!example.test!1!2.xml"),
    (report_xml(fmt="rfc9990"), "application/xml", "r.xml"),
    (gz(report_xml()), "application/octet-stream", "r!example.test!1!2.xml.gz"),
    (zipped(("r.xml", report_xml())), "application/octet-stream", "r.zip"),
    (report_xml(), "application/octet-stream", "r.xml"),
])
def test_a_report_mail_gives_its_report(payload, content_type, filename):
    outcome = parse_report_mail(report_mail(payload, content_type=content_type, filename=filename), LIMITS)
    assert outcome.rejected == ()
    assert len(outcome.reports) == 1
    assert outcome.reports[0].messages == 150


def test_a_mail_without_a_report_says_so():
    assert reasons(report_mail(b"hello", content_type="text/plain", filename="note.txt")) == ["no_report_attachment"]


def test_declared_gzip_that_is_not_gzip():
    assert reasons(report_mail(b"not gzip at all")) == ["bad_archive"]


def test_a_truncated_gzip():
    assert reasons(report_mail(gz(report_xml())[:-20])) == ["bad_archive"]


# ---- hostile input ----


def test_malformed_xml():
    assert reasons(report_mail(report_xml()[:-40], content_type="text/xml", filename="r.xml")) == ["xml_malformed"]


def test_xml_that_is_not_a_report():
    xml = b"<?xml version='1.0'?><html><body>hi</body></html>"
    assert reasons(report_mail(xml, content_type="text/xml", filename="r.xml")) == ["not_a_report"]


def test_a_report_missing_what_it_must_have():
    xml = report_xml().replace(b"<report_id>r-1</report_id>", b"")
    with pytest.raises(ReportError) as e:
        parse_xml(xml, LIMITS)
    assert (e.value.reason, e.value.detail) == ("missing_field", "report_metadata/report_id")


def test_a_source_ip_that_is_not_an_address():
    xml = report_xml().replace(b"192.0.2.10", b"192.0.2.999")
    with pytest.raises(ReportError) as e:
        parse_xml(xml, LIMITS)
    assert e.value.reason == "bad_value"


def test_billion_laughs_is_refused_without_expanding():
    lol = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
           + b"".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
                      for i in range(1, 10))
           + b"]>\n<feedback>&lol9;</feedback>\n")
    assert reasons(report_mail(lol, content_type="text/xml", filename="r.xml")) == ["xml_dtd"]
    assert reasons(report_mail(gz(lol))) == ["xml_dtd"]


def test_an_external_entity_is_refused():
    xxe = (b'<?xml version="1.0"?><!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           b"<feedback>&x;</feedback>")
    assert reasons(report_mail(xxe, content_type="text/xml", filename="r.xml")) == ["xml_dtd"]


def test_a_gzip_bomb_stops_at_the_ratio_while_decompressing():
    bomb = gz(b"<feedback>" + b" " * 200_000_000)  # 200 MB of XML from ~200 KB
    assert len(bomb) < 300_000
    outcome = parse_report_mail(report_mail(bomb), LIMITS)
    [(_name, error)] = outcome.rejected
    assert error.reason == "compression_ratio"
    assert "so far" in error.detail  # stopped part way, never read whole


def test_decompressed_size_cap():
    xml = report_xml()
    limits = ReportLimits(max_xml=len(xml) - 1, max_ratio=10_000)
    assert reasons(report_mail(gz(xml)), limits) == ["decompressed_too_large"]
    assert reasons(report_mail(xml, content_type="text/xml", filename="r.xml"), limits) == ["decompressed_too_large"]
    assert reasons(report_mail(zipped(("r.xml", xml)), content_type="application/zip", filename="r.zip"),
                   limits) == ["decompressed_too_large"]


def test_a_zip_bomb_with_a_high_ratio():
    bomb = zipped(("r.xml", b"<feedback>" + b" " * 40_000_000))  # under max_xml, ~1000:1
    assert reasons(report_mail(bomb, content_type="application/zip", filename="r.zip")) == ["compression_ratio"]


def _lying_zip(declared: int) -> bytes:
    """A small zip whose headers declare `declared` bytes for its one member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("r.xml", b"<feedback/>")
    raw = bytearray(buf.getvalue())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size in both headers
        at = raw.find(sig)
        struct.pack_into("<I", raw, at + offset, declared)
    return bytes(raw)


def test_a_zip_declaring_a_huge_size_is_refused_before_reading():
    huge = _lying_zip(4_000_000_000)
    assert zipfile.ZipFile(io.BytesIO(huge)).infolist()[0].file_size == 4_000_000_000
    assert reasons(report_mail(huge, content_type="application/zip", filename="r.zip")) == ["decompressed_too_large"]


def test_a_zip_with_two_members():
    two = zipped(("a.xml", report_xml()), ("b.xml", report_xml(report_id="r-2")))
    assert reasons(report_mail(two, content_type="application/zip", filename="r.zip")) == ["zip_members"]


def test_a_zip_whose_member_is_not_xml():
    nested = zipped(("inner.zip", zipped(("r.xml", report_xml()))))
    assert reasons(report_mail(nested, content_type="application/zip", filename="r.zip")) == ["zip_members"]


def test_an_oversized_attachment_is_not_even_decompressed():
    payload = gz(report_xml())
    limits = ReportLimits(max_attachment=len(payload) - 1)
    assert reasons(report_mail(payload), limits) == ["attachment_too_large"]


def test_too_many_records():
    rows = [(f"192.0.2.{i}", 1, "none", "pass", "pass", "example.test", None, ("example.test", "pass"))
            for i in range(1, 12)]
    assert parse_xml(report_xml(rows=rows), ReportLimits(max_records=11)).messages == 11
    with pytest.raises(ReportError) as e:
        parse_xml(report_xml(rows=rows), ReportLimits(max_records=10))
    assert e.value.reason == "too_many_records"


def test_one_bad_attachment_does_not_hide_a_good_one():
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"] = "a@report.example"
    msg.set_content("two reports")
    msg.add_attachment(b"junk", maintype="application", subtype="gzip", filename="bad.xml.gz")
    msg.add_attachment(gz(report_xml()), maintype="application", subtype="gzip", filename="good.xml.gz")
    outcome = parse_report_mail(bytes(msg), LIMITS)
    assert len(outcome.reports) == 1
    assert [(n, e.reason) for n, e in outcome.rejected] == [("bad.xml.gz", "bad_archive")]


def test_parse_attachment_trusts_the_bytes_over_the_name():
    assert parse_attachment(gz(report_xml()), "xml", LIMITS).messages == 150
    with pytest.raises(ReportError):
        parse_attachment(report_xml(), "zip", LIMITS)


def test_garbage_never_raises():
    for data in (b"", b"\x00" * 100, b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
                 report_mail(gzip.compress(b"\xff\xfe" * 100))):
        outcome = parse_report_mail(data, LIMITS)
        assert outcome.reports == ()
        assert outcome.rejected


# ---- the report address in the Directory ----


def _address(text: str):
    return parse_path(f"<{text}>", smtputf8=True)


def test_the_report_address_exists_at_each_local_domain_and_goes_to_postmaster(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    d = Directory(store, ("example.test", "other.test"), "postmaster@example.test")
    for text in ("dmarc-reports@example.test", "DMARC-Reports@other.test", "dmarc-reports+x@example.test"):
        res = d.resolve(_address(text))
        assert res is not None and res.mailboxes == ["postmaster@example.test"], text
    assert d.resolve(_address("dmarc@example.test")) is None
    custom = Directory(store, ("example.test",), "postmaster@example.test", report_address="rua")
    assert custom.resolve(_address("rua@example.test")).mailboxes == ["postmaster@example.test"]
    assert custom.resolve(_address("dmarc-reports@example.test")) is None


def test_an_account_or_alias_with_that_name_takes_the_report_address(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    store.add_account("dmarc-reports@example.test", "x")
    store.add_alias("dmarc-reports@other.test", ["alice@example.test"])
    store.add_account("alice@example.test", "x")
    d = Directory(store, ("example.test", "other.test"), "postmaster@example.test")
    assert d.resolve(_address("dmarc-reports@example.test")).mailboxes == ["dmarc-reports@example.test"]
    assert d.resolve(_address("dmarc-reports@other.test")).mailboxes == ["alice@example.test"]


# ---- the capture hook, with given stage results ----


class Capture:
    def __init__(self, root: Path, **kw):
        self.store = Store(root / "state.db")
        self.capture = ReportCapture(self.store, ("example.test", "other.test"), "dmarc-reports",
                                     kw.pop("limits", LIMITS), clock=lambda: 1_800_000_000.0, **kw)

    async def deliver(self, data: bytes, results: dict[str, str], to: str = "dmarc-reports@example.test",
                      qid: str = "Q1") -> None:
        self.capture.stored(qid, [to], data, results)
        await self.capture.drain(timeout=30)

    def rows(self):
        return self.store.dmarc_rows(0)


PASS = {"dmarc": "pass", "dmarc.domain": "report.example"}


async def test_a_report_whose_mail_passed_dmarc_is_stored(tmp_path: Path, caplog):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(gz(report_xml())), PASS)
    rows = c.rows()
    assert [(r.org_name, r.report_id, r.policy_domain, r.source_ip, r.count, r.dkim, r.spf, r.disposition)
            for r in rows] == [
        ("Big Mail Co", "r-1", "example.test", "192.0.2.10", 120, "pass", "pass", "none"),
        ("Big Mail Co", "r-1", "example.test", "203.0.113.5", 30, "fail", "fail", "reject"),
    ]
    assert rows[0].auth == "dkim=pass d=example.test s=y1; spf=pass d=example.test"
    assert 'event=dmarc_report_stored id=Q1 org="Big Mail Co" report_id="r-1" domain=example.test ' \
           "from=report.example format=rfc7489" in caplog.text
    assert "rows=2 messages=150" in caplog.text


@pytest.mark.parametrize("dmarc", ["fail", "none", "temperror", "permerror", None])
async def test_a_report_whose_mail_did_not_pass_dmarc_is_not_stored(tmp_path: Path, caplog, dmarc):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(gz(report_xml())), {"dmarc": dmarc} if dmarc else {})
    assert c.rows() == []
    assert f"event=dmarc_report_ignored id=Q1 dmarc={dmarc or 'none'}" in caplog.text


async def test_mail_to_other_recipients_is_not_looked_at(tmp_path: Path, caplog):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(gz(report_xml())), PASS, to="alice@example.test")
        await c.deliver(report_mail(gz(report_xml())), PASS, to="dmarc-reports@remote.example")
    assert c.rows() == []
    assert "dmarc_report" not in caplog.text


@pytest.mark.parametrize(("payload", "reason"), [
    (gz(b"<feedback>" + b" " * 50_000_000), "compression_ratio"),
    (gz(b"<!DOCTYPE x [<!ENTITY a 'a'>]><feedback>&a;</feedback>"), "xml_dtd"),
    (gz(report_xml()[:-30]), "xml_malformed"),
    (b"\x1f\x8bnot really", "bad_archive"),
])
async def test_a_refused_report_is_logged_with_its_reason_and_not_stored(tmp_path: Path, caplog, payload, reason):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(payload, filename="bad.xml.gz"), PASS)
    assert c.rows() == []
    assert (f'event=dmarc_report_rejected id=Q1 attachment="bad.xml.gz" reason={reason} ') in caplog.text
    assert 'effect="delivered as mail, not stored"' in caplog.text


async def test_a_report_about_someone_elses_domain_is_not_stored(tmp_path: Path, caplog):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(gz(report_xml(domain="elsewhere.example"))), PASS)
    assert c.rows() == []
    assert "reason=foreign_domain" in caplog.text


async def test_a_report_about_a_subdomain_is_ours(tmp_path: Path):
    c = Capture(tmp_path)
    await c.deliver(report_mail(gz(report_xml(domain="news.other.test"))), PASS)
    assert {r.policy_domain for r in c.rows()} == {"news.other.test"}


async def test_a_report_sent_twice_is_stored_once(tmp_path: Path, caplog):
    c = Capture(tmp_path)
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        await c.deliver(report_mail(gz(report_xml())), PASS, qid="Q1")
        await c.deliver(report_mail(gz(report_xml())), PASS, qid="Q2")
    assert len(c.rows()) == 2
    assert "event=dmarc_report_duplicate id=Q2" in caplog.text


async def test_the_hook_returns_before_parsing_and_parsing_runs_off_the_loop(tmp_path: Path, monkeypatch):
    import threading

    from yuubin.mailauth import capture as capture_module
    seen: list[str] = []
    real = capture_module.parse_report_mail

    def parse(data, limits):
        seen.append(threading.current_thread().name)
        return real(data, limits)

    monkeypatch.setattr(capture_module, "parse_report_mail", parse)
    c = Capture(tmp_path)
    c.capture.stored("Q1", ["dmarc-reports@example.test"], report_mail(gz(report_xml())), PASS)
    assert seen == [] and c.rows() == []  # nothing done yet: the 250 is not held up
    await c.capture.drain(timeout=30)
    assert len(seen) == 1 and seen[0] != threading.current_thread().name
    assert len(c.rows()) == 2


async def test_past_the_queue_a_report_is_only_delivered(tmp_path: Path, caplog, monkeypatch):
    from yuubin.mailauth import capture as capture_module
    gate = asyncio.Event()
    real = capture_module.parse_report_mail
    loop = asyncio.get_running_loop()

    def slow(data, limits):
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
        return real(data, limits)

    monkeypatch.setattr(capture_module, "parse_report_mail", slow)
    c = Capture(tmp_path, parsers=1, queue=2)
    mails = [report_mail(gz(report_xml(report_id=f"r-{i}"))) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="yuubin.mailauth"):
        for i, data in enumerate(mails):
            c.capture.stored(f"Q{i}", ["dmarc-reports@example.test"], data, PASS)
        gate.set()
        await c.capture.drain(timeout=30)
    assert {r.report_id for r in c.rows()} == {"r-0", "r-1"}
    assert "event=dmarc_report_rejected id=Q2 reason=busy" in caplog.text


# ---- [mailauth] report keys ----


def _config(**mailauth):
    from yuubin.config import from_dict
    return from_dict({"hostname": "mx.example.test", "domains": {"local": ["example.test"]},
                      "mailauth": mailauth})


def test_mailauth_report_keys_and_their_defaults():
    from yuubin.config import describe
    d = _config().mailauth
    assert (d.report_address, d.report_max_ratio, d.report_parsers) == ("dmarc-reports", 100, 2)
    c = _config(report_address="RUA", report_max_xml=1000, report_max_records=5, report_queue=3).mailauth
    assert (c.report_address, c.report_max_xml, c.report_max_records, c.report_queue) == ("rua", 1000, 5, 3)
    assert 'report_address = "dmarc-reports"' in describe(_config())


@pytest.mark.parametrize(("key", "value", "message"), [
    ("report_address", "dmarc@example.test", "mailauth.report_address: expected a local part"),
    ("report_address", "a+b", "mailauth.report_address: expected a local part"),
    ("report_address", "../x", "mailauth.report_address: expected a local part"),
    ("report_max_ratio", 0, "mailauth.report_max_ratio: must be a positive integer"),
    ("report_parser", 2, "mailauth.report_parser: unknown key (did you mean report_parsers?)"),
])
def test_mailauth_report_keys_are_checked(key, value, message):
    from yuubin.config import ConfigError
    with pytest.raises(ConfigError) as e:
        _config(**{key: value})
    assert str(e.value).startswith(message)


def test_a_record_stuffed_with_elements_is_refused_before_its_tree_grows():
    def stuffed(n: int) -> bytes:
        dkims = b"<dkim><domain>x</domain><result>none</result></dkim>" * n
        return report_xml().replace(b"</auth_results></record>", dkims + b"</auth_results></record>", 1)

    with pytest.raises(ReportError) as e:
        parse_xml(stuffed(1000), LIMITS)
    assert e.value.reason == "too_many_elements"
    auth = parse_xml(stuffed(300), LIMITS).rows[0].auth
    assert [a.method for a in auth] == ["dkim"] * 100 + ["spf"]  # DKIM results kept up to 100 (RFC 9990)
