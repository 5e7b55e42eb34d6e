"""S25R (Selective SMTP Rejection): mail servers have proper names, infected home PCs do not.

The published rule set (Asami Hideo, 2004–) looks at the client's reverse DNS: no name, a name
that does not resolve back to the client, or a name that looks generated from an address on a
dynamic line (digits in the first labels, `dhcp`/`ppp`/`dsl` prefixes). Such a client is a
*suspect*, never refused for good: the answer is a 450 (try again) or greylisting, so a real
server that is misjudged retries and its admin can add it to `[s25r] allow`.

The name is looked up once per session at connect (through the one resolver); the verdict is
kept in the session facts for the RCPT stage, where the action is taken (so a suspect can still
reach postmaster@, and the log shows the recipient it tried).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from yuubin.dns import DnsLookup
from yuubin.policy.pipeline import Decision, IPAddress, SessionFacts, Transaction, accept, reject
from yuubin.smtp.address import Address

# (rule, pattern on the lower-cased reverse DNS name, what it means); rule 0 is "no usable name".
RULES: tuple[tuple[int, re.Pattern[str], str], ...] = (
    (1, re.compile(r"^[^.]*[0-9][^0-9.]+[0-9]"), "digits, letters, digits in the first label"),
    (2, re.compile(r"^[^.]*[0-9]{5}"), "five digits in a row in the first label"),
    (3, re.compile(r"^([^.]+\.)?[0-9][^.]*\.[^.]+\..+\.[a-z]"), "first or second label starts with a digit"),
    (4, re.compile(r"^[^.]*[0-9]\.[^.]*[0-9]-[0-9]"), "first label ends in a digit, digit-digit in the second"),
    (5, re.compile(r"^[^.]*[0-9]\.[^.]*[0-9]\.[^.]+\..+\."), "first two labels end in a digit"),
    (6, re.compile(r"^(dhcp|dialup|ppp|[achrsvx]?dsl)[^.]*[0-9]"), "a dial-up or DSL prefix"),
)
MARK = "s25r"  # the key in SessionFacts.marks: "" when not a suspect, else why


def dynamic_rule(name: str) -> str | None:
    """Why a reverse DNS name looks dynamic (`rule N: ...`), or None."""
    lowered = name.lower().rstrip(".")
    for number, pattern, meaning in RULES:
        if pattern.search(lowered):
            return f"rule {number}: {meaning}"
    return None


@dataclass(frozen=True, slots=True)
class S25rAllow:
    """`[s25r] allow`: names (exact, or `.example.com` for a domain and its hosts) and networks."""

    names: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[str]) -> S25rAllow:
        names, nets = [], []
        for e in entries:
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                names.append(e.lower().rstrip("."))
        return cls(tuple(names), tuple(nets))

    def allows(self, ip: IPAddress, name: str | None) -> bool:
        if any(ip in n for n in self.networks):
            return True
        if name is None:
            return False
        name = name.lower().rstrip(".")
        return any(name == n or (n.startswith(".") and name.endswith(n)) or name.endswith("." + n)
                   for n in self.names)


def _reverse_name(ip: IPAddress) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


class S25rCheck:
    """Connect: classify the client; RCPT: `action = "reject"` answers suspects 450 4.7.1.
    With `action = "greylist"` the greylisting check reads the mark instead."""

    def __init__(self, resolver: DnsLookup, allow: S25rAllow, action: str):
        self.resolver = resolver
        self.allow = allow
        self.action = action  # "reject" or "greylist"

    async def classify(self, ip: IPAddress) -> tuple[str | None, str]:
        """(name, "" or why the client is a suspect). A DNS failure is no evidence: not a suspect."""
        ptr = await self.resolver.lookup(_reverse_name(ip), "PTR")
        if ptr.status in ("timeout", "servfail"):
            return None, ""
        if ptr.status != "ok":
            return None, "rule 0: no reverse DNS"
        name = ptr.records[0].rstrip(".")
        rdtype = "AAAA" if isinstance(ip, ipaddress.IPv6Address) else "A"
        forward = await self.resolver.lookup(name, rdtype)
        if forward.status in ("timeout", "servfail"):
            return name, ""
        if forward.status != "ok" or not any(_same(ip, r) for r in forward.records):
            return name, f"rule 0: reverse DNS {name} does not resolve back"
        return name, dynamic_rule(name) or ""

    async def connect(self, session: SessionFacts) -> Decision:
        if session.trusted:
            session.marks[MARK] = ""
            return accept("s25r", "trusted network: not checked")
        name, why = await self.classify(session.client)
        if why and self.allow.allows(session.client, name):
            why = ""
            reason = f"{name or session.client}: in s25r.allow"
        else:
            reason = f"{name or 'no name'}: {why}" if why else f"{name}: looks like a server"
        session.marks[MARK] = why
        return accept("s25r", reason)

    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision:
        why = txn.session.marks.get(MARK, "")
        if not why or self.action != "reject" or rcpt.local.lower() == "postmaster":
            return accept("s25r", "not a suspect" if not why else f"suspect ({why}); action {self.action}")
        return reject("s25r", f"S25R suspect: {why}", 450, "4.7.1",
                      f"client [{txn.session.client}] looks like a dynamic address (S25R {why.split(':')[0]}); "
                      "try again later or use your provider's mail server")


def _same(ip: IPAddress, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False
