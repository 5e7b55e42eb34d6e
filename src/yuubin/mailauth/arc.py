"""ARC chain verification (RFC 8617): did each forwarder that sealed the message keep the chain intact?

dkimpy checks the seals and message signatures; as for DKIM, its keys are fetched first
through yuubin's resolver (all at once, within one timeout, at most ``MAX_KEY_LOOKUPS`` names)
and handed to it as a dict lookup, so it never touches the network.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from yuubin.dns import DnsLookup
from yuubin.mailauth.dkim import LARGE_MESSAGE, KeyAnswer, fetch_keys, key_lookup

__all__ = ["MAX_KEY_LOOKUPS", "ArcResult", "verify_arc"]

MAX_KEY_LOOKUPS = 10  # distinct key names one message may make us look up (a seal and a signature per set)
ARC_HEADERS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)

_DKIMPY_LOG = logging.getLogger("yuubin.mailauth.dkimpy")


@dataclass(frozen=True, slots=True)
class ArcResult:
    """The chain's outcome in the words of Authentication-Results (``arc=``)."""

    result: str  # none|pass|fail
    sealers: tuple[str, ...]  # d= of each ARC-Seal, instance 1 first
    reason: str
    last_aar: str  # newest ARC-Authentication-Results value, "" if none


async def verify_arc(data: bytes, lookup: DnsLookup, *, timeout: float, max_sets: int = 10) -> ArcResult:
    """Validate the ARC chain of ``data``; "none" when there is none.

    A chain longer than ``max_sets`` fails without a lookup; a key that cannot be fetched
    (timeout included) fails the chain, with the reason saying which.
    """
    try:
        headers, _body = dkim.rfc822_parse(data)
    except dkim.DKIMException as exc:
        return ArcResult("fail", (), f"unparsable message: {exc}", "")
    sets: dict[int, dict[bytes, bytes]] = {}
    for name, value in headers:
        kind = name.lower()
        if kind not in ARC_HEADERS:
            continue
        unfolded = re.sub(rb"\r?\n", b"", value)
        found = _INSTANCE.search(unfolded)
        if found is None:
            return ArcResult("fail", (), f"{name.decode(errors='replace')} without i=", "")
        instance = int(found.group(1))
        if kind in sets.setdefault(instance, {}):
            return ArcResult("fail", (), f"two {name.decode(errors='replace')} for i={instance}", "")
        sets[instance][kind] = unfolded
    if not sets:
        return ArcResult("none", (), "no ARC headers", "")
    newest = max(sets)
    last_aar = _aar_text(sets[newest].get(b"arc-authentication-results", b""))
    sealers = tuple(_tag(sets[i].get(b"arc-seal", b""), b"d") for i in sorted(sets))
    if newest > max_sets:
        return ArcResult("fail", sealers, f"{newest} ARC sets, more than {max_sets}", last_aar)
    if sorted(sets) != list(range(1, newest + 1)):
        return ArcResult("fail", sealers, "ARC instances are not 1..N", last_aar)
    names: list[str] = []
    for i in sorted(sets):
        for kind in (b"arc-seal", b"arc-message-signature"):
            selector, domain = _tag(sets[i].get(kind, b""), b"s"), _tag(sets[i].get(kind, b""), b"d")
            if selector and domain:
                names.append(f"{selector}._domainkey.{domain}".lower())
    names = list(dict.fromkeys(names))
    if len(names) > MAX_KEY_LOOKUPS:
        return ArcResult("fail", sealers, f"{len(names)} key lookups needed, more than {MAX_KEY_LOOKUPS}", last_aar)
    answers = await fetch_keys(names, lookup, timeout)
    unavailable = [n for n, a in answers.items() if a.status in ("timeout", "servfail")]
    if unavailable:
        return ArcResult("fail", sealers, f"key {unavailable[0]} lookup failed ({answers[unavailable[0]].status})",
                         last_aar)
    if len(data) > LARGE_MESSAGE:
        verdict, reason = await asyncio.to_thread(_verify_chain, data, answers)
    else:
        verdict, reason = _verify_chain(data, answers)
    return ArcResult(verdict, sealers, reason, last_aar)


def _verify_chain(data: bytes, answers: dict[str, KeyAnswer]) -> tuple[str, str]:
    """dkimpy's chain validation over the prefetched keys: (none|pass|fail, reason)."""
    try:
        cv, _results, reason = dkim.ARC(data, logger=_DKIMPY_LOG, minkey=1024).verify(dnsfunc=key_lookup(answers))
    except Exception as exc:  # hostile input must not take the session down: dkimpy has sharp edges
        return "fail", f"cannot verify: {type(exc).__name__}: {exc}"[:160]
    if cv == dkim.CV_Pass:
        return "pass", "chain validated"
    if cv == dkim.CV_None:
        return "none", str(reason)
    return "fail", str(reason)


def _tag(value: bytes, tag: bytes) -> str:
    try:
        return parse_tag_value(value).get(tag, b"").decode("ascii", errors="replace").strip()
    except InvalidTagValueList:
        return ""


def _aar_text(value: bytes) -> str:
    """The AAR value without its folding, as text for the log and Authentication-Results."""
    return re.sub(r"\s+", " ", value.decode("utf-8", errors="replace")).strip()
