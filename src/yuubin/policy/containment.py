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

from yuubin.auth.accounts import Directory
from yuubin.delivery.local import LocalDelivery
from yuubin.policy.decision import SessionFacts
from yuubin.queue.edit import KEEP, Edit, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.spool import Envelope, Spool, new_id
from yuubin.smtp.address import parse_path
from yuubin.store import Store

log = logging.getLogger("yuubin.containment")


async def hold_account_mail(spool: Spool, editor: SpoolEditor, account: str, held: bool = True) -> int:
    """Set (or clear) `held` on every queued entry the account submitted; returns how many.

    Each edit goes through the SpoolEditor the scheduler uses, so a delivery result recorded at
    the same moment cannot overwrite the hold.
    """
    async def set_held(env: Envelope, _data: bytes) -> Edit:
        if env.auth != account or env.held == held:
            return KEEP
        env.held = held
        return Rewrite(env)

    count = 0
    for qid in spool.ids():
        try:
            edit = await editor.edit(qid, set_held)  # None: delivered and removed right now
        except Unreadable:
            continue  # torn: set aside at start
        if isinstance(edit, Rewrite):
            count += 1
    return count


class AccountContainment:
    def __init__(self, store: Store, spool: Spool, editor: SpoolEditor, delivery: LocalDelivery,
                 directory: Directory, hostname: str):
        self.store = store
        self.spool = spool
        self.editor = editor  # shared with the scheduler: a hold never races a delivery result
        self.delivery = delivery
        self.directory = directory
        self.hostname = hostname
        self._tasks: set[asyncio.Task] = set()

    def is_held(self, env: Envelope) -> bool:
        """True when the submitting account is suspended: its mail must stay on hold."""
        if not env.auth:
            return False
        row = self.store.account(env.auth)
        return row is not None and row.suspended

    def limit_broken(self, account: str, what: str, facts: SessionFacts) -> None:
        task = asyncio.get_running_loop().create_task(self.contain(account, what, facts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def hold(self, account: str) -> int:
        return await hold_account_mail(self.spool, self.editor, account, True)

    async def contain(self, account: str, what: str, facts: SessionFacts) -> None:
        now = time.time()
        held = await self.hold(account)
        clients = self.store.submission_clients_since(account, now - 86400.0)
        if str(facts.client) not in {c for c, _ in clients}:
            clients.append((str(facts.client), 0))
        sent_hour = self.store.submissions_since(account, now - 3600.0)
        rcpts_day = len(self.store.submission_recipients_since(account, now - 86400.0))
        ips = ",".join(c for c, _ in clients)
        log.warning('event=account_suspended session=%s account=%s reason="%s" messages_last_hour=%d '
                    'recipients_last_day=%d held=%d clients=%s', facts.session, account, what, sent_hour,
                    rcpts_day, held, ips)
        await self._tell_postmaster(account, what, sent_hour, rcpts_day, held, clients)

    async def _tell_postmaster(self, account: str, what: str, sent_hour: int, rcpts_day: int, held: int,
                               clients: list[tuple[str, int]]) -> None:
        pm = parse_path(f"<{self.directory.postmaster}>", smtputf8=True)
        res = self.directory.resolve(pm) if pm else None
        if res is None or not res.mailboxes:
            log.error("event=postmaster_unreachable account=%s postmaster=%s reason=\"no local mailbox\"",
                      account, self.directory.postmaster)
            return
        qid = new_id()
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
        data = (f"From: yuubin <{self.directory.postmaster}>\r\nTo: <{self.directory.postmaster}>\r\n"
                f"Subject: [yuubin] account {account} suspended\r\n"
                f"Date: {email.utils.formatdate(localtime=True)}\r\n"
                f"Message-ID: <{qid}@{self.hostname}>\r\n"
                f"Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                f"{body}").encode()
        env = Envelope(id=qid, sender="", mail_params={}, local=[(mb, self.directory.postmaster)
                                                                 for mb in res.mailboxes],
                       remote=[], received=time.time(), client="127.0.0.1", helo=self.hostname,
                       listener="internal", trusted=True)
        await self.spool.store(env, data)
        self.delivery.submit(env, data)

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
