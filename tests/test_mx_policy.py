"""End to end: the port-25 policy over real sockets (smtplib, aiosmtplib, raw bytes) and real TLS.

The server runs in a thread of this process (tests/harness.py). Clients bound to
127.0.x.y are in `network.trusted` (the LAN); clients bound to 127.1.x.y and above are "the
internet".
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import os
import re
import smtplib
import socket
import ssl
import time

import aiosmtplib
import pytest

from tests.smtpclient import RawSMTP

TRUSTED = "127.0.3.1"  # inside 127.0.0.0/16
UNTRUSTED = "127.1.0.1"
SENDER = "sender@remote.example"

ACCOUNTS = {
    "alice@example.test": "correct horse battery staple",
    "bob@example.test": "bob's long password 42",
    "admin@example.test": "the admin's own password 7",
}
POSTMASTER = {"postmaster": "admin@example.test"}

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """Port 25 never checks passwords: reuse the accounts' Argon2id hashes."""


def connect(srv, source: str = UNTRUSTED, host: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP(host, srv.port("mx"), local_hostname="client.remote.example",
                        source_address=(source, 0), timeout=10)


def message(subject: str = "hello", body: str = "Hi there.\r\n") -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@remote.example>\r\n\r\n{body}").encode()


def headers(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def spool_entries(srv) -> list[bytes]:
    q = srv.config.data_dir / "spool" / "queue"
    return [p.read_bytes() for p in sorted(q.iterdir())] if q.exists() else []


def spool_envelope(raw: bytes) -> dict:
    first, _, _ = raw.partition(b"\n")
    return json.loads(first[first.index(b"{"):])


def all_maildirs(srv) -> list[str]:
    root = srv.config.mail_dir
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


# ---- local recipients: accepted and delivered, trusted or not ------------------------------


@pytest.mark.parametrize("source", [TRUSTED, UNTRUSTED])
def test_local_user_is_delivered_with_trace_headers(make_server, source):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, source) as s:
        assert s.ehlo()[0] == 250
        assert s.mail(SENDER) == (250, b"2.1.0 sender OK")
        code, text = s.rcpt("alice@example.test")
        assert (code, text[:5]) == (250, b"2.1.5")
        body = "Hi there.\r\n.leading dot survives dot-stuffing\r\n"
        code, text = s.data(message("plain", body))
        assert code == 250 and text.startswith(b"2.0.0 "), text
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    lines = raw.split(b"\r\n")
    assert lines[0] == f"Return-Path: <{SENDER}>".encode()
    assert lines[1] == b"Delivered-To: alice@example.test"
    assert lines[2].startswith(b"Received: from client.remote.example ")
    msg = headers(raw)
    received = msg["Received"]
    assert f"[{source}]" in received
    assert "by mx.test.example" in received and "with ESMTP " in received
    assert "TLS" not in received
    assert msg["Subject"] == "plain"
    assert raw.endswith(b"\r\n\r\n" + body.encode())
    assert all_maildirs(srv) == ["example.test/alice"]


def test_starttls_session_records_tls_version_in_received(make_server, client_tls):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert s.starttls(context=client_tls)[0] == 220
        s.ehlo()
        assert not s.has_extn("starttls")
        version = s.sock.version()
        s.sendmail(SENDER, ["alice@example.test"], message("tls"))
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    received = " ".join(headers(raw)["Received"].split())
    assert version in ("TLSv1.2", "TLSv1.3")
    assert "with ESMTPS " in received
    assert f"(using {version} " in received


def _weak_context(kind: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if kind == "tls1.1":
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    else:  # TLS 1.2 offering only CBC suites with SHA-1 MACs (outside the modern cipher list)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA:@SECLEVEL=0")
    return ctx


def _handshakes_with_a_permissive_server(ctx: ssl.SSLContext, tls_files) -> bool:
    """Proof that the weak client context works at all, so a refusal below is the server's."""
    import threading

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1
    sctx.set_ciphers("ALL:@SECLEVEL=0")
    sctx.load_cert_chain(*tls_files)
    with socket.create_server(("127.0.0.1", 0)) as ls:
        def serve() -> None:
            conn, _ = ls.accept()
            try:
                sctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(ls.getsockname(), timeout=5) as c, ctx.wrap_socket(c):
                return True
        except (ssl.SSLError, OSError):
            return False
        finally:
            t.join(5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["tls1.1", "tls1.2-cbc-sha1"])
def test_server_refuses_old_tls(make_server, tls_files, kind):
    try:
        ctx = _weak_context(kind)
    except (ssl.SSLError, ValueError):
        pytest.skip(f"this OpenSSL cannot offer {kind}")
    if not _handshakes_with_a_permissive_server(ctx, tls_files):
        pytest.skip(f"this OpenSSL cannot negotiate {kind} even with a permissive server")
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            s.starttls(context=ctx)


@pytest.mark.parametrize("source", [TRUSTED, UNTRUSTED])
def test_unknown_local_user_is_refused_at_rcpt(make_server, source):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, source) as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.rcpt("nobody@example.test")
        assert code == 550 and text.startswith(b"5.1.1 "), text
        code, text = s.rcpt("nobody@other.test")
        assert code == 550 and text.startswith(b"5.1.1 "), text
        # Nothing was accepted, so DATA has no recipient to go to: no accept-then-bounce.
        code, _ = s.docmd("DATA")
        assert code == 554
    assert spool_entries(srv) == []


def test_plus_address_delivers_to_the_user(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt("alice+newsletters@example.test")[0] == 250
        assert s.rcpt("bob+x+y@example.test")[0] == 250
        assert s.rcpt("nobody+tag@example.test")[0] == 550
        assert s.data(message("plus"))[0] == 250
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert b"\r\nDelivered-To: alice@example.test\r\n" in raw
    srv.wait_delivered("bob@example.test", 1)
    assert all_maildirs(srv) == ["example.test/alice", "example.test/bob"]


def test_alias_delivers_to_every_target(make_server):
    srv = make_server(accounts=ACCOUNTS, aliases={"team@example.test": ["alice@example.test", "bob@example.test"],
                                                   "info@other.test": ["team@example.test"]})
    with connect(srv) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt("info@other.test")[0] == 250
        assert s.data(message("alias"))[0] == 250
    (a,) = srv.wait_delivered("alice@example.test", 1)
    (b,) = srv.wait_delivered("bob@example.test", 1)
    assert b"Delivered-To: alice@example.test\r\n" in a
    assert b"Delivered-To: bob@example.test\r\n" in b
    assert b"Subject: alias\r\n" in a and b"Subject: alias\r\n" in b


# ---- postmaster ------------------------------------------------------------------------------


@pytest.mark.parametrize("rcpt", ["postmaster@example.test", "postmaster@other.test", "PostMaster@Other.Test",
                                  "postmaster"])
def test_postmaster_is_always_accepted_and_reaches_the_configured_account(make_server, rcpt):
    srv = make_server(accounts=ACCOUNTS, domains=POSTMASTER)
    with connect(srv) as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.docmd("RCPT", f"TO:<{rcpt}>")
        assert code == 250, text
        assert s.data(message("to postmaster"))[0] == 250
    (raw,) = srv.wait_delivered("admin@example.test", 1)
    assert b"Subject: to postmaster\r\n" in raw
    assert all_maildirs(srv) == ["example.test/admin"]


def test_bare_postmaster_is_accepted_from_a_trusted_client_too(make_server):
    srv = make_server(accounts=ACCOUNTS, domains=POSTMASTER)
    with connect(srv, TRUSTED) as s:
        s.ehlo()
        s.mail("<>")
        assert s.docmd("RCPT", "TO:<postmaster>")[0] == 250
        assert s.data(message("bounce"))[0] == 250
    (raw,) = srv.wait_delivered("admin@example.test", 1)
    assert raw.startswith(b"Return-Path: <>\r\n")


# ---- relay ------------------------------------------------------------------------------------


def test_untrusted_client_cannot_relay(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, UNTRUSTED) as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.rcpt("carol@remote.example")
        assert code == 554 and text.startswith(b"5.7.1 "), text
        assert b"relay" in text.lower()
        assert s.docmd("DATA")[0] == 554
    assert spool_entries(srv) == []
    rejects = [r.getMessage() for r in caplog.records if "event=reject" in r.getMessage()]
    assert len(rejects) == 2, rejects  # the relay refusal, then DATA without a recipient
    assert "stage=rcpt" in rejects[0] and "check=relay" in rejects[0] and f"client={UNTRUSTED}" in rejects[0]
    assert "stage=data" in rejects[1] and "check=protocol" in rejects[1] and 'reply="554 5.5.1' in rejects[1]
    session = re.search(r"session=(\S+)", rejects[0]).group(1)
    connects = [r.getMessage() for r in caplog.records if "event=connect" in r.getMessage()]
    assert any(f"session={session} " in m and f"client={UNTRUSTED}" in m for m in connects)


def test_trusted_client_relays_and_the_message_waits_in_the_spool(make_server, dns_server):
    # The destination's DNS does not answer, so any outbound attempt can only defer: the entry
    # must stay queued (durable, with its DSN parameters) and never land in a local Maildir.
    dns_server.set_behaviour("remote.example", "timeout")
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, TRUSTED) as s:
        s.ehlo()
        assert s.mail("alice@example.test", ["RET=HDRS", "ENVID=env-42"])[0] == 250
        assert s.rcpt("carol@remote.example", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;carol@remote.example"])[0] == 250
        assert s.data(message("outbound"))[0] == 250
    time.sleep(0.3)  # give a (wrong) delivery a chance to pick it up
    entries = spool_entries(srv)
    assert len(entries) == 1
    env = spool_envelope(entries[0])
    assert env["sender"] == "alice@example.test"
    assert env["mail_params"] == {"RET": "HDRS", "ENVID": "env-42"}
    assert [r["to"] for r in env["remote"]] == ["carol@remote.example"]
    assert env["remote"][0]["params"] == {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;carol@remote.example"}
    assert b"Subject: outbound\r\n" in entries[0]
    assert all_maildirs(srv) == []


def test_trusted_mixed_recipients_local_copy_delivered_remote_kept(make_server, dns_server):
    dns_server.set_behaviour("remote.example", "timeout")
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, TRUSTED) as s:
        s.sendmail("alice@example.test", ["bob@example.test", "carol@remote.example"], message("mixed"))
    srv.wait_delivered("bob@example.test", 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = spool_entries(srv)
        if len(entries) == 1 and spool_envelope(entries[0])["local"] == []:
            break
        time.sleep(0.05)
    (entry,) = spool_entries(srv)
    env = spool_envelope(entry)
    assert env["local"] == [] and [r["to"] for r in env["remote"]] == ["carol@remote.example"]
    time.sleep(0.2)
    assert len(srv.delivered("bob@example.test")) == 1


@pytest.mark.parametrize("rcpt", [
    "carol%remote.example@example.test",
    "remote.example!carol@example.test",
    '"carol@remote.example"@example.test',
    "@example.test:carol@remote.example",
    "@other.test,@example.test:carol@remote.example",
    "carol@remote.example@example.test",
    "alice%remote.example@example.test",
    '"alice@remote.example"@example.test',
])
def test_relay_tricks_are_refused_for_untrusted_clients(make_server, rcpt):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, UNTRUSTED) as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.docmd("RCPT", f"TO:<{rcpt}>")
        assert 500 <= code < 600, (code, text)
        assert ENHANCED.match(text.decode()), text
        assert s.docmd("DATA")[0] == 554
    time.sleep(0.1)
    assert spool_entries(srv) == []
    assert all_maildirs(srv) == []


@pytest.mark.parametrize("sender", ["alice@example.test", "someone@other.test", "Bob@EXAMPLE.test"])
def test_untrusted_client_may_not_use_a_local_sender_domain(make_server, sender):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, UNTRUSTED) as s:
        s.ehlo()
        code, text = s.mail(sender)
        assert code == 550 and text.startswith(b"5.7.1 "), text
        assert b"587" in text
        assert s.docmd("RCPT", "TO:<alice@example.test>")[0] == 503  # no transaction was opened
    with connect(srv, TRUSTED) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250


# ---- AUTH is not a port-25 thing ----------------------------------------------------------------


def test_auth_is_never_offered_and_refused_before_and_after_starttls(make_server, client_tls):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        assert "AUTH" not in s.ehlo_resp.decode().upper()
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNl")
        assert code in (502, 503) and text.startswith(b"5.5.1"), text
        s.starttls(context=client_tls)
        s.ehlo()
        assert not s.has_extn("auth")
        assert "AUTH" not in s.ehlo_resp.decode().upper()
        for args in ("PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNl", "LOGIN", "CRAM-MD5"):
            code, text = s.docmd("AUTH", args)
            assert code in (502, 503) and text.startswith(b"5.5.1"), text
        with pytest.raises(smtplib.SMTPNotSupportedError):
            s.login("alice@example.test", ACCOUNTS["alice@example.test"])


# ---- STARTTLS command injection (CVE-2011-0411 class) --------------------------------------------


@pytest.mark.parametrize("injected", [
    b"RSET\r\n",
    b"EHLO injected.example\r\n",
    b"EHLO injected.example\r\nMAIL FROM:<evil@remote.example>\r\n",
])
def test_commands_pipelined_after_starttls_are_discarded(make_server, client_tls, injected):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.remote.example")[0] == 250
        c.send(b"STARTTLS\r\n" + injected)  # one packet
        code, text = c.reply()
        assert code == 220, text
        assert c.pending(0.3) == b"", "the server answered more than once before the handshake"
        c.starttls(client_tls)
        # A new EHLO is required: the injected EHLO must not have counted, nor RSET been answered.
        code, text = c.cmd("MAIL FROM:<sender@remote.example>")
        assert code == 503 and text[0].startswith("5.5.1"), (code, text)
        assert c.cmd("EHLO client.remote.example")[0] == 250
        assert c.cmd("MAIL FROM:<sender@remote.example>")[0] == 250
        assert c.pending(0.1) == b""


# ---- SMTP smuggling -----------------------------------------------------------------------------


SMUGGLED = (b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")


@pytest.mark.parametrize("end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggled_second_message_is_never_accepted(make_server, end):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(b"Subject: first\r\n\r\nhello" + end + SMUGGLED + b".\r\n")
        code, text = c.reply()
        assert (code, text[0][:5]) == (550, "5.5.2"), (code, text)
        code, text = c.cmd("QUIT")
        assert code == 221, "a hidden command was executed: " + repr((code, text))
    time.sleep(0.3)
    assert srv.delivered("bob@example.test") == []
    assert len(srv.delivered("alice@example.test")) <= 1
    assert srv.delivered("alice@example.test") == []  # the whole message is refused


# ---- limits -------------------------------------------------------------------------------------


def test_command_line_length_limit(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        assert s.docmd("NOOP", "x" * 505)[0] == 250  # 512 octets with CRLF: allowed
        code, text = s.docmd("NOOP", "x" * 506)  # 513 octets
        assert (code, text[:5]) == (500, b"5.5.2"), text
        code, text = s.docmd("NOOP", "y" * 5000)
        assert (code, text[:5]) == (500, b"5.5.2"), text
        assert s.noop()[0] == 250  # the session goes on
        assert s.sendmail(SENDER, ["alice@example.test"], message("after long lines")) == {}
    srv.wait_delivered("alice@example.test", 1)


def test_message_size_limit(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"message_size": 2000})
    with connect(srv) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "2000"
        code, text = s.mail(SENDER, ["SIZE=2001"])
        assert (code, text[:5]) == (552, b"5.3.4"), text
        assert s.mail(SENDER, ["SIZE=1500"])[0] == 250
        s.rcpt("alice@example.test")
        code, text = s.data(message("big", "x" * 70 + "\r\n") * 40)
        assert (code, text[:5]) == (552, b"5.3.4"), text
        assert s.sendmail(SENDER, ["alice@example.test"], message("small")) == {}
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert b"Subject: small\r\n" in raw
    time.sleep(0.2)
    assert len(srv.delivered("alice@example.test")) == 1


def test_recipient_limit(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"recipients": 2})
    with connect(srv) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        code, text = s.rcpt("alice+third@example.test")
        assert (code, text[:5]) == (452, b"4.5.3"), text
        assert s.data(message("two rcpts"))[0] == 250
    srv.wait_delivered("alice@example.test", 1)
    srv.wait_delivered("bob@example.test", 1)


def test_connections_per_ip_limit(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"connections_per_ip": 2})
    port = srv.port("mx")
    first, second = RawSMTP(port, source="127.1.0.7"), RawSMTP(port, source="127.1.0.7")
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        with RawSMTP(port, source="127.1.0.7") as third:
            code, text = third.reply()
            assert code == 421 and text[0].startswith("4."), text
            assert third.closed_by_peer()
        with RawSMTP(port, source="127.1.0.8") as other:  # another address is not affected
            assert other.reply()[0] == 220
        first.cmd("QUIT")
        first.close()
        deadline = time.monotonic() + 5  # the slot frees when the server sees the close
        while True:
            with RawSMTP(port, source="127.1.0.7") as again:
                if again.reply()[0] == 220:
                    break
            assert time.monotonic() < deadline, "the connection slot was never released"
            time.sleep(0.05)
    finally:
        first.close()
        second.close()


def test_idle_client_gets_421_and_is_disconnected(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"idle_timeout": "1s"})
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.remote.example")[0] == 250
        t0 = time.monotonic()
        code, text = c.reply()
        elapsed = time.monotonic() - t0
        assert (code, text[0][:5]) == (421, "4.4.2"), text
        assert 0.7 < elapsed < 3.0, elapsed
        assert c.closed_by_peer()


# ---- extensions ---------------------------------------------------------------------------------


def test_ehlo_advertises_the_extensions(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes", "starttls", "chunking",
                    "dsn"):
            assert s.has_extn(ext), ext


def test_bdat_chunking_delivers_the_bytes_verbatim(make_server):
    srv = make_server(accounts=ACCOUNTS)
    chunk1 = b"Subject: chunked\r\nFrom: <sender@remote.example>\r\n\r\nline one\r\n.\r\n"
    chunk2 = b"..two dots stay two\r\nlast line\r\n"
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        _code, lines = c.cmd("EHLO client.remote.example")
        assert "CHUNKING" in lines
        c.send(b"MAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\n"
               + b"BDAT %d\r\n" % len(chunk1) + chunk1 + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
        replies = [c.reply() for _ in range(4)]
        assert [r[0] for r in replies] == [250, 250, 250, 250], replies
        assert c.cmd("QUIT")[0] == 221
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert raw.endswith(b"\r\n" + chunk1 + chunk2)
    assert b"Delivered-To: alice@example.test\r\n" in raw


async def test_8bitmime_and_smtputf8_message_is_delivered(make_server):
    srv = make_server(accounts=ACCOUNTS)
    sender = "送信者@例え.example"
    body = "Subject: =?utf-8?b?5pel5pys6Kqe?=\r\nFrom: <送信者@例え.example>\r\n\r\nこんにちは、世界。 Grüße\r\n"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port("mx"), source_address=(UNTRUSTED, 0),
                             start_tls=False, timeout=10)
    async with client:
        await client.ehlo()
        assert client.supports_extension("smtputf8") and client.supports_extension("8bitmime")
        errors, _ = await client.sendmail(sender, ["alice@example.test"], body.encode("utf-8"),
                                          mail_options=["BODY=8BITMIME", "SMTPUTF8"])
        assert errors == {}
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert raw.startswith(f"Return-Path: <{sender}>\r\n".encode())
    assert raw.endswith("こんにちは、世界。 Grüße\r\n".encode())
    assert b" with UTF8ESMTP " in raw


async def test_non_ascii_sender_without_smtputf8_is_refused(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.cmd("EHLO client.remote.example")
        code, text = c.cmd("MAIL FROM:<送信者@例え.example>")
        assert 500 <= code < 600 and ENHANCED.match(text[0]), (code, text)


def test_every_reply_has_an_enhanced_status_code(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        replies = [
            ("MAIL FROM:<sender@remote.example>", 503),  # before EHLO
            ("EHLO client.remote.example", 250),
            ("FROB", 500),
            ("RCPT TO:<alice@example.test>", 503),  # before MAIL
            ("VRFY alice@example.test", 252),
            ("VRFY nobody@example.test", 252),
            ("HELP", 214),
            ("NOOP", 250),
            ("MAIL FROM:<not an address@remote.example>", 501),
            ("MAIL FROM:<sender@remote.example>", 250),
            ("RCPT TO:<alice@example.test>", 250),
            ("RSET", 250),
            ("DATA", 503),
            ("QUIT", 221),
        ]
        seen = {}
        for line, expected in replies:
            code, text = c.cmd(line)
            seen[line] = code, text
            assert code == expected, (line, code, text)
            if not line.startswith("EHLO"):
                assert all(ENHANCED.match(t) for t in text), (line, text)
        assert seen["VRFY alice@example.test"][1] == seen["VRFY nobody@example.test"][1]  # reveals nothing
        assert seen["FROB"][1][0].startswith("5.5.1")
        assert seen["MAIL FROM:<not an address@remote.example>"][1][0].startswith("5.1.3")
        assert seen["DATA"][1][0].startswith("5.5.1")


# ---- IPv6 ---------------------------------------------------------------------------------------


def _have_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener(make_server):
    srv = make_server(accounts=ACCOUNTS, listener=[{"kind": "mx", "address": "[::1]:0"}])
    with smtplib.SMTP("::1", srv.port("mx"), local_hostname="client.example", timeout=10) as s:
        assert s.ehlo()[0] == 250
        assert s.sendmail(SENDER, ["alice@example.test"], message("over ipv6")) == {}
        # ::1 is in network.trusted: it may relay.
        s.mail(SENDER)
        assert s.rcpt("carol@remote.example")[0] == 250
        s.rset()
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert "[::1]" in headers(raw)["Received"]


def _free_port_on_both() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
            port = s6.getsockname()[1]
            try:
                with socket.socket() as s4:
                    s4.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no port free on both 127.0.0.1 and ::1")


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv4_and_ipv6_listeners_on_the_same_port(make_server, dns_server):
    """The usual `0.0.0.0:25` + `[::]:25` pair (here on loopback): both bind, each sees its clients right."""
    dns_server.add("31.0.1.127.zen.dnsbl.test", "A", "127.0.0.2")
    port = _free_port_on_both()
    srv = make_server(accounts=ACCOUNTS, listener=[{"kind": "mx", "address": f"127.0.0.1:{port}"},
                                                   {"kind": "mx", "address": f"[::1]:{port}"}])
    assert sorted(bl.sockname[0] for bl in srv.server.listeners) == ["127.0.0.1", "::1"]
    with smtplib.SMTP("::1", port, local_hostname="lan.example", timeout=10) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt("carol@remote.example")[0] == 250  # ::1 is trusted
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.example", source_address=("127.1.0.30", 0),
                      timeout=10) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt("carol@remote.example")[0] == 554  # the internet may not relay
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(message("ipv4 next to ipv6"))[0] == 250
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert "[127.1.0.30]" in headers(raw)["Received"]
    with RawSMTP(port, source="127.1.0.31") as c:
        code, text = c.reply()
        assert code == 554 and "zen.dnsbl.test" in text[0], text


def test_too_many_errors_end_the_session(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"max_errors": 3})
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        c.send(b"FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
        assert [c.reply()[0] for _ in range(3)] == [500, 500, 500]
        code, text = c.reply()
        assert code == 421 and text[0].startswith("4.7.0"), text
        assert c.closed_by_peer()


def test_helo_and_case_insensitive_recipient(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        assert s.helo()[0] == 250
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("ALICE@Example.TEST")[0] == 250
        assert s.data(message("helo"))[0] == 250
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert b"Delivered-To: alice@example.test\r\n" in raw
    assert " with SMTP " in " ".join(headers(raw)["Received"].split())


def test_bdat_over_the_size_limit_is_refused(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"message_size": 1000})
    chunk = b"x" * 700 + b"\r\n"
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\n"
               + b"BDAT %d\r\n" % len(chunk) + chunk + b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        replies = [c.reply() for _ in range(5)]
        assert [r[0] for r in replies[:4]] == [250, 250, 250, 250], replies
        assert replies[4][0] == 552 and replies[4][1][0].startswith("5.3.4"), replies
        assert c.cmd("NOOP")[0] == 250  # the stream stays in sync after the refused chunk
    time.sleep(0.2)
    assert srv.delivered("alice@example.test") == []


# ---- framing edge cases, pipelining, volume --------------------------------------------------


def _data_session(srv, parts: list[bytes]) -> tuple[int, list[str]]:
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        for part in parts:
            c.send(part)
            time.sleep(0.1)  # separate reads on the server
        return c.reply()


def test_size_limit_is_exact_whatever_the_packet_boundaries(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"message_size": 1000})
    body = b"Subject: exact\r\n\r\n" + b"y" * (1000 - 20) + b"\r\n"
    assert len(body) == 1000
    assert _data_session(srv, [body + b".\r\n"])[0] == 250
    assert _data_session(srv, [body + b".\r", b"\n"])[0] == 250
    assert _data_session(srv, [body[:500], body[500:] + b".", b"\r\n"])[0] == 250
    assert _data_session(srv, [b"z" + body + b".\r\n"])[0] == 552
    assert _data_session(srv, [b"z" + body, b".\r\n"])[0] == 552
    assert len(srv.wait_delivered("alice@example.test", 3)) == 3


def test_long_line_arriving_in_pieces_gets_one_500(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        c.send(b"NOOP " + b"x" * 600)
        time.sleep(0.1)
        c.send(b"x" * 600)
        time.sleep(0.1)
        c.send(b"xx\r\nNOOP\r\n")
        code, text = c.reply()
        assert (code, text[0][:5]) == (500, "5.5.2"), text
        assert c.reply()[0] == 250
        assert c.pending(0.2) == b""


def test_many_pipelined_transactions_in_one_packet(make_server):
    srv = make_server(accounts=ACCOUNTS)
    n = 10
    blob = b"EHLO client.remote.example\r\n"
    for i in range(n):
        blob += (b"MAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                 b"DATA\r\nMessage-ID: <p%d@remote.example>\r\n\r\nbody %d\r\n.\r\n" % (i, i))
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.send(blob + b"QUIT\r\n")
        codes = [c.reply()[0] for _ in range(1 + 5 * n + 1)]
    assert codes == [250] + [250, 250, 250, 354, 250] * n + [221]
    for mailbox in ("alice@example.test", "bob@example.test"):
        msgs = srv.wait_delivered(mailbox, n)
        ids = sorted(re.search(rb"Message-ID: <(p\d+)@", m).group(1) for m in msgs)
        assert ids == sorted(b"p%d" % i for i in range(n))


def test_large_message_by_data_and_by_bdat_arrives_intact(make_server):
    srv = make_server(accounts=ACCOUNTS)
    hexdata = os.urandom(1536 * 1024).hex().encode()  # 3 MiB, more than the read-pause threshold
    lines = b"\r\n".join(hexdata[i:i + 76] for i in range(0, len(hexdata), 76)) + b"\r\n"
    msg = b"Subject: big\r\n\r\n" + lines
    with connect(srv) as s:
        assert s.sendmail(SENDER, ["alice@example.test"], msg) == {}
    (raw,) = srv.wait_delivered("alice@example.test", 1, timeout=30)
    assert raw.endswith(b"\r\n" + msg)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED, timeout=30) as c:
        c.reply()
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\nRCPT TO:<bob@example.test>\r\n"
               + b"BDAT %d LAST\r\n" % len(msg) + msg + b"QUIT\r\n")
        assert [c.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 221]
    (raw,) = srv.wait_delivered("bob@example.test", 1, timeout=30)
    assert raw.endswith(b"\r\n" + msg)


async def test_concurrent_sessions_lose_nothing(make_server):
    srv = make_server(accounts=ACCOUNTS)

    async def client(k: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port("mx"), source_address=(f"127.2.0.{k + 1}", 0),
                               start_tls=False, timeout=20)
        async with smtp:
            for j in range(3):
                await smtp.sendmail(SENDER, ["alice@example.test"], f"Message-ID: <c{k}-{j}@x>\r\n\r\nhi\r\n")

    await asyncio.gather(*(client(k) for k in range(30)))
    msgs = await asyncio.to_thread(srv.wait_delivered, "alice@example.test", 90, 20)
    ids = {re.search(rb"Message-ID: <([^>]+)>", m).group(1) for m in msgs}
    assert len(msgs) == 90 and len(ids) == 90
    await asyncio.sleep(0.2)
    assert spool_entries(srv) == []


def test_null_sender_from_the_internet_is_accepted(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, UNTRUSTED) as s:
        s.ehlo()
        assert s.mail("<>")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(message("a bounce"))[0] == 250
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert raw.startswith(b"Return-Path: <>\r\n")


def test_every_rejection_is_logged_with_session_and_reason(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv, UNTRUSTED) as s:
        s.ehlo()
        assert s.mail("alice@example.test")[0] == 550
        s.mail(SENDER)
        assert s.rcpt("nobody@example.test")[0] == 550
        assert s.rcpt("carol@remote.example")[0] == 554
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(message("logged"))[0] == 250
    srv.wait_delivered("alice@example.test", 1)
    time.sleep(0.1)
    # The session's lines: the SMTP session's own and the intake's (which stores its message).
    smtp = [r.getMessage() for r in caplog.records if r.name in ("yuubin.smtp", "yuubin.intake")]
    assert all("\n" not in m and re.match(r"event=\w+ ", m) for m in smtp), smtp
    session = re.search(r"session=(\S+)", next(m for m in smtp if m.startswith("event=connect "))).group(1)
    mine = [m for m in smtp if f"session={session} " in m or m.endswith(f"session={session}")]
    rejects = [m for m in mine if m.startswith("event=reject ")]
    assert [re.search(r"check=(\S+)", m).group(1) for m in rejects] == ["sender", "recipient", "relay"], rejects
    assert all('reason="' in m and 'reply="5' in m for m in rejects), rejects
    assert any(m.startswith("event=accepted ") for m in mine), mine
    assert any(m.startswith("event=disconnect ") for m in mine), mine


# ---- timeouts: activity re-arms them; DATA has its own ------------------------------------------


@pytest.mark.slow
def test_activity_keeps_a_session_alive_past_the_idle_timeout(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"idle_timeout": "1s"})
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.2:  # more than twice the idle timeout, never idle for long
            code, text = c.cmd("NOOP")
            assert code == 250, (round(time.monotonic() - t0, 2), code, text)
            time.sleep(0.2)
        t1 = time.monotonic()
        code, text = c.reply()  # now silent: the timeout counts from the last command
        assert (code, text[0][:5]) == (421, "4.4.2"), text
        assert 0.7 < time.monotonic() - t1 < 4


@pytest.mark.slow
def test_data_timeout_applies_inside_data_and_idle_timeout_outside(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"idle_timeout": "3s", "data_timeout": "1s"})
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.remote.example")[0] == 250
        time.sleep(1.5)  # idle longer than data_timeout, shorter than idle_timeout: still fine
        c.send(b"MAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.send(b"Subject: stalled\r\n\r\nhalf a messa")
        t0 = time.monotonic()
        code, text = c.reply()
        assert (code, text[0][:2]) == (421, "4."), text
        assert 0.7 < time.monotonic() - t0 < 2.8  # data_timeout (1 s), not idle_timeout (3 s)
        assert c.closed_by_peer()
    assert srv.delivered("alice@example.test") == []


def test_partial_command_line_still_times_out(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"idle_timeout": "1s"})
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO half-a-line")
        t0 = time.monotonic()
        code, _ = c.reply()
        assert code == 421 and 0.7 < time.monotonic() - t0 < 4


def test_client_vanishing_mid_data_leaves_nothing_behind(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.send(b"EHLO client.remote.example\r\nMAIL FROM:<sender@remote.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(b"Subject: cut\r\n\r\nthe client dies here\r\n")
    time.sleep(0.3)
    assert spool_entries(srv) == [] and srv.delivered("alice@example.test") == []
    with connect(srv) as s:  # the server is fine
        assert s.sendmail(SENDER, ["alice@example.test"], message("after a vanished client")) == {}
    srv.wait_delivered("alice@example.test", 1)


def test_failed_tls_handshake_closes_only_that_session(make_server):
    srv = make_server(accounts=ACCOUNTS)
    with RawSMTP(srv.port("mx"), source=UNTRUSTED) as c:
        c.reply()
        c.cmd("EHLO client.remote.example")
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert c.closed_by_peer(5)
    with connect(srv) as s:
        assert s.sendmail(SENDER, ["alice@example.test"], message("after a bad handshake")) == {}
    srv.wait_delivered("alice@example.test", 1)


def test_global_connection_limit(make_server):
    srv = make_server(accounts=ACCOUNTS, limits={"max_connections": 2})
    port = srv.port("mx")
    with RawSMTP(port, source="127.1.0.40") as a, RawSMTP(port, source="127.1.0.41") as b:
        assert a.reply()[0] == 220 and b.reply()[0] == 220
        with RawSMTP(port, source="127.1.0.42") as c:
            code, _ = c.reply()
            assert code == 421
            assert c.closed_by_peer()


def test_without_a_certificate_starttls_is_not_offered(make_server):
    srv = make_server(accounts=ACCOUNTS, tls={})
    assert srv.config.tls.cert is None
    with connect(srv) as s:
        s.ehlo()
        assert not s.has_extn("starttls")
        code, text = s.docmd("STARTTLS")
        assert 500 <= code < 600 and ENHANCED.match(text.decode()), (code, text)
        assert s.sendmail(SENDER, ["alice@example.test"], message("no tls here")) == {}
    srv.wait_delivered("alice@example.test", 1)


def test_second_starttls_is_refused(make_server, client_tls):
    srv = make_server(accounts=ACCOUNTS)
    with connect(srv) as s:
        s.ehlo()
        s.starttls(context=client_tls)
        s.ehlo()
        code, text = s.docmd("STARTTLS")
        assert code == 503 and text.startswith(b"5.5.1"), text
        assert s.noop()[0] == 250


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback on this machine")
def test_untrusted_ipv6_client_is_checked_against_dnsbl_by_nibbles(make_server, dns_server):
    nibbles = ".".join(reversed(socket.inet_pton(socket.AF_INET6, "::1").hex()))
    dns_server.add(f"{nibbles}.bl.dnsbl.test", "A", "127.0.0.2")
    srv = make_server(accounts=ACCOUNTS, network={"trusted": ["127.0.0.0/16"]},
                      listener=[{"kind": "mx", "address": "[::1]:0"}])
    with RawSMTP(srv.port("mx"), source="::1", host="::1") as c:
        code, text = c.reply()
        assert code == 554 and "bl.dnsbl.test" in text[0], text
    assert (f"{nibbles}.zen.dnsbl.test", "A") in dns_server.queries


@pytest.mark.parametrize("rcpt", ["postmaster@example.test", "postmaster@other.test", "postmaster"])
def test_postmaster_is_accepted_even_without_a_postmaster_account(make_server, rcpt):
    srv = make_server(accounts=ACCOUNTS)  # domains.postmaster left at its default
    assert srv.config.postmaster == "postmaster@example.test"
    with connect(srv) as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.docmd("RCPT", f"TO:<{rcpt}>")
        assert code == 250, (code, text)
        code, text = s.data(b"Subject: to postmaster\r\n\r\nhello\r\n")
        assert code == 250, (code, text)
    msgs = srv.wait_delivered("postmaster@example.test", 1)
    assert b"Delivered-To: postmaster@example.test" in msgs[0]
