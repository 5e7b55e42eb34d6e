"""Interop: msmtp (what many home users and cron jobs submit with) on 587 and 465 with AUTH."""

from __future__ import annotations

import shutil
import subprocess

import pytest

ALICE, ALICE_PW = "alice@example.test", "correct horse battery staple"
LISTENERS = [
    {"kind": "mx", "address": "127.0.0.1:0"},
    {"kind": "submission", "address": "127.0.0.1:0"},
    {"kind": "submissions", "address": "127.0.0.1:0"},
]

pytestmark = pytest.mark.skipif(shutil.which("msmtp") is None,
                                reason="msmtp is not installed (Debian package msmtp); interop not tested")


def msmtp(tmp_path, ca, port: int, starttls: bool, password: str, auth: str = "on"):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    rc = tmp_path / f"msmtprc-{port}"
    rc.write_text(f"""defaults
tls on
tls_starttls {'on' if starttls else 'off'}
tls_trust_file {ca_file}
tls_certcheck on
account default
host 127.0.0.1
port {port}
source_ip 127.1.0.50
domain client.test
from {ALICE}
auth {auth}
user {ALICE}
password {password}
""")
    rc.chmod(0o600)
    message = f"From: Alice <{ALICE}>\nTo: bob@example.test\nSubject: via msmtp port {port}\n\nhello\n"
    return subprocess.run(["msmtp", "-C", str(rc), "bob@example.test"], input=message, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("kind, starttls", [("submission", True), ("submissions", False)])
@pytest.mark.parametrize("auth", ["plain", "login"])
def test_msmtp_submits(make_server, ca, tmp_path, kind, starttls, auth):
    srv = make_server(listener=LISTENERS)
    res = msmtp(tmp_path, ca, srv.port(kind), starttls, ALICE_PW, auth)
    assert res.returncode == 0, res.stderr + res.stdout
    [m] = srv.wait_delivered("bob@example.test", 1)
    assert f"Subject: via msmtp port {srv.port(kind)}".encode() in m
    assert b"with ESMTPSA" in m and b"127.1.0.50" not in m


def test_msmtp_wrong_password_fails_cleanly(make_server, ca, tmp_path):
    srv = make_server(listener=LISTENERS)
    res = msmtp(tmp_path, ca, srv.port("submission"), True, "wrong password")
    assert res.returncode != 0
    assert "535" in res.stderr or "authentication failed" in res.stderr.lower()
    assert srv.delivered("bob@example.test") == []


@pytest.mark.slow
def test_localserve_demo_account_submits_on_2587_and_2465(tmp_path):
    """The README's "point a mail client at 2587/2465" works out of the box (msmtp as the client)."""
    import re

    from tests.harness import LocalServe, port_2525
    d = tmp_path / "ls"
    with port_2525():
        ls = LocalServe(d)
        try:
            text = ls.banner()
            password = re.search(r"demo@localhost\.test\s+password:\s*(\S+)", text).group(1)
            assert re.search(r"submission\s+127\.0\.0\.1:2587\b", text), text
            assert re.search(r"submissions\s+127\.0\.0\.1:2465\b", text), text
            for port, starttls in ((2587, True), (2465, False)):
                rc = tmp_path / f"rc{port}"
                rc.write_text(f"account default\nhost 127.0.0.1\nport {port}\ntls on\n"
                              f"tls_starttls {'on' if starttls else 'off'}\ntls_trust_file {d / 'tls' / 'cert.pem'}\n"
                              "tls_host_override localhost\nauth on\nuser demo@localhost.test\n"
                              f"password {password}\nfrom demo@localhost.test\n")
                rc.chmod(0o600)
                res = subprocess.run(["msmtp", "-C", str(rc), "demo@localhost.test"], capture_output=True, text=True,
                                     input=f"From: demo@localhost.test\nSubject: port {port}\n\nhi\n", timeout=60)
                assert res.returncode == 0, res.stderr
            assert len(ls.wait_delivered("demo@localhost.test", 2)) == 2
        finally:
            assert ls.interrupt() == 0
