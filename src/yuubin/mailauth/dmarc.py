"""DMARC (RFC 9989, which obsoletes RFC 7489): does the From: domain's owner vouch for this mail?

Pure evaluation given the SPF result (MAIL FROM identity only: RFC 9989 does not use HELO) and
the DKIM results; DNS through ``yuubin.dns.DnsLookup``. The policy record and the
organizational domain are found by the DNS tree walk (no public suffix list): query
``_dmarc.<domain>``, then drop labels from the left — a name of eight labels or more jumps to
its last seven first, so a walk asks at most eight names — until a valid record is found or
the labels run out. The organizational domain is where a ``psd=n`` record stops the walk, the
name one label below a ``psd=y`` record (other than the starting domain's), or else the
shortest name with a record (the starting domain itself when there is none).

Policy: ``p`` at the From: domain itself, ``sp`` for a subdomain covered by an ancestor's
record, ``np`` for a subdomain that does not exist (no A, AAAA or MX); ``t=y`` (testing)
applies one step less (reject → quarantine, quarantine → none). Several From: domains are
each evaluated and the strictest outcome wins.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses

from yuubin.dns import DnsLookup

__all__ = ["DmarcRecord", "DmarcResult", "TreeWalk", "evaluate", "from_domains", "parse_record"]

MAX_WALK = 8  # names one tree walk asks at most
_POLICIES = ("none", "quarantine", "reject")
_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    domain: str  # where it was found
    p: str
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    psd: str = "u"  # y, n or u (unknown: keep walking)
    testing: bool = False  # t=y
    rua: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The outcome for one message; ``result`` is the RFC 8601 dmarc= value."""

    result: str  # pass|fail|none|temperror|permerror
    from_domain: str  # header.from ("" when the message has no usable From:)
    policy: str = "none"  # what to do: none|quarantine|reject (published policy after t=)
    published: str = "none"  # p, sp or np as published: policy.dmarc in Authentication-Results
    reason: str = ""
    record: DmarcRecord | None = None
    org_domain: str = ""  # when relaxed alignment needed it
    spf_aligned: bool = False
    dkim_aligned: tuple[str, ...] = field(default=())  # d= of the aligned passing signatures


def parse_record(domain: str, text: str) -> DmarcRecord | None:
    """A DMARC record, or None when ``text`` does not start with ``v=DMARC1`` (RFC 9989).

    Unknown or malformed tags are ignored; a missing or invalid ``p`` counts as ``p=none``
    (RFC 9989 no longer requires it), so reporting-only records still count as records."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            if not tags:
                return None  # "v=DMARC1" must be the first tag
            continue
        name = name.strip().lower()
        if name in tags:
            continue
        tags[name] = value.strip()
    if not tags or next(iter(tags)) != "v" or tags["v"] != "DMARC1":
        return None
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        p = "none"

    def policy(tag: str) -> str | None:
        v = tags.get(tag, "").lower()
        return v if v in _POLICIES else None

    def choice(tag: str, allowed: str, default: str) -> str:
        v = tags.get(tag, "").lower()
        return v if v and v in allowed else default

    return DmarcRecord(domain=domain, p=p, sp=policy("sp"), np=policy("np"), adkim=choice("adkim", "rs", "r"),
                       aspf=choice("aspf", "rs", "r"), psd=choice("psd", "ynu", "u"),
                       testing=tags.get("t", "n").lower() == "y", rua=rua)


def from_domains(data: bytes) -> list[str] | None:
    """The domains of the From: addresses (lowercase, A-labels, deduplicated); None without a
    usable From:. Only the header section is read, as text (an SMTPUTF8 From: may hold UTF-8)."""
    end = data.find(b"\r\n\r\n")
    head = (data[: end + 2] if end >= 0 else data).decode("utf-8", errors="replace")
    fields: list[list[str]] = []
    in_from = False
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):  # a continuation line
            if in_from:
                fields[-1].append(line)
            continue
        in_from = line[:5].lower() == "from:"
        if in_from:
            fields.append([line[5:]])
    values = [" ".join(f) for f in fields]
    out: list[str] = []
    for _, addr in getaddresses(values):
        local, at, domain = addr.rpartition("@")
        domain = domain.strip().rstrip(".").lower()
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        if not at or not local or not domain or not re.fullmatch(r"[a-z0-9.\-_]+", domain) or "." not in domain:
            if not at:
                continue
            return None
        if domain not in out:
            out.append(domain)
    return out or None


class TreeWalk:
    """One message's tree walks, sharing what each name answered (a failure included, so a
    dead nameserver is waited for once per name, not once per walk)."""

    def __init__(self, lookup: DnsLookup):
        self.lookup = lookup
        self.seen: dict[str, DmarcRecord | None] = {}
        self.failed: dict[str, str] = {}

    async def prefetch(self, domain: str) -> None:
        """Find ``domain``'s policy ahead of ``evaluate`` (e.g. while signatures are checked)."""
        with contextlib.suppress(TimeoutError):  # remembered; evaluate reports it
            await self.policy(domain)

    async def record_at(self, name: str) -> DmarcRecord | None:
        """The valid DMARC record at ``name``; several valid ones count as none. TimeoutError on
        a temporary DNS failure."""
        if name in self.seen:
            return self.seen[name]
        if name in self.failed:
            raise TimeoutError(self.failed[name])
        r = await self.lookup.lookup(f"_dmarc.{name}", "TXT")
        if r.status in ("timeout", "servfail"):
            self.failed[name] = f"DNS {r.status} for _dmarc.{name}"
            raise TimeoutError(self.failed[name])
        found = [rec for t in r.records if t.startswith("v=DMARC1") and (rec := parse_record(name, t))]
        rec = found[0] if len(found) == 1 else None
        self.seen[name] = rec
        return rec

    @staticmethod
    def names(domain: str) -> list[str]:
        """The names a tree walk asks, in order."""
        labels = domain.split(".")
        out = [domain]
        if len(labels) >= 8:
            labels = labels[-7:]
            out.append(".".join(labels))
        while len(labels) > 1:
            labels = labels[1:]
            out.append(".".join(labels))
        return out[:MAX_WALK]

    async def policy(self, domain: str) -> DmarcRecord | None:
        for name in self.names(domain):
            rec = await self.record_at(name)
            if rec is not None:
                return rec
        return None

    async def org_domain(self, domain: str) -> str:
        names = self.names(domain)
        shortest = None
        for i, name in enumerate(names):
            rec = await self.record_at(name)
            if rec is None:
                continue
            if rec.psd == "n":
                return name
            if rec.psd == "y" and i > 0:  # a PSD above us: the organization is one label below it
                return ".".join(domain.split(".")[-(name.count(".") + 2):])
            shortest = name
        return shortest or domain


def _aligned(auth: str, from_domain: str, mode: str, orgs: dict[str, str]) -> bool:
    if auth == from_domain:
        return True
    if mode == "s":
        return False
    return orgs.get(auth) == orgs[from_domain]


async def _evaluate_one(from_domain: str, spf: tuple[str, str] | None, dkim: Sequence[tuple[str, str]],
                        walker: TreeWalk, own: Collection[str]) -> DmarcResult:
    try:
        rec = await walker.policy(from_domain)
        if rec is None and from_domain in own:
            # Our own domain without a published record: nobody else may send as it.
            rec = DmarcRecord(domain=from_domain, p="reject", adkim="s", aspf="s")
        if rec is None:
            return DmarcResult("none", from_domain, reason=f"no DMARC record for {from_domain}")
        # Organizational domains are walked for only when relaxed alignment needs them.
        relaxed = {d for r, d in dkim if r == "pass" and rec.adkim == "r"}
        if spf is not None and spf[0] == "pass" and rec.aspf == "r":
            relaxed.add(spf[1])
        relaxed.discard(from_domain)
        org = await walker.org_domain(from_domain) if relaxed else ""
        orgs = {from_domain: org}
        for d in relaxed:
            if d.endswith("." + org) or d == org:
                orgs[d] = await walker.org_domain(d)
    except TimeoutError as e:
        return DmarcResult("temperror", from_domain, reason=str(e))
    spf_ok = spf is not None and spf[0] == "pass" and _aligned(spf[1], from_domain, rec.aspf, orgs)
    dkim_ok = tuple(d for r, d in dkim if r == "pass" and _aligned(d, from_domain, rec.adkim, orgs))
    if spf_ok or dkim_ok:
        how = "SPF" if spf_ok else f"DKIM d={dkim_ok[0]}"
        return DmarcResult("pass", from_domain, "none", rec.p, f"aligned {how}", rec, org, spf_ok, dkim_ok)
    published = rec.p
    if rec.domain != from_domain:
        published = rec.sp or rec.p
        if rec.np is not None and await _nonexistent(walker.lookup, from_domain):
            published = rec.np
    policy = published
    if rec.testing:
        policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    why = "no aligned SPF or DKIM pass" + (" (t=y: testing)" if rec.testing else "")
    return DmarcResult("fail", from_domain, policy, published, why, rec, org)


async def _nonexistent(lookup: DnsLookup, domain: str) -> bool:
    """RFC 9989's non-existent domain: no A, AAAA or MX records at all."""
    for rdtype in ("A", "AAAA", "MX"):
        r = await lookup.lookup(domain, rdtype)
        if r.status == "nxdomain":
            return True
        if r.status != "nodata":
            return False
    return True


async def evaluate(domains: Sequence[str] | None, spf: tuple[str, str] | None, dkim: Sequence[tuple[str, str]],
                   lookup: DnsLookup, *, own: Collection[str] = (), walk: TreeWalk | None = None) -> DmarcResult:
    """DMARC for a message whose From: has ``domains`` (from ``from_domains``).

    ``spf`` is (result, MAIL FROM domain), None when MAIL FROM was <>; ``dkim`` the (result, d=)
    of every signature. Several From: domains: each is evaluated, the strictest outcome counts.
    A domain in ``own`` (our local domains) without a record counts as p=reject, strict.
    ``walk`` is one already started (``TreeWalk.prefetch``), so nothing is asked twice.
    """
    if not domains:
        return DmarcResult("permerror", "", reason="no usable From: address")
    walker = walk or TreeWalk(lookup)
    results = [await _evaluate_one(d.lower().rstrip("."), spf, dkim, walker, own) for d in domains]
    return max(results, key=lambda r: (r.result == "fail", _STRICTNESS[r.policy], r.result == "temperror"))
