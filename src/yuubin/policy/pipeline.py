"""The policy pipeline: per listener, an ordered list of checks for each stage of a session.

A check answers with a Decision that names it and says why — accept (pass on to the next check),
reject (5xx), tempfail (4xx), or quarantine (accept, but file the message as junk) — and may add
header lines (e.g. Authentication-Results), name incoming header fields to drop (forged ones)
and record results. The first reject or tempfail ends the stage; otherwise the stage accepts
with everything the checks added. The whole trail is kept, so a rejection is logged with its
check and reason and `policy explain` can print the path.

Every stage is async (a check may ask DNS) and gets the transaction so far: who connected, the
HELO name, the login, the sender, the recipients accepted, the results of earlier checks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from yuubin.auth.accounts import Resolution
from yuubin.smtp.address import Address
from yuubin.smtp.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A header field the intake removes before storing: (lowercase field name, the whole raw field
# with its continuation lines) -> drop it? E.g. an Authentication-Results forging our authserv-id.
HeaderDrop = Callable[[str, bytes], bool]


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # 5xx: permanent
    TEMPFAIL = "tempfail"  # 4xx: try again later
    QUARANTINE = "quarantine"  # message stage: accepted, delivered to the recipients' Junk folder


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    check: str
    reason: str
    reply: Reply | None = None  # the reply for a refusal; an accept may override the positive one
    close: bool = False  # a refusal that ends the session at once (no QUIT wait)
    headers: tuple[bytes, ...] = ()  # header lines (with CRLF) to add to the message
    results: Mapping[str, str] = field(default_factory=dict)  # e.g. {"dnsbl": "pass"}
    route: Resolution | None = None  # RCPT: where an accepted recipient goes
    drop_header: HeaderDrop | None = None  # message stage: incoming header fields to remove

    @property
    def accepted(self) -> bool:
        return self.verdict in (Verdict.ACCEPT, Verdict.QUARANTINE)


def accept(check: str, reason: str = "ok", *, route: Resolution | None = None,
           headers: tuple[bytes, ...] = (), results: Mapping[str, str] | None = None,
           drop_header: HeaderDrop | None = None) -> Decision:
    return Decision(Verdict.ACCEPT, check, reason, route=route, headers=headers, results=results or {},
                    drop_header=drop_header)


def reject(check: str, reason: str, code: int, status: str, text: str, *, close: bool = False) -> Decision:
    """A refusal; its verdict (reject or tempfail) follows from the reply code."""
    verdict = Verdict.TEMPFAIL if code < 500 else Verdict.REJECT
    return Decision(verdict, check, reason, Reply(code, status, text), close=close)


def quarantine(check: str, reason: str, *, headers: tuple[bytes, ...] = (),
               results: Mapping[str, str] | None = None, drop_header: HeaderDrop | None = None) -> Decision:
    return Decision(Verdict.QUARANTINE, check, reason, headers=headers, results=results or {},
                    drop_header=drop_header)


@dataclass(slots=True)
class SessionFacts:
    """What is known about a connection; the listener fills it in as the session goes on."""

    session: str
    listener: str  # listener kind
    client: IPAddress
    trusted: bool
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    helo: str | None = None
    auth_user: str | None = None
    marks: dict[str, str] = field(default_factory=dict)  # what connect-stage checks found (e.g. s25r)


@dataclass(slots=True)
class AcceptedRecipient:
    address: Address
    params: dict[str, str]
    route: Resolution


@dataclass(slots=True)
class Transaction:
    """One mail transaction so far: what MAIL, RCPT and the checks before have established."""

    session: SessionFacts
    sender: Address | None = None  # None: the null sender <>
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[AcceptedRecipient] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)


# ---- what a check implements, per stage (a check object may serve several stages) ----


class ConnectCheck(Protocol):
    async def connect(self, session: SessionFacts) -> Decision: ...


class HeloCheck(Protocol):
    async def helo(self, session: SessionFacts) -> Decision: ...


class AuthCheck(Protocol):
    async def auth(self, session: SessionFacts) -> Decision: ...


class MailCheck(Protocol):
    async def mail(self, txn: Transaction, sender: Address | None) -> Decision: ...


class RcptCheck(Protocol):
    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision: ...


class MessageCheck(Protocol):
    async def message(self, txn: Transaction, data: bytes) -> Decision: ...


class AcceptedHook(Protocol):
    def accepted(self, txn: Transaction) -> None:
        """After the message is stored (250 sent): bookkeeping such as rate counters."""


@dataclass(frozen=True, slots=True)
class StageResult:
    """A stage's answer: the deciding decision and the trail of every check that ran."""

    decision: Decision
    trail: tuple[Decision, ...]
    headers: tuple[bytes, ...] = ()
    results: Mapping[str, str] = field(default_factory=dict)
    route: Resolution | None = None
    drop_headers: tuple[HeaderDrop, ...] = ()  # the checks' predicates, applied by the intake

    @property
    def accepted(self) -> bool:
        return self.decision.accepted

    @property
    def quarantine(self) -> bool:
        return self.accepted and any(d.verdict is Verdict.QUARANTINE for d in self.trail)


def _combine(stage: str, decisions: list[Decision]) -> StageResult:
    trail = tuple(decisions)
    if decisions and not decisions[-1].accepted:
        return StageResult(decisions[-1], trail)
    headers: tuple[bytes, ...] = ()
    results: dict[str, str] = {}
    route = None
    drops: tuple[HeaderDrop, ...] = ()
    for d in decisions:
        headers += d.headers
        results.update(d.results)
        route = d.route or route
        if d.drop_header is not None:
            drops += (d.drop_header,)
    final = decisions[-1] if decisions else accept(stage, "no checks")
    for d in decisions:
        if d.verdict is Verdict.QUARANTINE:
            final = d
    return StageResult(final, trail, headers, results, route, drops)


async def _run(stage: str, checks: Iterator[Awaitable[Decision]]) -> StageResult:
    """Await the checks in order (lazily: a check after a refusal never runs)."""
    out: list[Decision] = []
    for pending in checks:
        d = await pending
        out.append(d)
        if not d.accepted:
            break
    return _combine(stage, out)


class Pipeline:
    """The checks of one listener, in order, per stage; built from the config by policy/listeners.py."""

    def __init__(self, name: str, *, connect: Sequence[ConnectCheck] = (), helo: Sequence[HeloCheck] = (),
                 auth: Sequence[AuthCheck] = (), mail: Sequence[MailCheck] = (), rcpt: Sequence[RcptCheck] = (),
                 message: Sequence[MessageCheck] = (), accepted: Sequence[AcceptedHook] = ()):
        self.name = name
        self._connect = tuple(connect)
        self._helo = tuple(helo)
        self._auth = tuple(auth)
        self._mail = tuple(mail)
        self._rcpt = tuple(rcpt)
        self._message = tuple(message)
        self._accepted = tuple(accepted)

    @property
    def message_checks(self) -> tuple[str, ...]:
        """The message stage's checks by class name, for `policy explain` (which cannot run them)."""
        return tuple(type(c).__name__ for c in self._message)

    async def connect(self, session: SessionFacts) -> StageResult:
        return await _run("connect", (c.connect(session) for c in self._connect))

    async def helo(self, session: SessionFacts) -> StageResult:
        return await _run("helo", (c.helo(session) for c in self._helo))

    async def auth(self, session: SessionFacts) -> StageResult:
        return await _run("auth", (c.auth(session) for c in self._auth))

    async def mail(self, txn: Transaction, sender: Address | None) -> StageResult:
        return await _run("mail", (c.mail(txn, sender) for c in self._mail))

    async def rcpt(self, txn: Transaction, rcpt: Address) -> StageResult:
        result = await _run("rcpt", (c.rcpt(txn, rcpt) for c in self._rcpt))
        if result.accepted and result.route is None:
            # No check said where the recipient goes: accepting it would lose the message.
            missing = reject("route", f"no route for {rcpt.text}", 550, "5.1.1", f"no such user here: {rcpt.text}")
            return _combine("rcpt", [*result.trail, missing])
        return result

    async def message(self, txn: Transaction, data: bytes) -> StageResult:
        return await _run("message", (c.message(txn, data) for c in self._message))

    def accepted(self, txn: Transaction) -> None:
        for hook in self._accepted:
            hook.accepted(txn)
