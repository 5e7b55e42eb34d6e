"""Local delivery: spool entry → one Maildir copy per local mailbox → spool entry removed.

The spool entry goes only after every copy is durable (same group commit). A failure (disk
full, permissions) leaves it in the spool and retries with backoff; a restart redelivers
whatever is still in the spool (a duplicate at worst, never a loss).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from yuubin.delivery.maildir import JUNK, Maildirs
from yuubin.durable import Commit, FileWrite, GroupCommitter
from yuubin.queue.edit import KEEP, Edit, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.signal import Waker
from yuubin.queue.spool import Envelope, Spool, SpoolCorrupt

log = logging.getLogger("yuubin.delivery")

RETRY_FIRST = 5.0
RETRY_MAX = 300.0


class LocalDelivery:
    def __init__(self, spool: Spool, maildirs: Maildirs, committer: GroupCommitter, editor: SpoolEditor,
                 is_held: Callable[[Envelope], bool], queue: Waker, retry_first: float = RETRY_FIRST,
                 delivered: Callable[[str, str], None] | None = None):
        self.spool = spool
        self.maildirs = maildirs
        self.committer = committer
        self.editor = editor  # the spool entry's rewrite after its local copies, under the entry lock
        self.is_held = is_held  # a suspended account's mail stays held
        self.queue = queue  # told when an entry has only remote recipients left
        self.retry_first = retry_first
        # Told (mailbox, Maildir++ folder or "") after each durable copy: IMAP IDLE announces it at once.
        self.on_delivered = delivered
        self._tasks: set[asyncio.Task] = set()
        self.delivered = 0

    def submit(self, env: Envelope, data: bytes, stored: Commit | None = None) -> None:
        """Deliver in the background.

        With `stored` (the spool write still on its way to disk), the Maildir copies of a
        local-only message are queued right now behind it, so both usually share one group
        commit: the copies become durable only if the spool entry did, and the entry goes
        once they are. Otherwise the message is already durable in the spool.
        """
        if not env.local:
            self.queue.wake(env.id)  # only remote recipients: outbound delivery takes it from the spool
            return
        first: Commit | None = None
        if stored is not None and not env.remote:
            try:
                first = self._enqueue_local_only(env, data, after=stored)
            except OSError:
                first = None  # could not even create the files: the retry loop takes over
        task = asyncio.get_running_loop().create_task(self._deliver_with_retry(env, data, first, stored))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_with_retry(self, env: Envelope, data: bytes, first: Commit | None = None,
                                  stored: Commit | None = None) -> None:
        if stored is not None:
            try:
                await stored
            except OSError:
                if first is not None:  # failed with the spool write; retrieve its error quietly
                    first.future.add_done_callback(lambda f: f.exception())
                return  # never acknowledged (452/451 sent): nothing to deliver
        delay = self.retry_first
        while True:
            try:
                if first is not None:
                    attempt, first = first, None
                    await attempt
                    self._delivered(env, list(env.local))
                else:
                    await self.deliver(env, data)
                return
            except OSError as e:
                log.warning("event=delivery_deferred id=%s error=%r retry_in=%.0fs", env.id,
                            e.strerror or str(e), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _copies(self, env: Envelope, data: bytes) -> list[FileWrite]:
        return_path = f"Return-Path: <{env.sender}>\r\n".encode()
        folder = JUNK if env.junk else ""
        writes = []
        for mailbox, _rcpt in env.local:
            self.maildirs.ensure(mailbox, folder)
            writes.append(self.maildirs.write(mailbox, [return_path, f"Delivered-To: {mailbox}\r\n".encode(), data],
                                              folder))
        return writes

    def _enqueue_local_only(self, env: Envelope, data: bytes, after: Commit | None) -> Commit:
        return self.committer.enqueue(self._copies(env, data), unlinks=[self.spool.file(env.id)], after=after)

    def _delivered(self, env: Envelope, targets: list[tuple[str, str]]) -> None:
        self.delivered += len(targets)
        for mailbox, rcpt in targets:
            log.info("event=delivered id=%s to=%s rcpt=%s", env.id, mailbox, rcpt)
            if self.on_delivered is not None:
                self.on_delivered(mailbox, JUNK if env.junk else "")

    async def deliver(self, env: Envelope, data: bytes) -> None:
        targets = list(env.local)
        if not env.remote:
            await self._enqueue_local_only(env, data, after=None)
            self._delivered(env, targets)
            return
        writes = self._copies(env, data)
        await self.committer.commit(writes)

        async def local_done(current: Envelope, _data: bytes) -> Edit:
            if not current.local:
                return KEEP
            current.local = []
            if self.is_held(current):
                current.held = True  # the account was suspended meanwhile: never undo its hold
            return Rewrite(current)

        try:
            await self.editor.edit(env.id, local_done)
        except Unreadable as e:
            # The copies are durable; the entry cannot be rewritten. Retrying would only copy again:
            # the torn entry is set aside at the next start (recover), its remote part with it.
            log.error('event=spool_unreadable id=%s error="%s" action="local copies delivered; entry left for '
                      'the admin"', env.id, e)
            self._delivered(env, targets)
            return
        env.local = []
        self.queue.wake(env.id)
        self._delivered(env, targets)

    async def recover(self) -> int:
        """Redeliver what a previous run left in the spool; returns how many entries."""
        self.spool.clean_tmp()
        count = 0
        for qid in self.spool.ids():
            try:
                env, data = self.spool.load(qid)
            except SpoolCorrupt as e:
                dest = self.spool.set_aside(qid)
                log.error("event=spool_corrupt id=%s reason=%r moved_to=%s", qid, str(e), dest)
                continue
            if env.local:
                self.submit(env, data)
                count += 1
        return count

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
