"""Outbound delivery end to end: yuubin relays through MX hosts (SmtpSink on 127.1.0.x) found via the
test DNS server, retries, bounces, refuses loops, uses a relayhost with TLS and AUTH, and obeys
the `yuubin queue` tools. Plus the sans-IO parts (wire format, address checks, DSN bytes).
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import smtplib
import time
from pathlib import Path

import pytest

from tests.harness import ServerConfig, free_port, run_yuubin
from tests.smtpsink import SmtpSink
from yuubin import cli
from yuubin.delivery.remote import UnsafeInput, check_address, check_param, wire_message
from yuubin.queue.bounce import build_dsn, may_bounce
from yuubin.queue.spool import Envelope, RemoteRecipient

SENDER = "alice@example.test"
FAST = {"retry_first": "0.3s", "retry_max": "1s", "queue_scan": "0.5s", "connect_timeout": "2s",
        "command_timeout": "5s"}


@pytest.fixture
def mx_port() -> int:
    """One port for every fake MX host (outbound.port), each on its own 127.1.0.x address."""
    return free_port("127.1.0.1")


def sink(host: str, port: int, **kw) -> SmtpSink:
    return SmtpSink(host=host, port=port, **kw).start()


@pytest.fixture
def sinks():
    started: list[SmtpSink] = []
    yield started
    for s in started:
        s.stop()


def server(make_server, port: int, **outbound):
    return make_server(outbound={**FAST, "port": port, **outbound})


def send(srv, rcpts: list[str], body: str, sender: str = SENDER, source: str = "127.0.0.1") -> None:
    with smtplib.SMTP("127.0.0.1", srv.port(), source_address=(source, 0), timeout=10) as c:
        c.sendmail(sender, rcpts, body)


def spool_ids(srv) -> list[str]:
    return sorted(p.name for p in (srv.config.spool_dir / "queue").iterdir())


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def message(subject: str, extra: str = "") -> str:
    return f"From: <{SENDER}>\r\nTo: <x@remote.test>\r\nSubject: {subject}\r\n\r\nhello\r\n{extra}"


def dsn_parts(raw: bytes):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    return msg, parts


# ---- sans-IO pieces ----

def test_wire_message_makes_every_line_end_in_crlf():
    assert wire_message(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert wire_message(b"x\r\n") == b"x\r\n"


@pytest.mark.parametrize("bad", ["a@b.test\r\nRCPT TO:<x@y>", "a@b.test\n", "a\x00@b.test", "a@b.test>x",
                                 "a b@c.test", "nodomain", "\"a\x01b\"@c.test"])
def test_addresses_that_could_inject_commands_are_refused(bad):
    with pytest.raises(UnsafeInput):
        check_address(bad, smtputf8=True)


def test_non_ascii_address_needs_smtputf8():
    assert check_address("ユーザー@例え.jp", smtputf8=True)
    with pytest.raises(UnsafeInput):
        check_address("ユーザー@例え.jp", smtputf8=False)


@pytest.mark.parametrize("bad", ["NOTIFY=SUCCESS\r\nDATA", "ORCPT=rfc822;a b", "=x", "NOTIFY=a=b\n"])
def test_bad_esmtp_params_are_refused(bad):
    with pytest.raises(UnsafeInput):
        check_param(bad)
    assert check_param("ORCPT=rfc822;a+40b@c.test") == "ORCPT=rfc822;a+40b@c.test"


def _env(**kw) -> Envelope:
    base = dict(id="q1", sender=SENDER, mail_params={}, local=[], remote=[], received=time.time(),
                client="127.0.0.1", helo="pc", listener="mx")
    base.update(kw)
    return Envelope(**base)


def test_only_our_own_users_mail_is_bounced():
    assert may_bounce(_env(trusted=True))[0]
    assert may_bounce(_env(auth="alice@example.test"))[0]
    assert not may_bounce(_env())[0]  # from outside on port 25: no backscatter
    assert not may_bounce(_env(trusted=True, sender=""))[0]
    assert not may_bounce(_env(trusted=True, listener="bounce"))[0]


def test_dsn_is_a_multipart_report_with_the_original_headers():
    data = b"Subject: the original\r\nFrom: alice@example.test\r\n\r\nsecret body\r\n"
    rcpt = RemoteRecipient("bob@remote.test", status="5.1.1", error="550 5.1.1 no such user",
                           host="mx.remote.test", params={"ORCPT": "rfc822;bob+40x@remote.test"})
    raw = build_dsn(_env(trusted=True), data, [rcpt], "failed", "mx.test.example")
    msg, parts = dsn_parts(raw)
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                     "text/rfc822-headers"]
    status = raw.decode()
    assert "Final-Recipient: rfc822; bob@remote.test" in status
    assert "Original-Recipient: rfc822; bob@x@remote.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Subject: the original" in status and "secret body" not in status
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    assert all(line.endswith(b"\r") or line == b"" for line in raw.split(b"\n")[:-1])


# ---- end to end ----

def test_relay_to_remote_mx_with_crlf_and_dot_stuffing(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port)
    sinks.append(remote)
    srv = server(make_server, mx_port)
    send(srv, ["carol@remote.test"], message("relay", ".leading dot\r\n..two dots\r\n"))
    [msg] = remote.wait_messages(1)
    assert msg.sender == SENDER and msg.recipients == ["carol@remote.test"]
    assert b"\r\n.leading dot\r\n..two dots\r\n" in msg.data
    assert b"\r\n..leading dot\r\n...two dots\r\n" in msg.raw  # stuffed on the wire
    assert remote.bare_line_endings == 0
    assert b"by mx.test.example (yuubin)" in msg.data
    assert any(c.startswith("EHLO mx.test.example") for c in remote.commands)
    assert "SIZE=" in msg.mail_line
    wait_until(lambda: not spool_ids(srv), what="the spool entry to go")


def test_temporary_failure_is_retried_then_delivered(make_server, dns_server, mx_port, sinks, caplog):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port,
                  rcpt_reply=lambda rcpt, n: "451 4.3.0 try again later" if n == 1 else "250 2.1.5 OK")
    sinks.append(remote)
    srv = server(make_server, mx_port)
    with caplog.at_level(logging.INFO, logger="yuubin.outbound"):
        t0 = time.monotonic()
        send(srv, ["carol@remote.test"], message("retry"))
        remote.wait_messages(1)
        assert time.monotonic() - t0 >= 0.3  # waited for the backoff
        wait_until(lambda: not spool_ids(srv), what="the spool entry to go")
    deferred = [r.getMessage() for r in caplog.records if "event=deferred" in r.getMessage()]
    assert len(deferred) == 1 and "451 4.3.0 try again later" in deferred[0]
    assert srv.delivered(SENDER) == []  # a retry is not a failure: no DSN


def test_permanent_failure_sends_a_dsn_to_the_local_sender(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port,
                  rcpt_reply=lambda rcpt, n: "550 5.1.1 no such user" if rcpt.startswith("nobody") else "250 OK")
    sinks.append(remote)
    srv = server(make_server, mx_port)
    send(srv, ["carol@remote.test", "nobody@remote.test"], message("half bounces"))
    [msg] = remote.wait_messages(1)
    assert msg.recipients == ["carol@remote.test"]
    [raw] = srv.wait_delivered(SENDER, 1)
    assert raw.startswith(b"Return-Path: <>\r\n")
    _, parts = dsn_parts(raw)
    report = parts[1].as_string() if hasattr(parts[1], "as_string") else str(parts[1])
    text = raw.decode()
    assert "Final-Recipient: rfc822; nobody@remote.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "carol@remote.test" not in report
    assert "Subject: half bounces" in parts[2].get_content() if hasattr(parts[2], "get_content") else True
    assert "Subject: half bounces" in text
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")


@pytest.mark.parametrize("offered", [True, False])
def test_pipelining_when_offered_with_per_recipient_results(make_server, dns_server, mx_port, sinks, offered):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    answers = {"carol": "250 2.1.5 OK", "later": "450 4.2.0 mailbox busy", "nobody": "550 5.1.1 no such user"}
    remote = sink("127.1.0.1", mx_port, pipelining=offered, hold_mail_reply=True,
                  rcpt_reply=lambda rcpt, n: answers[rcpt.split("@")[0]] if n == 1 else "250 2.1.5 OK")
    sinks.append(remote)
    srv = server(make_server, mx_port)
    send(srv, ["carol@remote.test", "later@remote.test", "nobody@remote.test"], message("pipelined"))
    first = remote.wait_messages(1)[0]
    assert first.recipients == ["carol@remote.test"]
    # MAIL and the RCPTs went out in one write only when the peer offered PIPELINING.
    assert remote.pipelined[:1] == ([True] if offered else [False])
    [raw] = srv.wait_delivered(SENDER, 1)  # nobody@ failed for good: one DSN
    assert b"Final-Recipient: rfc822; nobody@remote.test" in raw and b"later@remote.test" not in raw
    msgs = remote.wait_messages(2)  # later@ was deferred, then delivered on retry
    assert msgs[1].recipients == ["later@remote.test"]
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")


def test_no_dsn_for_mail_that_came_from_outside(make_server, dns_server, mx_port, sinks, caplog):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port, rcpt_reply=lambda rcpt, n: "550 5.1.1 no such user")
    sinks.append(remote)
    srv = make_server(outbound={**FAST, "port": mx_port}, aliases={"fwd@example.test": ["nobody@remote.test"]})
    with caplog.at_level(logging.INFO, logger="yuubin.outbound"):
        # From: is the stranger's too: a stranger's From: in our domain would be refused (DMARC).
        send(srv, ["fwd@example.test"], message("forwarded").replace(SENDER, "stranger@elsewhere.test"),
             sender="stranger@elsewhere.test", source="127.1.0.9")  # untrusted: "the internet"
        wait_until(lambda: any("nobody@remote.test" in c for c in remote.commands), what="the attempt")
        wait_until(lambda: not spool_ids(srv), what="the spool to empty")
    assert any("event=bounce_suppressed" in r.getMessage() and "no backscatter" in r.getMessage()
               for r in caplog.records)
    assert not (srv.config.mail_dir).exists() or not any(srv.config.mail_dir.rglob("new/*"))


def test_null_mx_fails_at_once(make_server, dns_server, mx_port):
    dns_server.add("nomail.test", "MX", "0 .")
    srv = server(make_server, mx_port)
    send(srv, ["someone@nomail.test"], message("null mx"))
    [raw] = srv.wait_delivered(SENDER, 1)
    text = raw.decode()
    assert "Status: 5.1.10" in text and "null MX" in text
    assert ("nomail.test", "A") not in dns_server.queries  # no host to look up, nothing tried


def test_mx_preference_and_fallback(make_server, dns_server, mx_port, sinks):
    for pref, name, ip in ((10, "dead", "127.1.0.2"), (20, "busy", "127.1.0.3"), (30, "good", "127.1.0.4"),
                           (40, "spare", "127.1.0.5")):
        dns_server.add("pref.test", "MX", f"{pref} {name}.pref.test.")
        dns_server.add(f"{name}.pref.test", "A", ip)
    busy = sink("127.1.0.3", mx_port, greeting="421 4.3.2 too busy")
    good = sink("127.1.0.4", mx_port)
    spare = sink("127.1.0.5", mx_port)
    sinks.extend([busy, good, spare])
    srv = server(make_server, mx_port)
    send(srv, ["carol@pref.test"], message("preference"))
    good.wait_messages(1)
    assert busy.connections == 1  # tried in order: dead (refused), busy (421), then good
    assert spare.connections == 0
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")


def test_domain_without_mx_uses_its_address(make_server, dns_server, mx_port, sinks):
    dns_server.add("implicit.test", "A", "127.1.0.6")
    direct = sink("127.1.0.6", mx_port)
    sinks.append(direct)
    srv = server(make_server, mx_port)
    send(srv, ["carol@implicit.test"], message("implicit mx"))
    direct.wait_messages(1)


def test_an_mx_that_is_ourselves_is_a_loop(make_server, dns_server):
    port = free_port("127.0.0.1")
    dns_server.add("loop.test", "MX", "10 mx.loop.test.")
    dns_server.add("mx.loop.test", "A", "127.0.0.1")
    srv = make_server(listener=[{"kind": "mx", "address": f"127.0.0.1:{port}"}],
                      outbound={**FAST, "port": port})
    send(srv, ["carol@loop.test"], message("loop"))
    [raw] = srv.wait_delivered(SENDER, 1)
    text = raw.decode()
    assert "Status: 5.4.6" in text and "loops back to myself" in text
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")


@pytest.fixture
def relay_cert(ca, tmp_path):
    cert = ca.issue_cert("127.2.0.1")
    ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pw = tmp_path / "relay-password"
    pw.write_text("s3cret pass\n")
    return ctx, ca_file, pw


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_relayhost_with_tls_and_auth(make_server, relay_cert, sinks, mode):
    ctx, ca_file, pw = relay_cert
    port = free_port("127.2.0.1")
    relay = sink("127.2.0.1", port, tls_context=ctx, implicit_tls=mode == "implicit",
                 auth=("relayuser", "s3cret pass"))
    sinks.append(relay)
    srv = make_server(outbound={**FAST, "relayhost": f"127.2.0.1:{port}", "relayhost_tls": mode,
                                "relayhost_username": "relayuser", "relayhost_password_file": str(pw),
                                "relayhost_ca_file": str(ca_file)})
    send(srv, ["dave@anywhere.test", "erin@elsewhere.test"], message("via relayhost"))
    [msg] = relay.wait_messages(1)
    assert msg.auth == "relayuser" and msg.tls in ("TLSv1.2", "TLSv1.3")
    assert sorted(msg.recipients) == ["dave@anywhere.test", "erin@elsewhere.test"]


def test_relayhost_certificate_must_verify(make_server, relay_cert, sinks, caplog):
    ctx, _ca_file, pw = relay_cert
    port = free_port("127.2.0.1")
    relay = sink("127.2.0.1", port, tls_context=ctx, auth=("relayuser", "s3cret pass"))
    sinks.append(relay)
    srv = make_server(outbound={**FAST, "relayhost": f"127.2.0.1:{port}", "relayhost_username": "relayuser",
                                "relayhost_password_file": str(pw)})  # no relayhost_ca_file: untrusted
    with caplog.at_level(logging.INFO, logger="yuubin.outbound"):
        send(srv, ["dave@anywhere.test"], message("unverified"))
        wait_until(lambda: any("event=deferred" in r.getMessage() for r in caplog.records), what="a deferral")
    assert relay.messages == []
    assert not any(c.startswith("AUTH") for c in relay.commands)  # the password never left
    assert spool_ids(srv)  # still queued, to be retried


def _queue_cli(cfg_path: Path, *args: str, capsys) -> str:
    capsys.readouterr()
    rc = cli.main(["-c", str(cfg_path), "queue", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


@pytest.mark.slow
def test_queue_tools_hold_release_flush_delete(make_server, dns_server, mx_port, sinks, capsys):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    answer = {"rcpt": "451 4.7.1 greylisted"}
    remote = sink("127.1.0.1", mx_port, rcpt_reply=lambda rcpt, n: answer["rcpt"])
    sinks.append(remote)
    srv = make_server(outbound={**FAST, "port": mx_port, "retry_first": "1h", "retry_max": "2h"})
    cfg_path = srv.config_file()
    send(srv, ["carol@remote.test"], message("first"))
    send(srv, ["dan@remote.test"], message("second"), sender="bob@example.test")
    wait_until(lambda: len([c for c in remote.commands if c.startswith("RCPT")]) == 2, what="two attempts")
    wait_until(lambda: all(r["state"] == "deferred" for r in
                           json.loads(_queue_cli(cfg_path, "list", "--json", capsys=capsys))), what="deferred")
    rows = json.loads(_queue_cli(cfg_path, "list", "--json", capsys=capsys))
    assert len(rows) == 2 and all("451 4.7.1 greylisted" in r["last_error"] for r in rows)
    first = next(r["id"] for r in rows if r["sender"] == SENDER)
    table = _queue_cli(cfg_path, "list", capsys=capsys)
    assert first in table and "greylisted" in table
    assert "Subject: first" in _queue_cli(cfg_path, "show", first, capsys=capsys)

    _queue_cli(cfg_path, "hold", first, capsys=capsys)
    answer["rcpt"] = "250 2.1.5 OK"
    _queue_cli(cfg_path, "flush", capsys=capsys)  # retry now, despite the 1h backoff
    [msg] = remote.wait_messages(1)
    assert msg.recipients == ["dan@remote.test"]  # the held one stayed
    time.sleep(1.5)
    assert len(remote.messages) == 1 and spool_ids(srv) == [first]

    _queue_cli(cfg_path, "release", first, capsys=capsys)
    remote.wait_messages(2)
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")

    answer["rcpt"] = "451 4.7.1 greylisted"
    send(srv, ["carol@remote.test"], message("third"))
    wait_until(lambda: spool_ids(srv) and json.loads(_queue_cli(cfg_path, "list", "--json", capsys=capsys))[0]
               ["state"] == "deferred", what="deferred")
    out = _queue_cli(cfg_path, "delete", "--sender", SENDER, capsys=capsys)
    assert "deleted 1 entry" in out and not spool_ids(srv)
    assert cli.main(["-c", str(cfg_path), "queue", "show", "nosuchid"]) == 2


@pytest.mark.slow
def test_delay_warning_then_expiry_after_the_queue_lifetime(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port, rcpt_reply=lambda rcpt, n: "451 4.3.0 try again later")
    sinks.append(remote)
    srv = server(make_server, mx_port, delay_warning="0.5s", queue_lifetime="2s")
    send(srv, ["carol@remote.test"], message("slow"))
    first = srv.wait_delivered(SENDER, 1)[0].decode()
    assert "Action: delayed" in first and "Will-Retry-Until:" in first and "Status: 4.3.0" in first
    both = srv.wait_delivered(SENDER, 2, timeout=10)
    final = both[1].decode() if "Action: failed" in both[1].decode() else both[0].decode()
    assert "Action: failed" in final and "Status: 4.4.7" in final and "gave up after" in final
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")
    time.sleep(0.5)
    assert len(srv.delivered(SENDER)) == 2  # one warning, one failure: no repeats
    assert remote.messages == []


def test_concurrency_per_destination_domain_is_limited(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port, data_delay=0.3)
    sinks.append(remote)
    srv = server(make_server, mx_port, max_per_domain=2)
    for i in range(6):
        send(srv, [f"user{i}@remote.test"], message(f"parallel {i}"))
    remote.wait_messages(6)
    assert remote.max_active == 2  # parallel, but never more than max_per_domain


def test_smtputf8_and_size_limits_of_the_peer_are_honoured(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port, smtputf8=False, size_limit=2000)
    sinks.append(remote)
    srv = server(make_server, mx_port)
    with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
        c.ehlo()
        c.sendmail(SENDER, ["ユーザー@remote.test"], message("utf8").encode(), mail_options=["SMTPUTF8"])
    send(srv, ["carol@remote.test"], message("big", "x" * 3000 + "\r\n"))
    dsns = [m.decode() for m in srv.wait_delivered(SENDER, 2)]
    assert any("Status: 5.6.7" in d and "SMTPUTF8" in d for d in dsns)
    assert any("Status: 5.3.4" in d and "exceeds the limit 2000" in d for d in dsns)
    assert remote.messages == [] and not any(c.startswith("MAIL") for c in remote.commands)


def test_authenticated_submission_that_fails_is_bounced_to_its_sender(make_server, dns_server, mx_port, sinks,
                                                                     client_tls):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = sink("127.1.0.1", mx_port, rcpt_reply=lambda rcpt, n: "550 5.7.1 rejected by policy")
    sinks.append(remote)
    srv = make_server(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                {"kind": "submission", "address": "127.0.0.1:0"}],
                      outbound={**FAST, "port": mx_port})
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), source_address=("127.1.0.10", 0), timeout=10) as c:
        c.starttls(context=client_tls)  # from "the internet": only AUTH makes it ours
        c.login(SENDER, "correct horse battery staple")
        c.sendmail(SENDER, ["carol@remote.test"], message("submitted"))
    [raw] = srv.wait_delivered(SENDER, 1)
    text = raw.decode()
    assert "Action: failed" in text and "Status: 5.7.1" in text and "Subject: submitted" in text
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to own the spool as another user")
def test_queue_tools_run_as_root_keep_entries_readable_by_the_spool_owner():
    import asyncio
    import os
    import pwd
    import shutil
    import tempfile

    from yuubin.durable import GroupCommitter
    from yuubin.queue.spool import Spool

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="yuubin-owner-"))
    try:
        os.chmod(base, 0o755)
        spool = Spool(base / "data" / "spool", GroupCommitter(workers=1))
        env = _env(remote=[RemoteRecipient("carol@remote.test", rcpt="carol@remote.test")])
        asyncio.run(spool.store(env, b"Subject: x\r\n\r\nbody\r\n"))
        spool.committer.shutdown()
        for p in [base / "data", *(base / "data").rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        cfg = ServerConfig(base).write()
        r = run_yuubin(["queue", "hold", env.id], config=cfg, timeout=30)
        assert r.returncode == 0, r.stderr
        entry = base / "data" / "spool" / "queue" / env.id
        assert entry.stat().st_uid == nobody.pw_uid  # rewritten as the owner, not as root
        assert (base / "data" / "spool" / "queue.lock").stat().st_uid == nobody.pw_uid
        assert Spool(base / "data" / "spool", None).load(env.id)[0].held
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_one_message_to_two_domains_is_tracked_per_recipient(make_server, dns_server, mx_port, sinks):
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    dns_server.add("other.example", "MX", "10 mx.other.example.")
    dns_server.add("mx.other.example", "A", "127.1.0.7")
    good = sink("127.1.0.1", mx_port, data_delay=0.2)
    bad = sink("127.1.0.7", mx_port, rcpt_reply=lambda rcpt, n: "451 4.3.0 later" if n == 1 else "550 5.1.1 gone")
    sinks.extend([good, bad])
    srv = server(make_server, mx_port)
    send(srv, ["carol@remote.test", "dave@other.example"], message("two domains"))
    [msg] = good.wait_messages(1)
    assert msg.recipients == ["carol@remote.test"]
    [raw] = srv.wait_delivered(SENDER, 1)
    text = raw.decode()
    assert "Final-Recipient: rfc822; dave@other.example" in text and "carol@remote.test" not in text.split(
        "Content-Type: message/delivery-status")[1].split("Content-Type: text/rfc822-headers")[0]
    wait_until(lambda: not spool_ids(srv), what="the spool to empty")
    assert len(good.messages) == 1  # the retry for dave did not resend to carol
