"""The 587/465 policy (listener kinds "submission" and "submissions"), from policy.md.

connect: the listener's `allow` list (CIDRs, countries) — others get 554 and the connection
closes before any AUTH is possible. AUTH itself is mandatory before MAIL (the core says 530).
MAIL: the account must not be suspended and within its outbound limits, and the envelope sender
must be one it owns. RCPT: local recipients must exist; any other domain is relayed. End of DATA:
the From: header must be owned too (Postfix's reject_sender_login_mismatch, for both).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32

from yuubin.auth.accounts import Directory, Resolution
from yuubin.config import OutboundConfig
from yuubin.geo import AccessList
from yuubin.policy.decision import Decision, ListenerPolicy, RecipientRoute, SessionFacts, accept, reject
from yuubin.policy.mx import local_route, routing_trick
from yuubin.smtp.address import Address, AddressError, parse_path
from yuubin.smtp.replies import Reply
from yuubin.store import Store

HOUR = 3600.0
DAY = 86400.0
PRUNE_EVERY = 1000  # submissions between deletions of counter rows older than a day

SUSPENDED_TEXT = "account suspended after unusual sending; contact the postmaster"


class SubmissionPolicy(ListenerPolicy):
    def __init__(self, directory: Directory, store: Store, outbound: OutboundConfig, access: AccessList,
                 on_limit: Callable[[str, str, SessionFacts], None], clock: Callable[[], float] = time.time):
        self.directory = directory
        self.store = store
        self.outbound = outbound
        self.access = access
        self.on_limit = on_limit  # suspends the account, holds its queue, tells postmaster
        self.clock = clock
        self._until_prune = PRUNE_EVERY

    async def connect(self, facts: SessionFacts) -> Decision:
        ok, why = self.access.allows(facts.client)
        if ok:
            return accept("allow", why)
        return Decision(Reply(554, "5.7.1", f"service refused: [{facts.client}] may not submit mail here"),
                        "allow", why, close=True)

    def owns(self, account: str, address: Address) -> bool:
        """The account's own address, its plus-addresses, or aliases that reach only it."""
        if address.routing_trick or not self.directory.is_local(address.domain):
            return False
        res = self.directory.resolve(address)
        return res is not None and res.mailboxes == [account] and not res.forwards

    def mail(self, facts: SessionFacts, sender: Address | None) -> Decision:
        account = facts.auth_user
        if account is None:  # the core refuses MAIL before AUTH; this is the second lock
            return reject("auth", "not authenticated", 530, "5.7.0", "authentication required")
        row = self.store.account(account)
        if row is None or row.suspended:
            return reject("suspended", f"account {account} is suspended", 550, "5.7.1", SUSPENDED_TEXT)
        sent = self.store.submissions_since(account, self.clock() - HOUR)
        if sent >= self.outbound.max_per_hour:
            return self._limit_broken(facts, f"{sent} messages in the last hour "
                                      f"(outbound.max_per_hour = {self.outbound.max_per_hour})")
        if sender is not None and not self.owns(account, sender):
            return reject("sender", f"{account} may not send as {sender.text}", 553, "5.7.1",
                          f"sender address <{sender.text}> is not owned by {account}")
        return accept("sender", "owned" if sender else "null sender")

    def rcpt(self, facts: SessionFacts, rcpt: Address) -> RecipientRoute:
        if rcpt.routing_trick:
            return routing_trick(rcpt)
        if not rcpt.domain or self.directory.is_local(rcpt.domain):
            route = local_route(self.directory, rcpt)
            if not route.decision.accepted:
                return route
        else:
            route = RecipientRoute(accept("relay", f"authenticated as {facts.auth_user}"),
                                   Resolution(forwards=[rcpt.text]))
        account = facts.auth_user or ""
        seen = self.store.submission_recipients_since(account, self.clock() - DAY)
        limit = self.outbound.max_recipients_per_day
        if rcpt.key not in seen and len(seen) >= limit:
            return RecipientRoute(self._limit_broken(facts, f"{len(seen)} distinct recipients in the last day "
                                                     f"(outbound.max_recipients_per_day = {limit})"))
        return route

    def message(self, facts: SessionFacts, data: bytes) -> Decision:
        """The From: header must be one address the account owns."""
        account = facts.auth_user or ""
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
        if addr is None or not self.owns(account, addr):
            return reject("from", f"{account} may not write From: {addrs[0][1]}", 550, "5.7.1",
                          f"From: address <{addrs[0][1]}> is not owned by {account}")
        return accept("from", "owned")

    def stored(self, facts: SessionFacts, recipients: list[str]) -> None:
        """Count an accepted submission towards the account's limits."""
        if facts.auth_user:
            now = self.clock()
            self.store.record_submission(facts.auth_user, now, str(facts.client), recipients)
            self._until_prune -= 1
            if self._until_prune <= 0:  # the counters only need the last day
                self._until_prune = PRUNE_EVERY
                self.store.prune_submissions(now - DAY)

    def _limit_broken(self, facts: SessionFacts, what: str) -> Decision:
        account = facts.auth_user or ""
        # Suspend at once (the next MAIL gets 5.7.1); holding the queue and telling postmaster
        # happen in the background.
        self.store.set_suspended(account, True)
        self.on_limit(account, what, facts)
        return reject("limit", f"{account}: {what}", 451, "4.7.1",
                      "sending limit exceeded; the account is suspended pending review by the postmaster")


def missing_headers(data: bytes, qid: str, hostname: str) -> bytes:
    """Message-ID and Date lines to prepend when a submitted message lacks them (RFC 5322 3.6)."""
    end = data.find(b"\r\n\r\n")
    headers = BytesHeaderParser(policy=compat32).parsebytes(data[: end + 2] if end >= 0 else data)
    out = b""
    if headers.get("Message-ID") is None:
        out += f"Message-ID: <{qid}@{hostname}>\r\n".encode()
    if headers.get("Date") is None:
        out += f"Date: {email.utils.formatdate(time.time(), localtime=True)}\r\n".encode()
    return out
