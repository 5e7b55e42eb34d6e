"""Authentication-Results (RFC 8601): the header we write and the forged ones we recognise."""

from __future__ import annotations

import pytest

from yuubin.mailauth.results import ArcSummary, DkimSummary, authentication_results, authserv_of, claims_authserv

HOST = "mx.test.example"


def test_one_header_with_every_method():
    h = authentication_results(
        HOST, spf=("pass", "mailfrom", "bob@sender.example", "192.0.2.1 matched ip4 of sender.example"),
        dkim=[DkimSummary("pass", "sender.example", "sel1", "abcdefghijkl"),
              DkimSummary("fail", "other.example", "s2", "mnopqrstuvwx", "body hash mismatch")],
        dmarc=("pass", "sender.example", "reject", "aligned SPF"),
        arc=ArcSummary("none"))
    assert h.endswith(b"\r\n") and h.count(b"\r\n") == 6  # folded: one result per line
    text = h.decode()
    assert text.startswith("Authentication-Results: mx.test.example;\r\n\tspf=pass")
    assert "smtp.mailfrom=bob@sender.example" in text
    assert "dkim=pass header.d=sender.example header.s=sel1 header.b=abcdefghijkl" in text
    assert "dkim=fail (body hash mismatch) header.d=other.example" in text
    assert "dmarc=pass (aligned SPF) header.from=sender.example policy.dmarc=reject" in text
    assert text.rstrip().endswith("arc=none")
    assert authserv_of(h) == HOST


def test_helo_identity_no_signatures_and_hostile_text():
    h = authentication_results(HOST, spf=("none", "helo", "client example", "no (SPF)\r\nrecord"), dkim=[],
                               dmarc=("none", "", "none", ""), arc=None).decode()
    assert 'smtp.helo="client example"' in h
    assert "(no SPF record)" in h  # parentheses and line breaks of the reason are neutralised
    assert "dkim=none" in h and "policy.dmarc" not in h and "\tarc=" not in h
    assert "\r\n" not in h.replace(";\r\n\t", "").rstrip("\r\n")


@pytest.mark.parametrize(("field", "ours"), [
    (b"Authentication-Results: mx.test.example; spf=pass\r\n", True),
    (b"Authentication-Results: MX.TEST.EXAMPLE.; spf=pass\r\n", True),
    (b"Authentication-Results:   (forged) mx.test.example 1; dkim=pass\r\n", True),
    (b"Authentication-Results:\r\n mx.test.example;\r\n\tdkim=pass\r\n", True),
    (b"authentication-results: mx.test.example;none\r\n", True),
    (b"Authentication-Results: mx.test.example.evil; spf=pass\r\n", False),
    (b"Authentication-Results: other.example; spf=pass smtp.mailfrom=mx.test.example\r\n", False),
])
def test_claims_authserv(field, ours):
    name = field.split(b":", 1)[0].decode().lower()
    assert claims_authserv(HOST)(name, field) is ours


def test_only_authentication_results_fields_are_claimed():
    assert not claims_authserv(HOST)("arc-authentication-results", b"ARC-Authentication-Results: i=1; "
                                                                   b"mx.test.example; spf=pass\r\n")
