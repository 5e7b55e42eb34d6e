"""Outbound DKIM signing: the key store, the signer, and yuubin's signatures checked by independent
verifiers (opendkim-testmsg, dkimpy) through the test DNS server; end to end from 587 to a remote MX."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import smtplib
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.dnsserver import TestDNSServer
from tests.smtpsink import SmtpSink
from tests.test_dkim_verify import FixedResolver
from tests.test_outbound import FAST, free_port, wait_until
from yuubin.dns import LookupResult, Resolver
from yuubin.mailauth import dkimkeys
from yuubin.mailauth.dkim import verify_message
from yuubin.mailauth.dkimsign import DkimSigner

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: carol@remote.test\r\n"
    b"Subject: signed\r\n"
    b"Date: Sat, 28 Nov 2026 04:00:00 +0000\r\n"
    b"Message-ID: <s1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Carol,\r\n\r\nsee you.\r\n"
)


def published(data_dir: Path, domain: str = "example.test") -> dict[str, LookupResult]:
    out = {}
    for s in dkimkeys.key_sets(data_dir, domain):
        for k in s.keys:
            out[k.dns_name] = LookupResult("ok", (k.txt_record(),), 300)
    return out


def split_signatures(signed: bytes) -> tuple[list[bytes], bytes]:
    """The DKIM-Signature header fields (folded lines kept) and the rest of the message."""
    sigs = []
    rest = signed
    while rest.startswith(b"DKIM-Signature:"):
        found = re.match(rb"DKIM-Signature:.*?\r\n(?=\S)", rest, re.S)
        assert found is not None
        sigs.append(found.group(0))
        rest = rest[found.end():]
    return sigs, rest


# ---- the key store ----

def test_keygen_layout_modes_and_never_overwrites(tmp_path: Path) -> None:
    made = dkimkeys.generate(tmp_path, "Example.TEST", "y2026a")
    assert made.complete and made.domain == "example.test"
    assert [k.path.name for k in made.keys] == ["y2026a-rsa.key", "y2026a-ed25519.key"]
    assert [k.selector for k in made.keys] == ["y2026a-rsa", "y2026a-ed25519"]
    for path in (tmp_path / "dkim", tmp_path / "dkim" / "example.test"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for k in made.keys:
        assert stat.S_IMODE(k.path.stat().st_mode) == 0o600
        assert k.path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    rsa_key, ed_key = made.keys
    assert rsa_key.txt_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # 2048-bit SubjectPublicKeyInfo
    assert len(ed_key.public_value()) == 44  # raw 32 bytes, base64 (RFC 8463)
    before = rsa_key.path.read_bytes()
    with pytest.raises(FileExistsError):
        dkimkeys.generate(tmp_path, "example.test", "y2026a")
    assert rsa_key.path.read_bytes() == before


def test_set_names_and_the_active_set(tmp_path: Path) -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    assert dkimkeys.next_set_name(tmp_path, "example.test", now) == "y2026a"
    assert dkimkeys.active_set(tmp_path, "example.test") is None
    first = dkimkeys.generate(tmp_path, "example.test", dkimkeys.next_set_name(tmp_path, "example.test", now))
    second = dkimkeys.generate(tmp_path, "example.test", dkimkeys.next_set_name(tmp_path, "example.test", now))
    assert (first.name, second.name) == ("y2026a", "y2026b")
    os.utime(first.keys[0].path, (1_700_000_000, 1_700_000_000))
    os.utime(first.keys[1].path, (1_700_000_000, 1_700_000_000))
    assert dkimkeys.active_set(tmp_path, "example.test").name == "y2026b"  # newest
    assert dkimkeys.active_set(tmp_path, "example.test", ("y2026a",)).name == "y2026a"  # listed: rotation
    assert dkimkeys.active_set(tmp_path, "example.test", ("gone", "y2026a")).name == "y2026a"
    second.keys[1].path.unlink()  # an incomplete set never signs
    assert dkimkeys.active_set(tmp_path, "example.test").name == "y2026a"
    with pytest.raises(ValueError):
        dkimkeys.check_set_name("bad name")


# ---- the signer ----

async def test_two_signatures_relaxed_from_oversigned_and_they_verify(tmp_path: Path) -> None:
    dkimkeys.generate(tmp_path, "example.test", "y2026a")
    signer = DkimSigner.load(tmp_path, ["example.test", "other.test"])
    signed = await signer.sign("alice@example.test", MESSAGE, "Q1")
    sigs, rest = split_signatures(signed)
    assert rest == MESSAGE  # only headers added on top, the message itself untouched
    tags = [dkim.util.parse_tag_value(s.split(b":", 1)[1].replace(b"\r\n", b"")) for s in sigs]
    assert [t[b"a"] for t in tags] == [b"rsa-sha256", b"ed25519-sha256"]
    assert {t[b"c"] for t in tags} == {b"relaxed/relaxed"}
    assert {t[b"d"] for t in tags} == {b"example.test"}
    for t in tags:
        signed_headers = [h.strip() for h in t[b"h"].split(b":")]
        assert signed_headers.count(b"from") == 2  # oversigned: a second From breaks it
        assert {b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"} <= set(signed_headers)
        assert b"l" not in t
    results = await verify_message(signed, FixedResolver(published(tmp_path)), timeout=1)
    assert [(r.result, r.selector) for r in results] == [("pass", "y2026a-rsa"), ("pass", "y2026a-ed25519")]
    forged = signed.replace(b"Subject: signed\r\n", b"Subject: signed\r\nFrom: ceo@example.test\r\n")
    assert {r.result for r in await verify_message(forged, FixedResolver(published(tmp_path)), timeout=1)} == {"fail"}


async def test_which_domain_signs(tmp_path: Path) -> None:
    dkimkeys.generate(tmp_path, "example.test", "y2026a")
    signer = DkimSigner.load(tmp_path, ["example.test", "other.test"])  # other.test has no keys
    assert signer.domain_for("alice@example.test", MESSAGE) == "example.test"
    foreign_from = MESSAGE.replace(b"alice@example.test", b"alice@elsewhere.test")
    assert signer.domain_for("alice@example.test", foreign_from) == "example.test"  # the sender's domain
    assert signer.domain_for("x@elsewhere.test", foreign_from) is None
    assert await signer.sign("x@elsewhere.test", foreign_from) == foreign_from
    assert await signer.sign("", foreign_from) == foreign_from  # a DSN from elsewhere
    folded = MESSAGE.replace(b"From: Alice <alice@example.test>", b"From: \"Alice, A.\"\r\n <alice@example.test>")
    assert signer.domain_for("", folded) == "example.test"


async def test_only_mail_that_originated_here_is_signed(tmp_path: Path) -> None:
    from yuubin.queue.spool import Envelope
    dkimkeys.generate(tmp_path, "example.test", "y2026a")
    signer = DkimSigner.load(tmp_path, ["example.test"])

    def entry(**kw) -> Envelope:
        base = dict(id="Q1", sender="alice@example.test", mail_params={}, local=[], remote=[], received=0.0,
                    client="198.51.100.9", helo="x", listener="mx")
        return Envelope(**{**base, **kw})

    # from outside on port 25, forwarded by an alias, claiming our domain: never vouched for
    assert await signer.sign_entry(entry(), MESSAGE) == MESSAGE
    for ours in (entry(listener="submission", auth="alice@example.test"), entry(trusted=True),
                 entry(listener="bounce", sender=""), entry(listener="internal", sender="")):
        assert (await signer.sign_entry(ours, MESSAGE)).startswith(b"DKIM-Signature:"), ours


async def test_large_message_is_signed_in_a_thread(tmp_path: Path, monkeypatch) -> None:
    from yuubin.mailauth import dkimsign
    dkimkeys.generate(tmp_path, "example.test", "y2026a")
    signer = DkimSigner.load(tmp_path, ["example.test"])
    threaded: list[object] = []
    real = asyncio.to_thread

    async def spy(fn, *args):  # type: ignore[no-untyped-def]
        threaded.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(dkimsign.asyncio, "to_thread", spy)
    big = MESSAGE + b"y" * 78 + b"\r\n" * 1 + (b"z" * 78 + b"\r\n") * 4000
    signed = await signer.sign("alice@example.test", big)
    assert threaded
    assert [r.result for r in await verify_message(signed, FixedResolver(published(tmp_path)), timeout=2)] == \
        ["pass", "pass"]


# ---- independent verifiers over the test DNS server ----

def _dnsfunc(server: TestDNSServer):
    """dkimpy's dnsfunc asking the test DNS server (dnspython, UDP), as dkimpy's own lookup would."""
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        query = dns.message.make_query(name.decode().rstrip("."), dns.rdatatype.TXT)
        reply = dns.query.udp(query, server.address, port=server.port, timeout=timeout)
        for rrset in reply.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return None
    return lookup


async def test_dkimpy_verifies_each_signature_through_dns(tmp_path: Path, dns_server: TestDNSServer) -> None:
    made = dkimkeys.generate(tmp_path, "example.test", "y2026a")
    for k in made.keys:
        dns_server.add(k.dns_name, "TXT", k.txt_record())
    signed = await DkimSigner.load(tmp_path, ["example.test"]).sign("alice@example.test", MESSAGE)
    sigs, rest = split_signatures(signed)
    for sig in sigs:  # one at a time: dkimpy checks the first only
        assert dkim.verify(sig + rest, dnsfunc=_dnsfunc(dns_server))
        assert not dkim.verify(sig + rest.replace(b"see you", b"see me"), dnsfunc=_dnsfunc(dns_server))
    assert ("y2026a-ed25519._domainkey.example.test", "TXT") in dns_server.queries


def _in_own_resolv_conf(resolv: Path, *command: str) -> list[str]:
    """``command`` in a private mount namespace whose /etc/resolv.conf is ``resolv`` (needs root)."""
    return ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv),
            *command]


@pytest.fixture
def port53_dns(tmp_path: Path):
    """A test DNS server on port 53 of a random 127.53.x.y, and a resolv.conf naming it: opendkim and
    dkimpy's command line resolve through libc's resolver, which has no port setting."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to give the verifier its own resolv.conf")
    address = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
    server = TestDNSServer(address, 53).start()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:1\n")
    yield server, resolv
    server.stop()


async def test_opendkim_testmsg_and_dkimverify_accept_our_signatures(tmp_path: Path, port53_dns) -> None:
    server, resolv = port53_dns
    if shutil.which("opendkim-testmsg") is None:
        pytest.fail("opendkim-testmsg is missing: apt-get install opendkim-tools")
    made = dkimkeys.generate(tmp_path, "example.test", "y2026a")
    for k in made.keys:
        server.add(k.dns_name, "TXT", k.txt_record())
    signed = await DkimSigner.load(tmp_path, ["example.test"]).sign("alice@example.test", MESSAGE)
    sigs, rest = split_signatures(signed)
    assert len(sigs) == 2
    dkimverify = [sys.executable, "-m", "dkim.dkimverify"]
    for sig in sigs:  # one signature per run, so that one good signature cannot hide a bad one
        for verifier in (["opendkim-testmsg"], dkimverify):
            good = subprocess.run(_in_own_resolv_conf(resolv, *verifier), input=sig + rest, capture_output=True,
                                  timeout=30)
            assert good.returncode == 0, (verifier, sig, good.stdout, good.stderr)
            bad = subprocess.run(_in_own_resolv_conf(resolv, *verifier), input=sig + rest.replace(b"Carol", b"Carl"),
                                 capture_output=True, timeout=30)
            assert bad.returncode != 0, (verifier, sig)
    asked = {name for name, _ in server.queries}
    assert {"y2026a-rsa._domainkey.example.test", "y2026a-ed25519._domainkey.example.test"} <= asked


# ---- end to end ----

def test_submitted_message_leaves_with_two_valid_signatures(make_server, dns_server, tmp_path, client_tls) -> None:
    data_dir = tmp_path / "data"
    made = dkimkeys.generate(data_dir, "example.test", "y2026a")
    for k in made.keys:
        dns_server.add(k.dns_name, "TXT", k.txt_record())
    mx_port = free_port("127.1.0.1")
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    remote = SmtpSink(host="127.1.0.1", port=mx_port,
                      rcpt_reply=lambda rcpt, n: "451 4.3.0 try again" if n == 1 else "250 2.1.5 OK").start()
    try:
        srv = make_server(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                    {"kind": "submission", "address": "127.0.0.1:0"}],
                          outbound={**FAST, "port": mx_port, "retry_first": "1s"}, data_dir=data_dir)
        with smtplib.SMTP("127.0.0.1", srv.port("submission"), source_address=("127.1.0.10", 0), timeout=10) as c:
            c.starttls(context=client_tls)
            c.login("alice@example.test", "correct horse battery staple")
            c.sendmail("alice@example.test", ["carol@remote.test"], MESSAGE)
        wait_until(lambda: any(c.startswith("RCPT") for c in remote.commands), what="the first attempt")
        spooled = list((srv.config.spool_dir / "queue").iterdir())
        assert spooled and all(b"DKIM-Signature" not in p.read_bytes() for p in spooled)  # signed, never stored
        wait_until(lambda: len(remote.messages) == 1, what="the message at the remote MX")
        got = remote.messages[0].data
        sigs, _rest = split_signatures(got)
        assert len(sigs) == 2
        resolver = Resolver(["127.0.0.1"], port=dns_server.port, timeout=1)
        results = asyncio.run(verify_message(got, resolver, timeout=2))
        assert [(r.result, r.algorithm, r.domain) for r in results] == [
            ("pass", "rsa-sha256", "example.test"), ("pass", "ed25519-sha256", "example.test")]
        for sig in sigs:
            assert dkim.verify(sig + _rest, dnsfunc=_dnsfunc(dns_server))
    finally:
        remote.stop()
