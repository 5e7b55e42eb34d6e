"""An account's outbound limits on 587/465: the tripwire for a stolen password.

MAIL: the account must be logged in, not suspended, and under `outbound.max_per_hour`
messages; RCPT: under `outbound.max_recipients_per_day` distinct recipients. Breaking a limit
suspends the account at once (its next MAIL gets 5.7.1) and hands it to containment, which holds
its queued mail and tells postmaster. Every stored submission is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from yuubin.config import OutboundConfig
from yuubin.policy.pipeline import Decision, SessionFacts, Transaction, accept, reject
from yuubin.smtp.address import Address
from yuubin.store import SUSPENDED_BY_ADMIN, SUSPENDED_BY_LIMIT, AccountRow, Store, StoreBusy

HOUR = 3600.0
DAY = 86400.0
PRUNE_EVERY = 1000  # submissions between deletions of counter rows older than a day

SUSPENDED_TEXT = "account suspended after unusual sending; contact the postmaster"
SUSPENDED_BY_ADMIN_TEXT = "account suspended by the administrator; contact the postmaster"
SUSPENDED_UNKNOWN_TEXT = "account suspended; contact the postmaster"  # no reason stored (an older state.db)


class AccountLimits:
    def __init__(self, store: Store, outbound: OutboundConfig,
                 on_limit: Callable[[str, str, SessionFacts], None], clock: Callable[[], float] = time.time,
                 dry_run: bool = False):
        self.store = store
        self.dry_run = dry_run  # `policy explain`: say what would happen, suspend nobody
        self.outbound = outbound
        self.on_limit = on_limit  # holds the account's queue and tells postmaster (containment)
        self.clock = clock
        self._until_prune = PRUNE_EVERY
        self._suspending: set[str] = set()  # suspended here, the write still queued
        # Submissions counted but not yet in state.db (the write is queued): (account, at, recipients).
        self._unwritten: list[tuple[str, float, list[str]]] = []

    async def mail(self, txn: Transaction, sender: Address | None) -> Decision:
        account = txn.session.auth_user
        if account is None:  # the core refuses MAIL before AUTH; this is the second lock
            return reject("auth", "not authenticated", 530, "5.7.0", "authentication required")
        row = await self.store.run(self.store.account, account)
        if account in self._suspending:
            row = AccountRow(account, "", 0.0, True, SUSPENDED_BY_LIMIT)
        if row is None or row.suspended:
            by = row.suspended_by if row else ""
            text = {SUSPENDED_BY_ADMIN: SUSPENDED_BY_ADMIN_TEXT, SUSPENDED_BY_LIMIT: SUSPENDED_TEXT}.get(
                by, SUSPENDED_UNKNOWN_TEXT)
            why = f" by the {'administrator' if by == SUSPENDED_BY_ADMIN else 'sending limit'}" if by else ""
            return reject("suspended", f"account {account} is suspended{why}", 550, "5.7.1", text)
        since = self.clock() - HOUR
        sent = await self.store.run(self.store.submissions_since, account, since)
        sent += sum(1 for a, at, _ in self._unwritten if a == account and at > since)
        if sent >= self.outbound.max_per_hour:
            return await self._limit_broken(txn.session, f"{sent} messages in the last hour "
                                      f"(outbound.max_per_hour = {self.outbound.max_per_hour})")
        return accept("limits", f"{sent} messages in the last hour")

    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision:
        account = txn.session.auth_user or ""
        # Recipients of earlier messages in the last day, and those already taken in this one.
        since = self.clock() - DAY
        seen = await self.store.run(self.store.submission_recipients_since, account, since)
        for a, at, rcpts in self._unwritten:
            if a == account and at > since:
                seen.update(rcpts)
        seen.update(r.address.key for r in txn.recipients)
        limit = self.outbound.max_recipients_per_day
        if rcpt.key not in seen and len(seen) >= limit:
            return await self._limit_broken(txn.session, f"{len(seen)} distinct recipients in the last day "
                                      f"(outbound.max_recipients_per_day = {limit})")
        return accept("limits", f"{len(seen)} distinct recipients in the last day")

    def accepted(self, txn: Transaction) -> None:
        """Count a stored submission towards the account's limits (queued: state.db may be locked)."""
        account = txn.session.auth_user
        if account:
            now = self.clock()
            entry = (account, now, [r.address.key for r in txn.recipients])
            self._unwritten.append(entry)
            self.store.later(self.store.record_submission, account, now, str(txn.session.client), entry[2],
                             done=lambda: self._unwritten.remove(entry))
            self._until_prune -= 1
            if self._until_prune <= 0:  # the counters only need the last day
                self._until_prune = PRUNE_EVERY
                self.store.later(self.store.prune_submissions, now - DAY)

    async def _limit_broken(self, session: SessionFacts, what: str) -> Decision:
        account = session.auth_user or ""
        if self.dry_run:
            return reject("limit", f"{account}: {what}; the account would be suspended", 451, "4.7.1",
                          "sending limit exceeded; the account is suspended pending review by the postmaster")
        # Suspend at once (the next MAIL gets 5.7.1); holding the queue and telling postmaster
        # happen in the background.
        try:
            await self.store.run(self.store.set_suspended, account, True, SUSPENDED_BY_LIMIT)
        except StoreBusy:  # written as soon as state.db takes it; refused here meanwhile
            self._suspending.add(account)
            self.store.later(self.store.set_suspended, account, True, SUSPENDED_BY_LIMIT,
                             done=lambda: self._suspending.discard(account))
        self.on_limit(account, what, session)
        return reject("limit", f"{account}: {what}", 451, "4.7.1",
                      "sending limit exceeded; the account is suspended pending review by the postmaster")
