"""What a policy check answers, and the facts about a session it decides on.

Each check returns a Decision naming itself and its reason, so every rejection can be logged
(and later explained) as the path the decision took.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from yuubin.auth.accounts import Resolution
from yuubin.smtp.address import Address
from yuubin.smtp.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Decision:
    reply: Reply | None  # None: accepted (the core's default positive reply)
    check: str
    reason: str
    close: bool = False  # a refusal at connect that ends the session at once (no QUIT wait)

    @property
    def accepted(self) -> bool:
        return self.reply is None or self.reply.code < 400


def accept(check: str, reason: str = "ok") -> Decision:
    return Decision(None, check, reason)


def reject(check: str, reason: str, code: int, status: str, text: str) -> Decision:
    return Decision(Reply(code, status, text), check, reason)


@dataclass(slots=True)
class SessionFacts:
    session: str
    listener: str  # listener kind
    client: IPAddress
    trusted: bool
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    helo: str | None = None
    auth_user: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RecipientRoute:
    decision: Decision
    resolution: Resolution | None = None  # where an accepted recipient goes (local and/or forwards)


class ListenerPolicy:
    """The stages a listener's policy answers, in session order; the defaults accept."""

    async def connect(self, facts: SessionFacts) -> Decision:
        return accept("connect")

    def mail(self, facts: SessionFacts, sender: Address | None) -> Decision:
        return accept("sender")

    def rcpt(self, facts: SessionFacts, rcpt: Address) -> RecipientRoute:
        raise NotImplementedError

    def message(self, facts: SessionFacts, data: bytes) -> Decision:
        """End of DATA, before the message is stored."""
        return accept("message")

    def stored(self, facts: SessionFacts, recipients: list[str]) -> None:
        """After the 250: bookkeeping such as rate counters."""

