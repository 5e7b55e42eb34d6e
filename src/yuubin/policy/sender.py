"""Who may use which sender address.

Port 25: a stranger may not use one of our own domains as envelope sender — our users submit
on 587/465, so there that is forgery. 587/465: the envelope sender and the From: header must be
addresses the logged-in account owns (Postfix's reject_sender_login_mismatch, for both).
"""

from __future__ import annotations

import email.utils
from email.parser import BytesHeaderParser
from email.policy import compat32

from yuubin.auth.accounts import Directory
from yuubin.policy.pipeline import Decision, Transaction, accept, reject
from yuubin.smtp.address import Address, AddressError, parse_path


class ForeignSender:
    """MAIL on port 25: an untrusted client may not claim one of our domains."""

    def __init__(self, directory: Directory):
        self.directory = directory

    async def mail(self, txn: Transaction, sender: Address | None) -> Decision:
        if sender is None:
            return accept("sender", "null sender")
        if not txn.session.trusted and self.directory.is_local(sender.domain):
            return reject("sender", f"untrusted client uses local domain {sender.domain}", 550, "5.7.1",
                          f"sender domain {sender.domain} is ours: use port 587 to send as {sender.domain}")
        return accept("sender")


class SenderOwnership:
    """MAIL and end of DATA on 587/465: the envelope sender and From: belong to the account."""

    def __init__(self, directory: Directory):
        self.directory = directory

    async def owns(self, account: str, address: Address) -> bool:
        """The account's own address, its plus-addresses, or aliases that reach only it."""
        if address.routing_trick or not self.directory.is_local(address.domain):
            return False
        res = await self.directory.lookup(address)
        return res is not None and res.mailboxes == [account] and not res.forwards

    async def mail(self, txn: Transaction, sender: Address | None) -> Decision:
        account = txn.session.auth_user or ""
        if sender is not None and not await self.owns(account, sender):
            return reject("sender", f"{account} may not send as {sender.text}", 553, "5.7.1",
                          f"sender address <{sender.text}> is not owned by {account}")
        return accept("sender", "owned" if sender else "null sender")

    async def message(self, txn: Transaction, data: bytes) -> Decision:
        """The From: header must be one address the account owns."""
        account = txn.session.auth_user or ""
        end = data.find(b"\r\n\r\n")
        headers = BytesHeaderParser(policy=compat32).parsebytes(data[: end + 2] if end >= 0 else data)
        values = headers.get_all("From") or []
        if len(values) != 1:
            return reject("from", f"{len(values)} From: headers", 550, "5.6.0",
                          "message must have exactly one From: header")
        addrs = email.utils.getaddresses([str(values[0])])
        if len(addrs) != 1 or not addrs[0][1]:
            return reject("from", f"unreadable From: {str(values[0])[:100]!r}", 550, "5.7.1",
                          "From: header must hold one address you own")
        try:
            addr = parse_path(f"<{addrs[0][1]}>", smtputf8=True)
        except AddressError:
            addr = None
        if addr is None or not await self.owns(account, addr):
            return reject("from", f"{account} may not write From: {addrs[0][1]}", 550, "5.7.1",
                          f"From: address <{addrs[0][1]}> is not owned by {account}")
        return accept("from", "owned")
