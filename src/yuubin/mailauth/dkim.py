"""DKIM verification (RFC 6376, ed25519-sha256 of RFC 8463) of every signature in a message.

dkimpy does the cryptography and canonicalisation; what it does not do the way a mail server
needs is DNS: its resolver is synchronous, its async module checks one signature and needs
aiodns. So the keys of all signatures are fetched first through yuubin's own resolver, at
once and within one timeout, and handed to dkimpy as a dict lookup (its ``dnsfunc``): no
network inside dkimpy. On top of dkimpy, local policy: rsa-sha1 is refused (RFC 8301), keys
under ``MIN_KEY_BITS`` fail, and an ``l=`` that leaves content unsigned is called out.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from yuubin.dns import DnsLookup, LookupResult

__all__ = ["LARGE_MESSAGE", "MIN_KEY_BITS", "DkimResult", "KeyAnswer", "fetch_keys", "key_lookup", "verify_message"]

MIN_KEY_BITS = 1024  # RFC 8301: verifiers must not accept smaller RSA keys
LARGE_MESSAGE = 256 * 1024  # bytes: above this, hashing runs in a thread so the event loop keeps serving
HEADER_B_CHARS = 12  # characters of b= kept for Authentication-Results header.b (RFC 6008 needs >= 8)

# dkimpy logs its own view of each failure; ours is the result's reason, logged by the caller.
_DKIMPY_LOG = logging.getLogger("yuubin.mailauth.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One signature's outcome, in the words of Authentication-Results (RFC 8601 ``dkim=``)."""

    result: str  # pass|fail|neutral|policy|temperror|permerror
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    reason: str  # short human text for the log / AR comment
    header_b: str  # first 12 chars of b= (AR header.b)


@dataclass(frozen=True, slots=True)
class KeyAnswer:
    """The DNS outcome for one key name: the record text, or why there is none."""

    record: str | None  # the TXT record (strings joined), None when there is none
    status: str  # the LookupResult status, or "timeout" when the overall deadline passed


@dataclass(frozen=True, slots=True)
class _Signature:
    """The tags of one DKIM-Signature header that decide what to look up and how to report."""

    index: int
    tags: dict[bytes, bytes]

    def text(self, tag: bytes) -> str:
        return self.tags.get(tag, b"").decode("ascii", errors="replace")

    @property
    def key_name(self) -> str:
        return f"{self.text(b's')}._domainkey.{self.text(b'd')}".lower()

    @property
    def header_b(self) -> str:
        return re.sub(r"\s+", "", self.text(b"b"))[:HEADER_B_CHARS]

    def result(self, result: str, reason: str) -> DkimResult:
        return DkimResult(result, self.text(b"d").lower(), self.text(b"s"), self.text(b"a").lower(),
                          reason, self.header_b)


async def fetch_keys(names: Sequence[str], lookup: DnsLookup, timeout: float) -> dict[str, KeyAnswer]:
    """Look up the TXT records of ``names`` all at once; whatever is not back by ``timeout`` is a timeout.

    Shared with ARC verification, which needs keys the same way.
    """
    unique = list(dict.fromkeys(names))
    if not unique:
        return {}
    tasks = {name: asyncio.ensure_future(lookup.lookup(name, "TXT")) for name in unique}
    _done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for task in pending:
        task.cancel()
    answers: dict[str, KeyAnswer] = {}
    for name, task in tasks.items():
        if task in pending or task.cancelled():
            answers[name] = KeyAnswer(None, "timeout")
            continue
        exc = task.exception()
        if exc is not None:
            answers[name] = KeyAnswer(None, "servfail")
            continue
        answers[name] = _key_answer(task.result())
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return answers


def _key_answer(found: LookupResult) -> KeyAnswer:
    """A DKIM key record out of a TXT answer: the one that looks like a key when there are several."""
    if found.status != "ok":
        return KeyAnswer(None, found.status)
    keys = [r for r in found.records if "p=" in r] or list(found.records)
    return KeyAnswer(keys[0], "ok")


def key_lookup(answers: Mapping[str, KeyAnswer]) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc``: a dict lookup over keys fetched before, never the network."""

    def dnsfunc(name: bytes | str, timeout: float = 0) -> bytes | None:
        key = (name.decode("ascii", errors="replace") if isinstance(name, bytes) else name).rstrip(".").lower()
        answer = answers.get(key)
        if answer is None or answer.record is None:
            return None
        return answer.record.encode("utf-8", errors="replace")

    return dnsfunc


async def verify_message(data: bytes, lookup: DnsLookup, *, timeout: float,
                         max_signatures: int = 5) -> list[DkimResult]:
    """Check every DKIM-Signature of ``data``, top first; one result per signature, [] when unsigned.

    At most ``max_signatures`` are checked (the rest are reported as ``policy`` without a
    lookup), their keys fetched together within ``timeout`` seconds.
    """
    try:
        headers, _body = dkim.rfc822_parse(data)
    except dkim.DKIMException:
        return []
    raw = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if not raw:
        return []
    results: dict[int, DkimResult] = {}
    to_check: list[_Signature] = []
    for index, value in enumerate(raw):
        try:
            sig = _Signature(index, parse_tag_value(value))
        except InvalidTagValueList as exc:
            results[index] = DkimResult("permerror", "", "", "", f"unparsable signature: {exc}", "")
            continue
        if index >= max_signatures:
            results[index] = sig.result("policy", f"not checked: more than {max_signatures} signatures")
            continue
        problem = _refusal(sig)
        if problem is not None:
            results[index] = problem
            continue
        to_check.append(sig)
    answers = await fetch_keys([s.key_name for s in to_check], lookup, timeout)
    if to_check:
        if len(data) > LARGE_MESSAGE:
            checked = await asyncio.to_thread(_verify_all, data, to_check, answers)
        else:
            checked = _verify_all(data, to_check, answers)
        results.update(checked)
    return [results[i] for i in range(len(raw))]


def _refusal(sig: _Signature) -> DkimResult | None:
    """What the tags alone decide, before any key is fetched: malformed, or refused by policy."""
    try:
        dkim.validate_signature_fields(sig.tags)
    except (KeyError, dkim.DKIMException) as exc:
        return sig.result("permerror", _short(f"bad signature: {exc}"))
    if sig.tags[b"a"].lower() == b"rsa-sha1":
        return sig.result("policy", "rsa-sha1 is refused (RFC 8301)")
    try:
        CanonicalizationPolicy.from_c_value(sig.tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        return sig.result("permerror", f"bad c=: {exc}")
    return None


def _verify_all(data: bytes, sigs: Sequence[_Signature], answers: Mapping[str, KeyAnswer]) -> dict[int, DkimResult]:
    """The CPU part: the key record checks, then dkimpy's hash and signature check, per signature."""
    try:
        verifier = dkim.DKIM(data, logger=_DKIMPY_LOG, minkey=MIN_KEY_BITS)
    except dkim.DKIMException as exc:
        return {sig.index: sig.result("permerror", _short(f"unparsable message: {exc}")) for sig in sigs}
    dnsfunc = key_lookup(answers)
    out: dict[int, DkimResult] = {}
    for sig in sigs:
        try:
            out[sig.index] = _verify_one(verifier, sig, answers[sig.key_name], dnsfunc)
        except Exception as exc:  # hostile input must not take the session down: dkimpy has sharp edges
            out[sig.index] = sig.result("permerror", _short(f"cannot verify: {type(exc).__name__}: {exc}"))
    return out


def _verify_one(verifier: dkim.DKIM, sig: _Signature, answer: KeyAnswer,
                dnsfunc: Callable[..., bytes | None]) -> DkimResult:
    """One signature against its prefetched key: what DNS said, the key record, then the crypto."""
    if answer.status == "timeout":
        return sig.result("temperror", f"key {sig.key_name} lookup timed out")
    if answer.status == "servfail":
        return sig.result("temperror", f"key {sig.key_name} lookup failed (servfail)")
    if answer.record is None:
        return sig.result("permerror", f"no key at {sig.key_name} ({answer.status})")
    try:
        _pk, keysize, ktag, _tlsrpt = dkim.evaluate_pk(sig.key_name.encode(), answer.record.encode())
    except (dkim.DKIMException, binascii.Error, ValueError, KeyError) as exc:
        text = str(exc) or type(exc).__name__
        if b"p" in _key_tags(answer.record) and not _key_tags(answer.record)[b"p"]:
            text = "key revoked (empty p=)"
        return sig.result("permerror", f"bad key at {sig.key_name}: {text}")
    if ktag is None:
        return sig.result("permerror", f"key at {sig.key_name} is not for email")
    if not sig.tags[b"a"].lower().startswith(ktag + b"-"):
        return sig.result("permerror", f"key type {ktag.decode()} does not match a={sig.text(b'a')}")
    if ktag == b"rsa" and keysize is not None and keysize < MIN_KEY_BITS:
        return sig.result("fail", f"key too small: {keysize} bits (minimum {MIN_KEY_BITS})")
    try:
        good = verifier.verify(idx=sig.index, dnsfunc=dnsfunc)
    except dkim.DKIMException as exc:
        return sig.result("fail", _short(str(exc)))
    if not good:
        return sig.result("fail", "signature did not verify")
    return sig.result("pass", _length_note(verifier, sig) or "good signature")


def _key_tags(record: str) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(record.encode("utf-8", errors="replace"))
    except InvalidTagValueList:
        return {}


def _length_note(verifier: dkim.DKIM, sig: _Signature) -> str:
    """For ``l=``: how much of the body the signature leaves unsigned (anything can be appended there)."""
    if b"l" not in sig.tags:
        return ""
    signed = int(sig.tags[b"l"])
    policy = CanonicalizationPolicy.from_c_value(sig.tags.get(b"c", b"simple/simple"))
    total = len(policy.canonicalize_body(verifier.body))
    if total > signed:
        return f"suspect: l={signed} leaves {total - signed} of {total} body bytes unsigned"
    return f"suspect: l={signed} (the whole body is signed now, content may be appended unsigned)"


def _short(text: str) -> str:
    """dkimpy's messages carry whole base64 values; the reason needs the words before them."""
    text = re.sub(r" \(got .*", "", text)
    text = re.sub(r"b'([^']*)'", r"\1", text)  # bytes reprs of tag names
    return text if len(text) <= 120 else text[:117] + "..."

