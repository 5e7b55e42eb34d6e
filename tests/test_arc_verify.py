"""ARC chain verification: chains sealed in the test with dkimpy, broken chains, missing keys,
slow keys and the cap on key lookups."""

from __future__ import annotations

import asyncio

import dkim

from tests.dnsserver import TestDNSServer
from tests.test_dkim_verify import ED_PRIV, ED_TXT, MESSAGE, RSA_PEM, RSA_TXT, FixedResolver, ok, sign
from yuubin.dns import LookupResult, Resolver
from yuubin.mailauth import arc as yarc
from yuubin.mailauth.arc import ArcResult, verify_arc


def seal(message: bytes, domain: str, selector: str = "arc", results: str = "dkim=pass") -> bytes:
    """One forwarder's hop: its Authentication-Results, then its ARC set on top."""
    if b"ARC-Seal:" in message and "arc=" not in results:
        results += "; arc=pass"  # dkimpy takes the chain status of a later hop from our own AR
    with_ar = f"Authentication-Results: {domain}; {results} header.d=example.test\r\n".encode() + message
    arc_set = dkim.arc_sign(with_ar, selector.encode(), domain.encode(), RSA_PEM, domain.encode(),
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    assert arc_set, "dkimpy made no ARC set"
    return b"".join(arc_set) + with_ar


def keys(*domains: str, selector: str = "arc") -> dict[str, LookupResult]:
    found = {f"{selector}._domainkey.{d}": ok(RSA_TXT) for d in domains}
    found["r1._domainkey.example.test"] = ok(RSA_TXT)
    found["e1._domainkey.example.test"] = ok(ED_TXT)
    return found


SIGNED = sign(MESSAGE, "e1", ED_PRIV, b"ed25519-sha256")


async def test_no_arc_headers_is_none() -> None:
    resolver = FixedResolver()
    assert await verify_arc(SIGNED, resolver, timeout=1) == ArcResult("none", (), "no ARC headers", "")
    assert resolver.asked == []


async def test_two_hop_chain_passes() -> None:
    hop2 = seal(seal(SIGNED, "list.example.org"), "fwd.example.net")
    result = await verify_arc(hop2, FixedResolver(keys("list.example.org", "fwd.example.net")), timeout=1)
    assert result.result == "pass", result
    assert result.sealers == ("list.example.org", "fwd.example.net")
    assert result.last_aar.startswith("i=2; fwd.example.net")


async def test_body_changed_after_the_last_seal_fails() -> None:
    sealed = seal(SIGNED, "list.example.org").replace(b"noon", b"midnight")
    result = await verify_arc(sealed, FixedResolver(keys("list.example.org")), timeout=1)
    assert result.result == "fail"
    assert result.sealers == ("list.example.org",)


async def test_missing_seal_key_fails() -> None:
    sealed = seal(SIGNED, "list.example.org")
    result = await verify_arc(sealed, FixedResolver(keys()), timeout=1)
    assert result.result == "fail"


async def test_removed_set_fails() -> None:
    hop2 = seal(seal(SIGNED, "list.example.org"), "fwd.example.net")
    _head, body = hop2.split(b"\r\n\r\n", 1)
    lines = dkim.rfc822_parse(hop2)[0]
    kept = [n + b":" + v for n, v in lines if not (n.lower().startswith(b"arc-") and b"i=1" in v)]
    assert len(kept) == len(lines) - 3
    result = await verify_arc(b"".join(kept) + b"\r\n" + body, FixedResolver(keys("list.example.org",
                                                                                     "fwd.example.net")), timeout=1)
    assert result.result == "fail"


async def test_too_many_sets_fails_without_lookups() -> None:
    message = SIGNED
    for hop in range(3):
        message = seal(message, f"hop{hop}.example.org")
    resolver = FixedResolver(keys(*(f"hop{h}.example.org" for h in range(3))))
    result = await verify_arc(message, resolver, timeout=1, max_sets=2)
    assert result.result == "fail"
    assert "more than 2" in result.reason
    assert resolver.asked == []


async def test_key_lookups_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(yarc, "MAX_KEY_LOOKUPS", 1)
    hop2 = seal(seal(SIGNED, "list.example.org"), "fwd.example.net")
    resolver = FixedResolver(keys("list.example.org", "fwd.example.net"))
    result = await verify_arc(hop2, resolver, timeout=1)
    assert result.result == "fail"
    assert "key lookups" in result.reason
    assert resolver.asked == []


async def test_slow_key_fails_within_the_timeout() -> None:
    sealed = seal(SIGNED, "list.example.org")

    class Slow(FixedResolver):
        async def lookup(self, name: str, rdtype: str) -> LookupResult:
            await asyncio.sleep(5)
            return await super().lookup(name, rdtype)

    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await verify_arc(sealed, Slow(keys("list.example.org")), timeout=0.3)
    assert loop.time() - start < 1
    assert result.result == "fail"
    assert "timeout" in result.reason


async def test_chain_over_the_test_dns_server(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add("arc._domainkey.list.example.org", "TXT", RSA_TXT)
    sealed = seal(SIGNED, "list.example.org")
    assert (await verify_arc(sealed, resolver, timeout=2)).result == "pass"
    dns_server.set_behaviour("arc._domainkey.list.example.org", "timeout")
    fresh = Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.5)
    assert (await verify_arc(sealed, fresh, timeout=2)).result == "fail"
