"""Interop with a real Postfix (Debian package), run by the test as a private instance on loopback.

The instance has its own config_directory and queue_directory (`postfix -c DIR`), listens on
127.0.5.1, relays everything to yuubin (`relayhost = [127.0.0.1]:PORT`) and rewrites
relay@postfix.test to bob@example.test. So one message goes yuubin → Postfix (as the MX of
postfix.test, over STARTTLS) → yuubin → bob's Maildir, and another goes Postfix → yuubin.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import free_port

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(POSTFIX is None, reason="the postfix binary is not installed (Debian package `postfix`)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root to start its master"),
]

PF_ADDR = "127.0.5.1"

MASTER_CF = """\
{addr}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{yuubin_port}
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_alias_maps = inline:{{ relay@postfix.test=bob@example.test }}
alias_maps =
alias_database =
local_recipient_maps =
smtpd_tls_security_level = may
smtpd_tls_cert_file = {base}/tls/cert.pem
smtpd_tls_key_file = {base}/tls/key.pem
smtp_tls_security_level = may
maillog_file_prefixes = {base}
maillog_file = {base}/maillog
smtputf8_enable = no
"""


@pytest.fixture
def postfix_instance(tls_files):
    """Yield a function that starts the instance relaying to yuubin's port; stopped afterwards."""
    base = Path(tempfile.mkdtemp(prefix="yuubin-postfix-"))  # not under pytest's 0700 tmp: postfix must read it
    os.chmod(base, 0o755)
    port = free_port(PF_ADDR)
    started: list[Path] = []

    def start(yuubin_port: int) -> int:
        etc = base / "etc"
        for d in ("etc", "queue", "data", "tls"):
            (base / d).mkdir(exist_ok=True)
            os.chmod(base / d, 0o755)
        shutil.copy(tls_files[0], base / "tls" / "cert.pem")
        shutil.copy(tls_files[1], base / "tls" / "key.pem")
        (etc / "main.cf").write_text(MAIN_CF.format(base=base, addr=PF_ADDR, yuubin_port=yuubin_port))
        (etc / "master.cf").write_text(MASTER_CF.format(addr=PF_ADDR, port=port))
        data = base / "data"
        shutil.chown(data, "postfix", "postfix")
        r = subprocess.run([POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"postfix start failed: {r.stdout}{r.stderr}")
        started.append(etc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((PF_ADDR, port), timeout=1):
                    return port
            except OSError:
                time.sleep(0.1)
        pytest.fail("postfix did not start listening: " + maillog())

    def maillog() -> str:
        p = base / "maillog"
        return p.read_text(errors="replace") if p.exists() else "(no maillog)"

    start.maillog = maillog  # type: ignore[attr-defined]
    start.port = port  # type: ignore[attr-defined]
    yield start
    for etc in started:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, timeout=60)
    shutil.rmtree(base, ignore_errors=True)


def test_postfix_receives_what_yuubin_relays_and_relays_into_yuubin(make_server, dns_server, postfix_instance):
    pf_port = postfix_instance.port
    dns_server.add("postfix.test", "MX", "10 smtp.postfix.test.")
    dns_server.add("smtp.postfix.test", "A", PF_ADDR)
    srv = make_server(outbound={"port": pf_port, "retry_first": "1s", "retry_max": "2s", "queue_scan": "1s"})
    postfix_instance(srv.port())

    # yuubin → Postfix (MX of postfix.test) → back into yuubin by Postfix's relayhost → bob
    with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
        c.sendmail("alice@example.test", ["relay@postfix.test"],
                   "From: <alice@example.test>\r\nSubject: via postfix\r\n\r\nround trip\r\n.dot line\r\n")
    # Postfix → yuubin directly
    with smtplib.SMTP(PF_ADDR, pf_port, timeout=10) as c:
        c.sendmail("someone@postfix.test", ["alice@example.test"],
                   "From: <someone@postfix.test>\r\nSubject: from postfix\r\n\r\nhello\r\n")
    try:
        [round_trip] = srv.wait_delivered("bob@example.test", 1, timeout=30)
        [direct] = srv.wait_delivered("alice@example.test", 1, timeout=30)
    except AssertionError:
        raise AssertionError("not delivered; postfix log:\n" + postfix_instance.maillog()) from None
    msg = email.message_from_bytes(round_trip, policy=email.policy.default)
    assert msg["Subject"] == "via postfix"
    received = msg.get_all("Received")
    assert any("postfix.test" in r and "ESMTPS" in r for r in received), received  # yuubin → Postfix used TLS
    assert any("by mx.test.example (yuubin)" in r for r in received)
    assert b"\r\n.dot line\r\n" in round_trip
    # Postfix logs status=sent once it has yuubin's 250, which comes after the Maildir copy is
    # durable: the mail can be seen before that line is written.
    deadline = time.monotonic() + 10
    log = postfix_instance.maillog()
    while not ("relay@postfix.test" in log and "status=sent" in log) and time.monotonic() < deadline:
        time.sleep(0.05)
        log = postfix_instance.maillog()
    assert "relay@postfix.test" in log and "status=sent" in log
    assert b"Subject: from postfix" in direct
    assert b"postfix.test" in direct
