"""Who may send to which recipient: local recipients must exist, other domains only for the trusted.

Port 25 (policy.md): a local recipient must exist (550 at RCPT, never accept-then-bounce); any
other domain only from `[network].trusted`; an address that could route through another host
(`%`, `!`, quoted `@`, source routes) never for an untrusted client or into a local domain.
587/465: the login is the trust — any domain is relayed, routing tricks never.
"""

from __future__ import annotations

from yuubin.auth.accounts import Directory, Resolution
from yuubin.policy.pipeline import Decision, Transaction, accept, reject
from yuubin.smtp.address import Address


def routing_trick(rcpt: Address) -> Decision:
    return reject("relay", f"routing syntax in {rcpt.text!r}", 554, "5.7.1",
                  "relay access denied: address routes through another host")


async def local_route(directory: Directory, rcpt: Address) -> Decision:
    """Accept a local recipient that exists (with where it goes), else 550 at RCPT time."""
    res = await directory.lookup(rcpt)
    if res is None:
        return reject("recipient", f"unknown local recipient {rcpt.text}", 550, "5.1.1",
                      f"no such user here: {rcpt.text}")
    return accept("recipient", "local", route=res)


class MxRecipients:
    """RCPT on port 25: local recipients that exist; relaying only for trusted networks."""

    def __init__(self, directory: Directory):
        self.directory = directory

    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision:
        trusted = txn.session.trusted
        if rcpt.routing_trick and (not trusted or self.directory.is_local(rcpt.domain)):
            return routing_trick(rcpt)
        if not rcpt.domain or self.directory.is_local(rcpt.domain):
            return await local_route(self.directory, rcpt)
        if trusted:
            return accept("relay", "trusted network", route=Resolution(forwards=[rcpt.text]))
        return reject("relay", f"untrusted client, remote domain {rcpt.domain}", 554, "5.7.1",
                      "relay access denied: authenticate on port 587 to send to other domains")


class SubmissionRecipients:
    """RCPT on 587/465 (after AUTH): local recipients that exist; any other domain is relayed."""

    def __init__(self, directory: Directory):
        self.directory = directory

    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision:
        if rcpt.routing_trick:
            return routing_trick(rcpt)
        if not rcpt.domain or self.directory.is_local(rcpt.domain):
            return await local_route(self.directory, rcpt)
        return accept("relay", f"authenticated as {txn.session.auth_user}", route=Resolution(forwards=[rcpt.text]))
