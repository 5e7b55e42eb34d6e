"""What happens when an account breaks its outbound limits: the post's manual clean-up, at once.

The account is suspended (done synchronously by the policy, so its next MAIL gets 5.7.1), all
its queued outbound mail is put on hold (kept, never sent, until released), and postmaster gets
a local message naming the account, the counts and the source addresses. A stolen password then
costs a handful of messages instead of a blacklisting.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable

from yuubin.policy.holds import AccountHolds
from yuubin.policy.pipeline import SessionFacts
from yuubin.queue.spool import new_id
from yuubin.store import Store, StoreBusy

log = logging.getLogger("yuubin.containment")


class AccountContainment:
    def __init__(self, store: Store, holds: AccountHolds, inject: Callable[[str, bytes, str], Awaitable[str | None]],
                 postmaster: str, hostname: str):
        self.store = store
        self.holds = holds
        self.inject = inject  # the intake: the notice enters like any other new message
        self.postmaster = postmaster
        self.hostname = hostname
        self._tasks: set[asyncio.Task] = set()

    def limit_broken(self, account: str, what: str, facts: SessionFacts) -> None:
        task = asyncio.get_running_loop().create_task(self.contain(account, what, facts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def contain(self, account: str, what: str, facts: SessionFacts) -> None:
        now = time.time()
        held = await self.holds.hold(account)
        try:
            clients, sent_hour, rcpts_day = await self.store.run(self._counts, account, now)
        except StoreBusy as e:  # the notice still goes out, without the figures
            log.warning('event=containment_counts_failed account=%s error="%s"', account, e)
            clients, sent_hour, rcpts_day = [], -1, -1
        if str(facts.client) not in {c for c, _ in clients}:
            clients.append((str(facts.client), 0))
        ips = ",".join(c for c, _ in clients)
        log.warning('event=account_suspended session=%s account=%s reason="%s" messages_last_hour=%d '
                    'recipients_last_day=%d held=%d clients=%s', facts.session, account, what, sent_hour,
                    rcpts_day, held, ips)
        await self._tell_postmaster(account, what, sent_hour, rcpts_day, held, clients)

    def _counts(self, account: str, now: float) -> tuple[list[tuple[str, int]], int, int]:
        return (self.store.submission_clients_since(account, now - 86400.0),
                self.store.submissions_since(account, now - 3600.0),
                len(self.store.submission_recipients_since(account, now - 86400.0)))

    async def _tell_postmaster(self, account: str, what: str, sent_hour: int, rcpts_day: int, held: int,
                               clients: list[tuple[str, int]]) -> None:
        lines = [
            f"The account {account} broke its outbound limit and was suspended:",
            f"  {what}",
            "",
            f"messages accepted in the last hour:    {sent_hour}",
            f"distinct recipients in the last day:   {rcpts_day}",
            f"queued messages put on hold:           {held}",
            "source addresses (last day, messages):",
            *[f"  {ip}  {n}" for ip, n in clients],
            "",
            "If the password was stolen: set a new one (yuubin account passwd), check the held mail,",
            "delete what is spam, then `yuubin account enable` the account.",
        ]
        body = "\r\n".join(lines) + "\r\n"
        data = (f"From: yuubin <{self.postmaster}>\r\nTo: <{self.postmaster}>\r\n"
                f"Subject: [yuubin] account {account} suspended\r\n"
                f"Date: {email.utils.formatdate(localtime=True)}\r\n"
                f"Message-ID: <{new_id()}@{self.hostname}>\r\n"
                f"Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                f"{body}").encode()
        if await self.inject(self.postmaster, data, "internal") is None:
            log.error('event=postmaster_unreachable account=%s postmaster=%s reason="no local mailbox"',
                      account, self.postmaster)

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
