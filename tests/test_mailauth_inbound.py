"""End to end: SPF, DKIM, DMARC and ARC on port 25, over real sockets, against the test DNS server.

The zone: sender.example (SPF allows 127.1.0.10 only, DMARC p=reject), soft.example (SPF
allows nobody, p=quarantine), signed.example (no SPF host, DMARC p=reject, an ed25519 DKIM key
the test signs with using dkimpy), lists.example (a mailing list that ARC-seals what it sends
on). Clients bound to 127.1.x.y are strangers and get checked; 127.0.x.y is the trusted LAN
and is not.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import time

import dkim
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.smtpclient import RawSMTP

ACCOUNTS = {"alice@example.test": "correct horse battery staple"}
ALICE = "alice@example.test"
GOOD_IP = "127.1.0.10"
HOST = "mx.test.example"
FORGED_AR = b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.example; dmarc=pass\r\n"


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """Port 25 never checks passwords: reuse the accounts' Argon2id hashes."""


@pytest.fixture
def signing_key(dns_server) -> bytes:
    key = nacl.signing.SigningKey.generate()
    public = key.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    dns_server.add("e1._domainkey.signed.example", "TXT", f"v=DKIM1; k=ed25519; p={public}")
    return key.encode(encoder=nacl.encoding.Base64Encoder)


@pytest.fixture
def srv(make_server, dns_server):
    dns_server.add("sender.example", "TXT", f"v=spf1 ip4:{GOOD_IP} -all")
    dns_server.add("_dmarc.sender.example", "TXT", "v=DMARC1; p=reject; rua=mailto:d@sender.example")
    dns_server.add("soft.example", "TXT", "v=spf1 -all")
    dns_server.add("_dmarc.soft.example", "TXT", "v=DMARC1; p=quarantine")
    dns_server.add("signed.example", "TXT", "v=spf1 -all")
    dns_server.add("_dmarc.signed.example", "TXT", "v=DMARC1; p=reject")
    return make_server(accounts=ACCOUNTS)


def message(from_: str, subject: str, extra: bytes = b"") -> bytes:
    return (f"From: {from_}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 05:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@test>\r\n").encode() + extra + b"\r\nHello.\r\n"


def send(srv, source: str, mail_from: str, data: bytes) -> tuple[int, str]:
    """One transaction; the reply to the end of DATA."""
    with RawSMTP(srv.port("mx"), source=source, timeout=10) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        code, text = c.cmd(f"MAIL FROM:<{mail_from}>")
        assert code == 250, text
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        code, text = c.reply()
        c.cmd("QUIT")
        return code, " ".join(text)


def header_lines(msg: bytes, name: bytes) -> list[bytes]:
    head = msg.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.replace(b"\r\n\t", b" ").split(b"\r\n") if line.lower().startswith(name.lower())]


def mailauth_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=mailauth" in r.getMessage()]


def test_spf_pass_aligned_delivers_with_our_one_header_and_the_forged_one_gone(srv, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    code, text = send(srv, GOOD_IP, "bob@sender.example", message("Bob <bob@sender.example>", "spf pass", FORGED_AR))
    assert code == 250, text
    (msg,) = srv.wait_delivered(ALICE, 1)
    (ar,) = header_lines(msg, b"Authentication-Results:")
    assert ar.startswith(b"Authentication-Results: mx.test.example;")
    assert b"spf=pass" in ar and b"smtp.mailfrom=bob@sender.example" in ar
    assert b"dmarc=pass" in ar and b"header.from=sender.example" in ar and b"policy.dmarc=reject" in ar
    assert b"bank.example" not in msg
    (line,) = mailauth_lines(caplog)
    assert "spf=pass" in line and "dmarc=pass" in line and "action=deliver" in line and GOOD_IP in line


def test_spf_fail_under_p_reject_is_refused_in_session(srv, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    code, text = send(srv, "127.1.0.11", "bob@sender.example", message("bob@sender.example", "spoof"))
    assert code == 550 and text.startswith("5.7.1 "), text
    assert "DMARC policy of sender.example" in text
    time.sleep(0.2)
    assert srv.delivered(ALICE) == [] and srv.queue_entries() == []
    (line,) = mailauth_lines(caplog)
    assert "spf=fail" in line and "dmarc=fail" in line and "action=reject" in line
    rejects = [r.getMessage() for r in caplog.records if "event=reject" in r.getMessage()]
    assert any("check=mailauth" in m and "stage=data" in m for m in rejects), rejects


def test_p_quarantine_lands_in_junk(srv):
    code, text = send(srv, "127.1.0.12", "news@soft.example", message("news@soft.example", "quarantined"))
    assert code == 250, text
    junk = srv.maildir(ALICE) / ".Junk" / "new"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (junk.exists() and list(junk.iterdir())):
        time.sleep(0.02)
    (path,) = list(junk.iterdir())
    assert b"dmarc=fail" in path.read_bytes() and b"policy.dmarc=quarantine" in path.read_bytes()
    assert srv.delivered(ALICE) == []


def test_a_stranger_using_our_domain_in_from_is_rejected(srv):
    # MAIL FROM is theirs and passes SPF; only From: claims example.test, which has no DMARC record.
    code, text = send(srv, GOOD_IP, "bob@sender.example", message("CEO <ceo@example.test>", "wire money"))
    assert code == 550 and "our domain example.test" in text, text
    time.sleep(0.2)
    assert srv.delivered(ALICE) == []


def test_an_aligned_dkim_signature_passes_dmarc_despite_spf_fail(srv, signing_key):
    data = message("Carol <carol@signed.example>", "signed")
    signature = dkim.sign(data, b"e1", b"signed.example", signing_key, signature_algorithm=b"ed25519-sha256",
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    code, text = send(srv, "127.1.0.13", "carol@signed.example", signature + data)
    assert code == 250, text
    (msg,) = srv.wait_delivered(ALICE, 1)
    (ar,) = header_lines(msg, b"Authentication-Results:")
    assert b"spf=fail" in ar and b"dkim=pass" in ar and b"header.d=signed.example header.s=e1" in ar
    assert b"dmarc=pass" in ar


def test_an_altered_signed_message_fails_dkim_and_is_rejected(srv, signing_key):
    data = message("Carol <carol@signed.example>", "signed")
    signature = dkim.sign(data, b"e1", b"signed.example", signing_key, signature_algorithm=b"ed25519-sha256")
    code, text = send(srv, "127.1.0.14", "carol@signed.example", signature + data.replace(b"Hello.", b"Pay now."))
    assert code == 550, text


def test_the_trusted_lan_is_not_checked(srv, dns_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    asked = len(dns_server.queries)
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="printer.lan", source_address=("127.0.0.5", 0),
                      timeout=10) as s:
        assert s.sendmail("bob@sender.example", [ALICE], message("bob@sender.example", "from the lan")) == {}
    (msg,) = srv.wait_delivered(ALICE, 1)
    assert header_lines(msg, b"Authentication-Results:") == []
    assert mailauth_lines(caplog) == []
    assert not [q for q in dns_server.queries[asked:] if "sender.example" in q[0]]


def _rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def list_copy(dns_server) -> bytes:
    """bob@sender.example's post as the list lists.example sends it on: its own envelope sender
    (SPF passes for lists.example, which does not align with From:), its ARC set on top."""
    pem, txt = _rsa_key()
    dns_server.add("arc._domainkey.lists.example", "TXT", txt)
    dns_server.add("lists.example", "TXT", "v=spf1 ip4:127.1.0.20 -all")
    post = message("Bob <bob@sender.example>", "list post")
    with_ar = b"Authentication-Results: lists.example; spf=pass smtp.mailfrom=sender.example\r\n" + post
    arc_set = dkim.arc_sign(with_ar, b"arc", b"lists.example", pem, b"lists.example",
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    assert arc_set
    return b"".join(arc_set) + with_ar


@pytest.mark.parametrize("trusted", [True, False])
def test_a_trusted_arc_sealer_overrides_a_dmarc_fail(make_server, dns_server, caplog, trusted):
    caplog.set_level(logging.INFO, logger="yuubin")
    dns_server.add("_dmarc.sender.example", "TXT", "v=DMARC1; p=reject")
    data = list_copy(dns_server)
    srv = make_server(accounts=ACCOUNTS, mailauth={"trusted_arc_sealers": ["lists.example"] if trusted else []})
    code, text = send(srv, "127.1.0.20", "list-bounces@lists.example", data)
    (line,) = mailauth_lines(caplog)
    assert "spf=pass" in line and "dmarc=fail" in line and "arc=pass" in line and "arc_sealer=lists.example" in line
    if not trusted:
        assert code == 550 and "DMARC policy of sender.example" in text, text
        return
    assert code == 250, text
    assert "action=deliver" in line and "overridden" in line
    (msg,) = srv.wait_delivered(ALICE, 1)
    ours = [h for h in header_lines(msg, b"Authentication-Results:") if h.startswith(b"Authentication-Results: "
                                                                                     b"mx.test.example;")]
    assert len(ours) == 1 and b"arc=pass" in ours[0] and b"dmarc=fail" in ours[0]
