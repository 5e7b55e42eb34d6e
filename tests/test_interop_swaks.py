"""Interop: Debian's `swaks` (a real third-party SMTP client) talks to yuubin's port 25.

CI installs swaks (see `run`); without it these tests are skipped, saying so.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess

import pytest
import trustme

SWAKS = shutil.which("swaks")
pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (Debian package 'swaks'; CI installs it)")

ACCOUNTS = {"alice@example.test": "correct horse battery staple"}


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """Port 25 never checks passwords: reuse the accounts' Argon2id hashes."""


def swaks(srv, *args: str, source: str = "127.0.0.1") -> subprocess.CompletedProcess:
    cmd = [SWAKS, "--server", "127.0.0.1", "--port", str(srv.port("mx")), "--local-interface", source,
           "--helo", "client.remote.example", "--from", "sender@remote.example", "--timeout", "10", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def received(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return " ".join(str(msg["Received"]).split())


def test_swaks_plain(make_server):
    srv = make_server(accounts=ACCOUNTS)
    p = swaks(srv, "--to", "alice@example.test", "--header", "Subject: swaks plain", "--body", "plain body")
    assert p.returncode == 0, p.stdout + p.stderr
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert raw.startswith(b"Return-Path: <sender@remote.example>\r\nDelivered-To: alice@example.test\r\n")
    assert b"Subject: swaks plain" in raw and b"plain body" in raw
    assert "with ESMTP " in received(raw) and "TLS" not in received(raw)


def test_swaks_starttls_with_certificate_verification(make_server, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    srv = make_server(accounts=ACCOUNTS)
    p = swaks(srv, "--to", "alice@example.test", "--tls", "--tls-verify", "--tls-ca-path", str(ca_file),
              "--header", "Subject: swaks tls", "--body", "secret body", source="127.1.0.20")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "TLS started" in out
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    r = received(raw)
    assert "with ESMTPS " in r and "TLSv1." in r and "[127.1.0.20]" in r
    assert b"secret body" in raw

    # The verification is real: with another CA, swaks refuses the certificate and sends nothing.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    p = swaks(srv, "--to", "alice@example.test", "--tls", "--tls-verify", "--tls-ca-path", str(other),
              "--header", "Subject: must not arrive", source="127.1.0.20")
    assert p.returncode != 0, p.stdout + p.stderr
    assert len(srv.delivered("alice@example.test")) == 1


def test_swaks_pipelining(make_server):
    srv = make_server(accounts=ACCOUNTS)
    p = swaks(srv, "--to", "alice@example.test", "--pipeline", "--header", "Subject: swaks pipelined",
              source="127.1.0.21")
    assert p.returncode == 0, p.stdout + p.stderr
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert b"Subject: swaks pipelined" in raw


def test_swaks_relay_is_denied_for_the_internet(make_server):
    srv = make_server(accounts=ACCOUNTS)
    p = swaks(srv, "--to", "victim@remote.example", "--tls", source="127.1.0.22")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "554 5.7.1" in out
    assert list((srv.config.data_dir / "spool" / "queue").iterdir()) == []


def test_swaks_cannot_authenticate_on_port_25(make_server):
    srv = make_server(accounts=ACCOUNTS)
    p = swaks(srv, "--to", "alice@example.test", "--tls", "--auth", "PLAIN", "--auth-user", "alice@example.test",
              "--auth-password", ACCOUNTS["alice@example.test"], source="127.1.0.23")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "did not advertise authentication" in out
    assert srv.delivered("alice@example.test") == []
