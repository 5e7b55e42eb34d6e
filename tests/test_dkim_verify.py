"""DKIM verification: signatures made in the test with dkimpy, the RFC 8463 example, and every way
a signature can fail, with keys served by a fixed resolver or the real test DNS server."""

from __future__ import annotations

import asyncio
import base64
import subprocess

import dkim
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dnsserver import TestDNSServer
from yuubin.dns import LookupResult, Resolver
from yuubin.mailauth import dkim as yd
from yuubin.mailauth.dkim import DkimResult, verify_message

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Date: Sat, 28 Nov 2026 04:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
)


class FixedResolver:
    """TXT answers from a dict; a name missing from it is NXDOMAIN; counts the lookups."""

    def __init__(self, answers: dict[str, LookupResult] | None = None, delay: float = 0.0):
        self.answers = answers or {}
        self.delay = delay
        self.asked: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        self.asked.append((name, rdtype))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answers.get(name.lower(), LookupResult("nxdomain"))


def rsa_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PEM private key, DNS TXT record); openssl makes the keys too small for cryptography to make."""
    if bits >= 1024:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        made = subprocess.run(["openssl", "genrsa", str(bits)], capture_output=True, check=True).stdout
        key = serialization.load_pem_private_key(made, None)  # type: ignore[assignment]
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def ed_key() -> tuple[bytes, str]:
    key = nacl.signing.SigningKey.generate()
    private = key.encode(encoder=nacl.encoding.Base64Encoder)
    public = key.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return private, "v=DKIM1; k=ed25519; p=" + public


RSA_PEM, RSA_TXT = rsa_key()
ED_PRIV, ED_TXT = ed_key()


def sign(message: bytes, selector: str, private: bytes, algorithm: bytes = b"rsa-sha256", *,
         domain: str = "example.test", length: bool = False) -> bytes:
    header = dkim.sign(message, selector.encode(), domain.encode(), private, signature_algorithm=algorithm,
                       canonicalize=(b"relaxed", b"relaxed"), length=length,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + message


def ok(record: str) -> LookupResult:
    return LookupResult("ok", (record,), 300)


KEYS = {"r1._domainkey.example.test": ok(RSA_TXT), "e1._domainkey.example.test": ok(ED_TXT)}


async def test_unsigned_message_has_no_results() -> None:
    assert await verify_message(MESSAGE, FixedResolver(), timeout=1) == []


async def test_rsa_and_ed25519_signatures_both_pass() -> None:
    signed = sign(sign(MESSAGE, "r1", RSA_PEM), "e1", ED_PRIV, b"ed25519-sha256")
    results = await verify_message(signed, FixedResolver(dict(KEYS)), timeout=1)
    assert [(r.result, r.algorithm, r.selector, r.domain) for r in results] == [
        ("pass", "ed25519-sha256", "e1", "example.test"),
        ("pass", "rsa-sha256", "r1", "example.test"),
    ]
    b_value = dkim.util.parse_tag_value(signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1]
                                        .replace(b"\r\n", b""))[b"b"]
    assert results[0].header_b == b_value.replace(b" ", b"").decode()[:12]
    assert len(results[0].header_b) == 12


async def test_keys_are_fetched_once_and_all_together() -> None:
    signed = sign(sign(MESSAGE, "r1", RSA_PEM), "e1", ED_PRIV, b"ed25519-sha256")
    resolver = FixedResolver(dict(KEYS), delay=0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await verify_message(signed, resolver, timeout=2)
    assert loop.time() - start < 0.55  # two 0.3 s lookups in parallel, not one after the other
    assert sorted(resolver.asked) == [("e1._domainkey.example.test", "TXT"), ("r1._domainkey.example.test", "TXT")]


async def test_altered_body_fails() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM).replace(b"noon", b"one")
    [result] = await verify_message(signed, FixedResolver(dict(KEYS)), timeout=1)
    assert result.result == "fail"
    assert "body hash" in result.reason


async def test_altered_header_fails() -> None:
    for selector, key, algorithm in (("r1", RSA_PEM, b"rsa-sha256"), ("e1", ED_PRIV, b"ed25519-sha256")):
        signed = sign(MESSAGE, selector, key, algorithm).replace(b"Subject: lunch", b"Subject: dinner")
        [result] = await verify_message(signed, FixedResolver(dict(KEYS)), timeout=1)
        assert result.result == "fail", result
        assert result.reason == "signature did not verify"


async def test_added_second_from_fails() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM) + b""
    head, body = signed.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nFrom: Mallory <ceo@example.test>\r\n\r\n" + body
    [result] = await verify_message(forged, FixedResolver(dict(KEYS)), timeout=1)
    assert result.result == "fail"


async def test_length_tag_is_suspect() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM, length=True)
    [result] = await verify_message(signed, FixedResolver(dict(KEYS)), timeout=1)
    assert result.result == "pass"
    assert result.reason.startswith("suspect: l=")
    appended = signed + b"Click here: http://phish.example/\r\n"
    [result] = await verify_message(appended, FixedResolver(dict(KEYS)), timeout=1)
    assert result.result == "pass"
    assert "unsigned" in result.reason and "35 of" in result.reason


async def test_rsa_sha1_is_refused_without_a_lookup() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM, b"rsa-sha1")
    resolver = FixedResolver(dict(KEYS))
    [result] = await verify_message(signed, resolver, timeout=1)
    assert result.result == "policy"
    assert "rsa-sha1" in result.reason and "8301" in result.reason
    assert resolver.asked == []


async def test_small_rsa_key_fails() -> None:
    pem, txt = rsa_key(768)
    signed = sign(MESSAGE, "small", pem)
    [result] = await verify_message(signed, FixedResolver({"small._domainkey.example.test": ok(txt)}), timeout=1)
    assert result.result == "fail"
    assert "768 bits" in result.reason


async def test_missing_key_is_permerror() -> None:
    signed = sign(MESSAGE, "gone", RSA_PEM)
    [result] = await verify_message(signed, FixedResolver(), timeout=1)
    assert result.result == "permerror"
    assert "gone._domainkey.example.test" in result.reason and "nxdomain" in result.reason


async def test_revoked_and_malformed_keys_are_permerror() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM)
    for record, words in (("v=DKIM1; k=rsa; p=", "revoked"), ("v=DKIM1; k=rsa; p=AAAA", "bad key")):
        [result] = await verify_message(
            signed, FixedResolver({"r1._domainkey.example.test": ok(record)}), timeout=1)
        assert result.result == "permerror", record
        assert words in result.reason


async def test_key_type_must_match_the_algorithm() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM)
    [result] = await verify_message(signed, FixedResolver({"r1._domainkey.example.test": ok(ED_TXT)}), timeout=1)
    assert result.result == "permerror"


async def test_malformed_signature_is_permerror() -> None:
    bad = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=r1; bh=AAAA; b=AAAA\r\n" + MESSAGE
    [result] = await verify_message(bad, FixedResolver(dict(KEYS)), timeout=1)
    assert result.result == "permerror"
    assert "h=" in result.reason


async def test_servfail_is_temperror() -> None:
    signed = sign(MESSAGE, "r1", RSA_PEM)
    [result] = await verify_message(
        signed, FixedResolver({"r1._domainkey.example.test": LookupResult("servfail")}), timeout=1)
    assert result.result == "temperror"


async def test_slow_key_is_temperror_within_the_timeout() -> None:
    signed = sign(sign(MESSAGE, "r1", RSA_PEM), "e1", ED_PRIV, b"ed25519-sha256")

    class HalfSlow(FixedResolver):
        async def lookup(self, name: str, rdtype: str) -> LookupResult:
            if name.startswith("r1."):
                await asyncio.sleep(5)
            return await super().lookup(name, rdtype)

    loop = asyncio.get_running_loop()
    start = loop.time()
    results = await verify_message(signed, HalfSlow(dict(KEYS)), timeout=0.3)
    assert loop.time() - start < 1.0
    assert [r.result for r in results] == ["pass", "temperror"]
    assert "timed out" in results[1].reason


async def test_signatures_past_the_limit_are_not_checked() -> None:
    signed = MESSAGE
    for _ in range(4):
        signed = sign(signed, "e1", ED_PRIV, b"ed25519-sha256")
    resolver = FixedResolver(dict(KEYS))
    results = await verify_message(signed, resolver, timeout=1, max_signatures=2)
    assert [r.result for r in results][2:] == ["policy", "policy"]
    assert "more than 2" in results[3].reason
    assert all(r.result in ("pass", "fail") for r in results[:2])


async def test_large_message_is_verified_in_a_thread(monkeypatch) -> None:
    body = b"x" * 70 + b"\r\n"
    big = MESSAGE + body * (yd.LARGE_MESSAGE // len(body) + 10)
    signed = sign(big, "r1", RSA_PEM)
    threaded: list[object] = []
    real = asyncio.to_thread

    async def spy(fn, *args):  # type: ignore[no-untyped-def]
        threaded.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(yd.asyncio, "to_thread", spy)
    [result] = await verify_message(signed, FixedResolver(dict(KEYS)), timeout=2)
    assert result.result == "pass"
    assert threaded
    threaded.clear()
    await verify_message(sign(MESSAGE, "r1", RSA_PEM), FixedResolver(dict(KEYS)), timeout=2)
    assert not threaded


# RFC 8463, Appendix A: the signed example message and its two keys (A.2, A.3).
RFC8463_MESSAGE = b"\r\n".join([
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
    b" subject : date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
    b" date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
    b"From: Joe SixPack <joe@football.example.com>",
    b"To: Suzie Q <suzie@shopping.example.net>",
    b"Subject: Is dinner ready?",
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>",
    b"",
    b"Hi.",
    b"",
    b"We lost the game.  Are you hungry yet?",
    b"",
    b"Joe.",
    b"",
])
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com":
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "test._domainkey.football.example.com":
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
        "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
        "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
        "Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
}


async def test_rfc8463_example_over_the_test_dns_server(dns_server: TestDNSServer, resolver: Resolver) -> None:
    for name, record in RFC8463_KEYS.items():
        dns_server.add(name, "TXT", record)
    results = await verify_message(RFC8463_MESSAGE, resolver, timeout=2)
    assert results == [
        DkimResult("pass", "football.example.com", "brisbane", "ed25519-sha256", "good signature", "/gCrinpcQOoI"),
        DkimResult("pass", "football.example.com", "test", "rsa-sha256", "good signature", "F45dVWDfMbQD"),
    ]
    tampered = RFC8463_MESSAGE.replace(b"hungry", b"thirsty")
    assert [r.result for r in await verify_message(tampered, resolver, timeout=2)] == ["fail", "fail"]


async def test_dns_server_timeout_and_nxdomain(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("brisbane._domainkey.football.example.com", "TXT",
                   RFC8463_KEYS["brisbane._domainkey.football.example.com"])
    dns_server.set_behaviour("test._domainkey.football.example.com", "timeout")
    results = await verify_message(RFC8463_MESSAGE, resolver, timeout=2)
    assert [r.result for r in results] == ["pass", "temperror"]
    dns_server.clear()
    results = await verify_message(RFC8463_MESSAGE, Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.5),
                                   timeout=2)
    assert [r.result for r in results] == ["permerror", "permerror"]


@pytest.mark.parametrize("record", ["v=spf1 -all", "v=DKIM1; k=rsa; p=" + "A" * 10])
async def test_one_bad_record_among_several(record: str) -> None:
    # a TXT RRset with an unrelated record beside the key: the key is used
    answers = {"r1._domainkey.example.test": LookupResult("ok", ("v=spf1 -all", RSA_TXT), 300)}
    [result] = await verify_message(sign(MESSAGE, "r1", RSA_PEM), FixedResolver(answers), timeout=1)
    assert result.result == "pass"


_TAGS = st.sampled_from([b"v=1", b"a=rsa-sha256", b"a=ed25519-sha256", b"a=rsa-sha1", b"d=example.test",
                         b"s=r1", b"s=e1", b"h=from:to", b"h=", b"bh=AAAA", b"b=AAAA", b"l=5", b"l=x",
                         b"c=relaxed/relaxed", b"c=bogus", b"x=1", b"t=99999999999", b"i=@other.test",
                         b"q=dns/txt", b"=", b"", b"\xff"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_TAGS, max_size=9), min_size=1, max_size=3), st.binary(max_size=200))
def test_hostile_signatures_give_results_never_exceptions(sigs: list[list[bytes]], tail: bytes) -> None:
    head = b"".join(b"DKIM-Signature: " + b"; ".join(tags) + b"\r\n" for tags in sigs)
    results = asyncio.run(verify_message(head + MESSAGE + tail, FixedResolver(dict(KEYS)), timeout=1))
    assert len(results) == len(sigs)
    assert {r.result for r in results} <= {"pass", "fail", "neutral", "policy", "temperror", "permerror"}
