"""The port-25 policy (listener kind "mx"), from policy.md.

connect: DNSBL (never for trusted networks). MAIL: an untrusted client may not use one of our
own domains as sender (our users submit on 587/465). RCPT: local recipients must exist (550 at
RCPT, never accept-then-bounce); other domains only for trusted clients, and never an address
that could route elsewhere.
"""

from __future__ import annotations

from yuubin.auth.accounts import Directory, Resolution
from yuubin.policy.decision import Decision, ListenerPolicy, RecipientRoute, SessionFacts, accept, reject
from yuubin.policy.dnsbl import DnsblChecker
from yuubin.smtp.address import Address


def routing_trick(rcpt: Address) -> RecipientRoute:
    return RecipientRoute(reject("relay", f"routing syntax in {rcpt.text!r}", 554, "5.7.1",
                                 "relay access denied: address routes through another host"))


def local_route(directory: Directory, rcpt: Address) -> RecipientRoute:
    """Accept a local recipient that exists (with where it goes), else 550 at RCPT time."""
    res = directory.resolve(rcpt)
    if res is None:
        return RecipientRoute(reject("recipient", f"unknown local recipient {rcpt.text}", 550, "5.1.1",
                                     f"no such user here: {rcpt.text}"))
    return RecipientRoute(accept("recipient", "local"), res)


class MxPolicy(ListenerPolicy):
    def __init__(self, directory: Directory, dnsbl: DnsblChecker | None):
        self.directory = directory
        self.dnsbl = dnsbl

    async def connect(self, facts: SessionFacts) -> Decision:
        if facts.trusted:
            return accept("dnsbl", "trusted network: not checked")
        if self.dnsbl is None:
            return accept("dnsbl", "no zones configured")
        listing = await self.dnsbl.check(facts.client, facts.session)
        if listing is None:
            return accept("dnsbl", "not listed")
        return reject("dnsbl", f"listed on {listing.zone} ({','.join(listing.answers)})", 554, "5.7.1",
                      f"service refused: client [{facts.client}] is listed on {listing.zone}")

    def mail(self, facts: SessionFacts, sender: Address | None) -> Decision:
        if sender is None:
            return accept("sender", "null sender")
        if not facts.trusted and self.directory.is_local(sender.domain):
            return reject("sender", f"untrusted client uses local domain {sender.domain}", 550, "5.7.1",
                          f"sender domain {sender.domain} is ours: use port 587 to send as {sender.domain}")
        return accept("sender")

    def rcpt(self, facts: SessionFacts, rcpt: Address) -> RecipientRoute:
        if rcpt.routing_trick and (not facts.trusted or self.directory.is_local(rcpt.domain)):
            return routing_trick(rcpt)
        if not rcpt.domain or self.directory.is_local(rcpt.domain):
            return local_route(self.directory, rcpt)
        if facts.trusted:
            return RecipientRoute(accept("relay", "trusted network"), Resolution(forwards=[rcpt.text]))
        return RecipientRoute(reject("relay", f"untrusted client, remote domain {rcpt.domain}", 554, "5.7.1",
                                     "relay access denied: authenticate on port 587 to send to other domains"))
